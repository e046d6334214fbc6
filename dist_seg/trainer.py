"""One Accelerate training loop for every method, with checkpoint/resume, validation and tracking.

``train(cfg)`` is what recipes, ``dist-seg train``, Ray trials and tests call. It runs unchanged on one
CPU process, on several CPU processes (gloo) and on N GPUs / M nodes under ``accelerate launch``.

Determinism and resume: every random choice that shapes a step (sampling coordinates, derangements,
KNN partner choice) is drawn from generators seeded by ``(seed, step, purpose)``; the data stream of a
rank is a deterministic function of ``(seed, epoch)`` and restarts at the exact batch of the step being
resumed; the global torch RNG (dropout) is re-seeded from ``(seed, step, rank)`` at every step; checkpoints
hold parameters, optimiser and scaler state. A resumed run therefore ends with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Optional

import torch

from dist_seg import distributed as D
from dist_seg.checkpoints import (
    DEEPSPEED_FILES_KEY,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    select_checkpoint,
)
from dist_seg.config import ConfigError, RunConfig, merge, save_config, to_dict
from dist_seg.data.manifest import DataError
from dist_seg.features import DataInfo, check_feature_cache, read_data_info  # noqa: F401  (re-exported)
from dist_seg.methods import build_method, method_class
from dist_seg.methods.base import Batch, Method, StepContext

# What every stage needs to start lives in dist_seg.runtime; these names stay importable from here.
from dist_seg.runtime import (  # noqa: F401  (re-exported)
    RESUMABLE_EXIT,
    HangWatch,
    OutputDirBusy,
    StopSignals,
    add_recipe_arguments,
    catch_stop_signals_early,
    default_cache_dir,
    init_timeout,
    is_collective_timeout,
    load_recipe,
    lock_output_dir,
    make_accelerator,
    recipe_argv,
    resolve_config,
    restore_signal_handlers,
    set_collective_timeout,
    setup_logging,
    unlock_output_dir,
    watch_launcher,
)

log = logging.getLogger("dist_seg.trainer")

# ``on_eval`` is called on every rank (scores are identical on all ranks), so a Ray Train worker group can
# report from each worker; Ray Tune reads this flag.
ON_EVAL_EVERY_RANK = True
CKPT_DIR = "checkpoints"
BEST_NAME = "best-val-cluster-mIoU.pt"


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite loss, missing data): the message says what to do."""


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / CKPT_DIR


def list_checkpoints(cfg: RunConfig) -> list[Path]:
    return sorted(checkpoint_dir(cfg).glob("step-*.pt"))


def load_latest_checkpoint(cfg: RunConfig) -> tuple[Optional[dict], Optional[Path]]:
    """Newest checkpoint of the run that loads and passes its checksums (with its DeepSpeed shards, for a
    DeepSpeed run); damaged ones (half-written, truncated, flipped bytes) are named and skipped with a warning
    (:func:`dist_seg.checkpoints.latest_checkpoint`).

    Files are read with ``weights_only=True`` only (:func:`dist_seg.checkpoints.load_checkpoint`): a pickle
    dropped into the folder that would run code is skipped like a corrupted file, never executed.
    """
    return latest_checkpoint(checkpoint_dir(cfg), deepspeed=bool(cfg.train.deepspeed_config))


def prune_checkpoints(cfg: RunConfig) -> None:
    keep = max(1, cfg.train.keep_last)
    for path in list_checkpoints(cfg)[:-keep]:
        path.unlink(missing_ok=True)
        # DeepSpeed never deletes its own tags: drop the ZeRO shards of pruned steps too.
        shutil.rmtree(checkpoint_dir(cfg) / "deepspeed" / path.stem, ignore_errors=True)


def load_method_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", overrides: Sequence[str] = (),
                           trust: bool = False) -> tuple[Method, RunConfig, dict]:
    """Rebuild a method from a checkpoint (its saved config, optionally overridden) for eval/predict.

    ``path`` is a checkpoint file or a run folder (its ``output_dir`` or ``checkpoints/``), where the newest
    checkpoint that passes its checksums is used (:func:`dist_seg.checkpoints.select_checkpoint`). The file is
    read with ``weights_only=True``; ``trust=True`` (``--trust-checkpoint``) also reads an old-format pickle,
    which runs any code it holds. Every file that cannot be used raises a
    :class:`~dist_seg.checkpoints.CheckpointError` (a ``ValueError``) naming it.
    """
    import yaml

    from dist_seg.config import from_yaml

    state, path = select_checkpoint(path, trust=trust)
    try:
        cfg = from_yaml(RunConfig, yaml.safe_dump(dict(state["config"])))
    except (ConfigError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path} holds a config this dist_seg cannot read ({err})") from None
    if overrides:
        cfg = merge(cfg, overrides=overrides)
    meta = state["meta"]
    method = build_method(cfg, feat_dim=meta["feat_dim"], num_classes=meta["num_classes"],
                          has_labels=meta.get("has_labels", True))
    try:
        method.load_state_dict(state["method"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit the {cfg.method} model its config describes "
                              f"({str(err).splitlines()[0]})") from None
    return method.to(device).eval(), cfg, state


# ----------------------------------------------------------------------------------- the trainer
class Trainer:
    """Builds everything a run needs from a config; ``fit()`` trains, validates, checkpoints and tracks.

    Args:
        cfg: the resolved run configuration.
        accelerator: an ``accelerate.Accelerator`` (built from the config when omitted).
    """

    def __init__(
        self, cfg: RunConfig, accelerator=None, *, on_eval: Optional[Callable[[int, dict], None]] = None
    ) -> None:
        setup_logging()
        self.cfg = cfg
        self.on_eval = on_eval
        self.accelerator = accelerator or make_accelerator(cfg)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if cfg.data.batch_size % self.world:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) must be divisible by "
                              f"the number of processes ({self.world})")
        self.local_batch = cfg.data.batch_size // self.world
        configure_precision(cfg, self.device)
        # The same seed on every rank before anything random is built: DeepSpeed broadcasts parameters only,
        # so buffers drawn at random (DS²DL's global prototypes) must agree by construction (they are also
        # broadcast from rank 0 below). Dropout gets (seed, step, rank) seeds at every step in the loop.
        torch.manual_seed(cfg.train.seed)
        self.images_in = method_class(cfg.method).inputs_of(cfg) == "images"
        if self.images_in and cfg.train.mode == "cached":
            raise ConfigError(f"method {cfg.method!r} trains on images, not cached features: set train.mode=online")
        self.info = read_data_info(cfg)
        if cfg.train.mode == "online":
            from dist_seg.data.transforms import check_decode_device

            check_decode_device(cfg.data.decode_device)
            log.info("training images decoded on %s", "the GPU (JPEG shards, torchvision.io.decode_jpeg; PNG shards "
                     "on the CPU)" if cfg.data.decode_device == "cuda" else "the CPU (loader workers)")
        self.backbone = None
        if not self.images_in and (cfg.train.mode == "online" or (self.info.has_val and not self.info.val_cached)):
            from dist_seg.backbones import backbone_dtype, load_backbone

            # The backbone runs its own autocast on CUDA (backbone.dtype: bf16 by default on GPUs); CPUs run fp32.
            self.backbone = load_backbone(cfg.backbone.name, cfg.backbone.weights,
                                          allow_download=cfg.backbone.allow_download,
                                          dtype=backbone_dtype(cfg.backbone.dtype, cfg.train.mixed_precision))
            self.backbone = self.backbone.to(self.device)
        feat_dim = 3 if self.images_in else (self.info.feat_dim or self.backbone.embed_dim)
        method = build_method(cfg, feat_dim=feat_dim, num_classes=self.info.num_classes,
                              has_labels=self.info.has_train_labels)
        self.needs_partners = getattr(method, "needs_partners", True)
        # Partners are drawn, read and decoded by the training loader's workers (dist_seg.data.partners),
        # which get the table once, when the loader starts.
        self.knn = self._knn_indices() if self.needs_partners else None
        if getattr(method, "needs_fit", False):
            method.fit(self._fit_features(getattr(method, "fit_samples", 2000)))
        optimizer = method.build_optimizer()
        if self.accelerator.ddp_handler is not None:  # set before prepare() wraps the method in DDP
            self.accelerator.ddp_handler.find_unused_parameters = method.find_unused_parameters
        self.engine = None
        if cfg.train.deepspeed_config:
            # ZeRO-2 is driven directly (see dist_seg/ds_engine.py for why not through Accelerate's plugin).
            from dist_seg.ds_engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(method.to(self.device), optimizer, cfg.train.deepspeed_config,
                                          micro_batch_size=self.local_batch, mixed_precision=cfg.train.mixed_precision,
                                          gradient_clipping=cfg.train.grad_clip)
            self.method, self.optimizer = self.engine, self.engine.optimizer
        else:
            self.method, self.optimizer = self.accelerator.prepare(method, optimizer)
        # Every buffer identical on all ranks after set-up, whatever the engine (DDP copies buffers from rank 0
        # when it wraps the module; DeepSpeed does not).
        D.broadcast_buffers(self.unwrapped)
        self.step = 0
        self.best_miou = -math.inf
        self.assignment: Optional[list] = None  # cluster -> class matching of the latest validation
        self._stop_requested = False
        self.resumed_from: Optional[Path] = None  # the checkpoint this run resumed from (named in loss errors)
        self.tracker = None
        # Read at logging/validation/checkpoint steps only (see _check): the first step whose loss was not
        # finite (-1: none), kept on the device so no step waits for it; seconds spent waiting for batches.
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._data_wait = 0.0

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> Method:
        if self.engine is not None:
            return self.engine.module
        return self.accelerator.unwrap_model(self.method)

    def _optimise(self, loss: torch.Tensor) -> None:
        """Backward, clipping and the optimiser step, through DeepSpeed or Accelerate."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()  # clipping and zero_grad happen inside
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.cfg.train.grad_clip:
            self.accelerator.clip_grad_norm_(self.method.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.accelerator.autocast():
            return self.backbone.patch_features(images.to(self.device, non_blocking=True)).float()

    def _fit_features(self, num: int) -> torch.Tensor:
        """``num`` training feature vectors (pixels) for baselines that fit on data (PCA), the same on every rank.

        Each rank reads ``ceil(num / world)`` rows from its own shards and the rows are gathered, so every rank
        fits on the same data drawn from all shards (the fitted buffers are broadcast from rank 0 as well).
        """
        loader, _ = self._loader(self.cfg.data.train_split, infinite=False, shuffle=False)
        share = -(-num // self.world)
        rows, total = [], 0
        for batch in loader:
            f = batch["feat"].float() if "feat" in batch else self._features(batch["image"]).cpu()
            rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
            total += rows[-1].shape[0]
            if total >= share:
                break
        dim = rows[0].shape[1] if rows else self.info.feat_dim or self.backbone.embed_dim
        mine = torch.cat(rows)[:share] if rows else torch.zeros(0, dim)
        return D.all_gather_variable(mine.to(self.device)).cpu()[:num]

    def _loader(self, split: str, *, infinite: bool, shuffle: bool, start_batch: int = 0, val: bool = False,
                partners: bool = False):
        from dist_seg.data.shards import make_loader

        # Validation reads the cache only when it holds the validation split (flipped views at eval_res).
        cached = self.cfg.train.mode == "cached" and (not val or self.info.val_cached)
        root = self.info.cache if cached else self.cfg.data.root
        res = self.cfg.data.eval_res if val else self.cfg.data.res
        decode = "features" if cached else "image"
        stage = None
        if partners:
            from dist_seg.data.partners import PartnerReader

            stage = PartnerReader(self.knn, root=root, split=split, res=res, decode=decode, half_features=True,
                                  seed=self.cfg.train.seed, rank=self.rank, world_size=self.world,
                                  start_batch=start_batch)
        # Cached features stay fp16 until they are on the device (half the bytes to copy); pinned batches
        # make the non_blocking copies to a GPU asynchronous.
        return make_loader(
            root, split, batch_size=self.local_batch, res=res,
            num_workers=self.cfg.data.num_workers, seed=self.cfg.train.seed, shuffle=shuffle,
            infinite=infinite, start_batch=start_batch, shuffle_buffer=self.cfg.data.shuffle_buffer,
            decode=self._image_decode(infinite) if decode == "image" else decode, half_features=True,
            pin_memory=self.device.type == "cuda", batch_stage=stage, num_classes="manifest",
        )

    def _image_decode(self, training_stream: bool) -> str:
        # data.decode_device=cuda: the training stream yields JPEG bytes, decoded on the GPU in _batches.
        return "encoded" if training_stream and self.cfg.data.decode_device == "cuda" else "image"

    def _knn_indices(self) -> torch.Tensor:
        from dist_seg.knn_table import ensure_knn_table

        indices = ensure_knn_table(self.cfg, backbone=self.backbone, cache=self.info.cache, device=self.device)
        need = self.cfg.stego.num_neighbors
        if indices.shape[1] < need:
            raise ConfigError(f"the KNN table holds {indices.shape[1]} neighbours but stego.num_neighbors={need}")
        return indices[:, :need]

    def encoded(self, raw: dict, prefix: str = "") -> torch.Tensor:
        """Frozen features of a loader batch on the device: the backbone's on its images (online), or its
        cached fp16 features expanded to fp32 there. ``prefix="partner_"`` reads the KNN partners."""
        if f"{prefix}feat" in raw:
            return raw[f"{prefix}feat"].to(self.device, non_blocking=True).float()
        return self._features(raw[f"{prefix}image"])

    def _timed(self, batches) -> Iterator:
        """Items of ``batches``; the time spent waiting for each is added to ``self._data_wait``."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self._data_wait += time.perf_counter() - start
            yield item

    def _batches(self) -> Iterator[Batch]:
        own = self.unwrapped.train_batches(start_step=self.step, local_batch=self.local_batch, device=self.device)
        if own is not None:
            yield from self._timed(own)
            return
        # Batches arrive with each anchor's KNN partner (read in the loader's workers, SPEC §2).
        loader, _ = self._loader(self.cfg.data.train_split, infinite=True, shuffle=True, start_batch=self.step,
                                 partners=self.needs_partners)
        self.train_skips = loader.skip_counter  # read by fit() for the run's damaged-data report
        for raw in self._timed(loader):
            yield self.batch_from(raw)

    def batch_from(self, raw: dict) -> Batch:
        """The method's :class:`Batch` of a training loader batch (inputs on the device, copies non-blocking)."""
        from dist_seg.data.transforms import decode_jpeg_batch, normalize

        if "jpeg" in raw:  # data.decode_device=cuda: JPEG bytes decoded and resized on the GPU
            raw["image"] = decode_jpeg_batch(raw["jpeg"], self.cfg.data.res, self.device)
        label = raw["label"].to(self.device, non_blocking=True) if self.info.has_train_labels else None
        if self.images_in:
            return Batch(images=normalize(raw["image"].to(self.device, non_blocking=True)), label=label,
                         index=raw["index"])
        feats = self.encoded(raw)
        partner = self.encoded(raw, "partner_") if self.needs_partners else None
        return Batch(feats=feats, partner_feats=partner, label=label, index=raw["index"])

    def _context(self) -> StepContext:
        return StepContext(step=self.step, seed=self.cfg.train.seed, rank=self.rank, world_size=self.world,
                           local_batch=self.local_batch)

    # -- checkpoints -----------------------------------------------------------------------------
    def method_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's weights as checkpoints hold them.

        Under DeepSpeed the parameters come from its float32 master copy (gathered from the ZeRO partitions by
        DeepSpeed's ``safe_get_full_fp32_param``), not from the bf16/fp16 weights the forward pass uses.
        Collective under DeepSpeed: every rank must call it.
        """
        if self.engine is not None:
            return self.engine.fp32_state_dict()
        return self.unwrapped.state_dict()

    def eval_method(self) -> Method:
        """The method validation scores.

        Under DeepSpeed with bf16/fp16 weights, a float32 copy holding the master weights (exactly what the
        checkpoint holds and ``dist-seg eval`` scores; heads are small, so the copy is cheap), else the method
        itself. Collective under DeepSpeed.
        """
        method = self.unwrapped
        if self.engine is None or all(p.dtype == torch.float32 for p in method.parameters()):
            return method
        copy = build_method(self.cfg, feat_dim=method.feat_dim, num_classes=self.info.num_classes,
                            has_labels=self.info.has_train_labels)
        copy.load_state_dict(self.engine.fp32_state_dict())
        return copy.to(self.device)

    def state_dict(self) -> dict:
        state = {
            "step": int(self.step),
            "method": self.method_state_dict(),
            # Under ZeRO each rank holds a shard of the optimiser state: DeepSpeed saves those beside this file.
            "optimizer": self.optimizer.state_dict() if self.engine is None else None,
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "best_miou": float(self.best_miou),
            # Plain ints (never numpy scalars): the file must load with torch.load(weights_only=True).
            "assignment": None if self.assignment is None else [int(a) for a in self.assignment],
            "config": to_dict(self.cfg),
            "meta": {"feat_dim": self.unwrapped.feat_dim, "num_classes": self.info.num_classes,
                     "has_labels": self.info.has_train_labels, "world_size": self.world,
                     "method": self.cfg.method, "backbone": self.cfg.backbone.name,
                     "class_names": self.info.class_names, "colors": self.info.colors},
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        self.unwrapped.load_state_dict(state["method"])
        if self.engine is not None:
            self.engine.load(checkpoint_dir(self.cfg) / "deepspeed", tag=f"step-{int(state['step']):08d}")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_miou = float(state.get("best_miou", -math.inf))
        self.assignment = state.get("assignment")

    def save_checkpoint(self, *, best: bool = False) -> Optional[Path]:
        state = self.state_dict()  # collective: every rank takes part
        path = None
        if self.engine is not None and not best:
            tag = f"step-{self.step:08d}"
            self.engine.save(checkpoint_dir(self.cfg) / "deepspeed", tag)  # collective
            # Sizes and checksums of the ZeRO shards, checked before a resume (collective).
            state[DEEPSPEED_FILES_KEY] = self.engine.file_digests(checkpoint_dir(self.cfg) / "deepspeed", tag)
        if self.accelerator.is_main_process:
            path = checkpoint_dir(self.cfg) / (BEST_NAME if best else f"step-{self.step:08d}.pt")
            save_checkpoint(state, path)
            if not best:
                prune_checkpoints(self.cfg)
        self.accelerator.wait_for_everyone()
        return path

    def maybe_resume(self) -> bool:
        if not self.cfg.train.resume:
            return False
        # Rank 0 picks the newest checkpoint that passes its checksums (naming and skipping damaged ones); every
        # rank then loads that one.
        state, path = load_latest_checkpoint(self.cfg) if self.accelerator.is_main_process else (None, None)
        step = D.broadcast_object(None if state is None else int(state["step"]))
        if step is None:
            return False
        path = checkpoint_dir(self.cfg) / f"step-{step:08d}.pt"
        if state is None:
            state = load_checkpoint(path)
        self.load_state_dict(state)
        self.resumed_from = path
        if self.accelerator.is_main_process:
            log.info("resumed from %s at step %d", path, self.step)
        return True

    # -- validation ------------------------------------------------------------------------------
    def validate(self, *, num_overlays: int = 0, crf: Optional[bool] = None) -> Optional[dict]:
        from dist_seg.eval.evaluate import validate_run

        return validate_run(self.eval_method(), self.cfg, self.info, device=self.device, local_batch=self.local_batch,
                            backbone=self.backbone, autocast=self.accelerator.autocast,
                            num_overlays=num_overlays, crf=crf)

    # -- the loop --------------------------------------------------------------------------------
    def _request_stop(self, signum, frame=None) -> None:  # noqa: ARG002
        log.warning("rank %d: signal %d received at step %d: checkpointing at the next logging step, then exiting "
                    "with status %d", self.rank, signum, self.step, RESUMABLE_EXIT)
        self._stop_requested = True

    def _lock_output_dir(self) -> None:
        """One live run per output folder: rank 0 takes the lock (dist_seg.runtime.lock_output_dir), every rank
        learns the outcome, and all refuse together when another run holds it."""
        busy = None
        if self.accelerator.is_main_process:
            try:
                lock_output_dir(self.cfg.train.output_dir)
            except OutputDirBusy as err:
                busy = str(err)
        busy = D.broadcast_object(busy)
        if busy is not None:
            raise OutputDirBusy(busy)

    def fit(self) -> dict:
        out_dir = Path(self.cfg.train.output_dir)
        self._lock_output_dir()
        try:
            return self._fit(out_dir)
        finally:
            if self.accelerator.is_main_process:
                unlock_output_dir(out_dir)

    def _fit(self, out_dir: Path) -> dict:
        from dist_seg.tracking import Tracker

        cfg = self.cfg
        watch_launcher()  # a rank whose launcher dies stops (no orphans training on)
        if self.accelerator.is_main_process:
            save_config(cfg, out_dir / "config.yaml")
        resumed = self.maybe_resume()
        self.tracker = Tracker.for_run(cfg, active=self.accelerator.is_main_process,
                                       dataset=_dataset_record(cfg) if self.accelerator.is_main_process else None,
                                       checkpoints=checkpoint_dir(cfg), start_step=self.step,
                                       tags={"dataset": str(Path(cfg.data.root).resolve()),
                                             "backbone": cfg.backbone.name,
                                             "backbone.weights_id": getattr(self.backbone, "weights_id", "cache"),
                                             "method": cfg.method, "world_size": str(self.world),
                                             "resumed_from_step": str(self.step) if resumed else "0"})
        status = "FAILED"
        self.watch = self._start_hang_watch()
        try:
            try:
                with StopSignals(self._request_stop):  # SIGTERM / SIGUSR1: agree on a step, checkpoint, stop
                    result = self._loop()
            except Exception as err:
                if is_collective_timeout(err):  # another rank stopped: say which, not gloo's socket error
                    raise TrainingError(self.watch.timeout_message(err)) from None
                raise
            finally:
                self.watch.close()
                set_collective_timeout(init_timeout(cfg))
            result["data"] = self._data_report()
            status = "FINISHED" if not self._stop_requested else "KILLED"
            return result
        finally:
            self.tracker.end(status)

    def _start_hang_watch(self) -> HangWatch:
        """Heartbeats of every rank in ``<output_dir>/heartbeat`` (dist_seg.runtime.HangWatch), cleared of an
        earlier run's first."""
        watch = HangWatch(self.cfg, rank=self.rank, world=self.world)
        if self.accelerator.is_main_process:
            watch.clear()
        D.barrier()
        return watch.start()

    def _loop(self) -> dict:
        from dist_seg.eval.evaluate import summary

        cfg = self.cfg
        progress = None
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.train.num_steps, initial=self.step, desc=f"train {cfg.method}",
                            dynamic_ncols=True, disable=not sys.stderr.isatty())
        self.method.train()
        batches = self._batches() if self.step < cfg.train.num_steps else iter(())
        window = _Window()
        watch = self.watch
        while self.step < cfg.train.num_steps:
            watch.activity("waiting for data")
            batch = next(batches)
            watch.activity("in a training step")
            loss, logs = self.train_step(batch)
            watch.reached(self.step)  # after the first step, collectives wait train.step_timeout_s at most
            window.steps += 1
            if progress is not None:
                progress.update(1)
            at_log = self.step % cfg.train.log_every == 0 or self.step == cfg.train.num_steps
            at_val = bool(cfg.train.val_every) and self.step % cfg.train.val_every == 0
            at_ckpt = self.step % cfg.train.checkpoint_every == 0
            at_val = at_val and self.step < cfg.train.num_steps
            at_ckpt = at_ckpt and self.step < cfg.train.num_steps
            if not (at_log or at_val or at_ckpt):
                continue  # the device keeps working; the host goes on to the next batch
            stop = self._check()
            if at_log:
                self._log_train(loss, logs, window, progress)
                window = _Window()
            paused = time.perf_counter()
            with watch.relaxed("validating or writing a checkpoint"):  # the start-up timeout meanwhile
                if at_val and not stop:
                    self._validate_and_select()
                if stop or at_ckpt:
                    self.save_checkpoint()
            window.paused += time.perf_counter() - paused  # validation and checkpoints are not step time
            if stop:
                self._stop_requested = True
                if progress is not None:
                    progress.close()
                log.warning("rank %d stopped at step %d after a termination signal (exit status %d); re-run the "
                            "same command to resume", self.rank, self.step, RESUMABLE_EXIT)
                return {"step": self.step, "stopped": True}
        if progress is not None:
            progress.close()
        # The final checkpoint comes after the final validation so it carries that cluster→class matching.
        with watch.relaxed("validating or writing a checkpoint"):
            result = self._validate_and_select(final=True) or {}
            self.save_checkpoint()
        return {"step": self.step, "stopped": False, "val": result,
                "metrics": summary(result) if result else {}}

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """One optimiser step on this rank's part of the global batch: ``(loss, logs)``, still on the device.

        The host never waits for the device here (with pinned batches): whether the loss was finite is
        recorded in a device flag that :meth:`_check` reads at logging, validation and checkpoint steps, and
        the logs are read at logging steps only.
        """
        cfg = self.cfg
        ctx = self._context()
        # The global RNG (dropout) is re-seeded from (seed, step, rank) every step: a resumed run draws
        # exactly the masks of an uninterrupted one, whatever else consumed random numbers in between.
        torch.manual_seed(D.seeded_generator(cfg.train.seed, self.step, "torch", self.rank).initial_seed())
        self.unwrapped.before_step(self.step, self.optimizer)
        with self.accelerator.autocast():
            loss, logs = self.method(batch, ctx)
        loss_value = loss.detach()
        bad = ~torch.isfinite(loss_value).all()
        self._first_nonfinite = torch.where(bad & (self._first_nonfinite < 0), self.step, self._first_nonfinite)
        self._optimise(loss)
        self.unwrapped.after_step()
        self.step += 1
        return loss_value, logs

    def _check(self) -> bool:
        """Agree over ranks, in one small collective, on the flags the steps since the last check left.

        Raises :class:`TrainingError` when any rank saw a non-finite loss (before anything is validated or
        checkpointed), and returns whether any rank was asked to stop (SIGTERM).
        """
        # MAX over ranks of (_NEVER - first bad step) finds the earliest bad step; 0 means none.
        bad = torch.where(self._first_nonfinite >= 0, _NEVER - self._first_nonfinite, 0)
        stop = torch.ones_like(bad) if self._stop_requested else torch.zeros_like(bad)
        flags = D.all_reduce_max(torch.stack([bad, stop])).tolist()
        if flags[0] > 0:
            resumed = ""
            if self.resumed_from is not None:
                # A checkpoint damaged in a way its checksums cannot see (written after the weights went bad)
                # would fail every re-run the same way: say where this run came from.
                resumed = (f" (this run resumed from {self.resumed_from}: if the loss was finite before it, delete "
                           "that checkpoint to resume from the previous one)")
            raise TrainingError(f"non-finite loss at step {_NEVER - flags[0]}{resumed}: lower the learning rates, "
                                "enable train.grad_clip, or check the features (mixed precision overflow?)")
        return bool(flags[1])

    def _log_train(self, loss: torch.Tensor, logs: dict, window: _Window, progress) -> None:
        """Log the last step's losses (mean over ranks), crops/s and the share of step time spent waiting for
        data (the largest over ranks: the slowest input holds every rank back)."""
        cfg = self.cfg
        elapsed = max(time.perf_counter() - window.start - window.paused, 1e-9)
        crops_per_s = window.steps * cfg.data.batch_size / elapsed
        metrics = _mean_over_ranks({"loss": loss, **logs, "crops_per_s": crops_per_s}, self.device)
        crops_per_s = metrics.pop("crops_per_s")
        wait = torch.tensor([self._data_wait / elapsed], dtype=torch.float64, device=self.device)
        data_wait = min(1.0, float(D.all_reduce_max(wait)))
        self._data_wait = 0.0
        metrics.update(self.unwrapped.extra_logs())
        self.tracker.log_metrics({**{f"train/{k}": v for k, v in metrics.items()},
                                  "perf/crops_per_s": crops_per_s, "perf/data_wait": data_wait}, step=self.step)
        if progress is not None:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", crops_s=f"{crops_per_s:.1f}",
                                 data_wait=f"{100 * data_wait:.0f}%")
        if self.accelerator.is_main_process:
            log.info("step %d/%d: loss %.4f, %.1f crops/s, %.0f%% of step time waiting for data", self.step,
                     cfg.train.num_steps, metrics["loss"], crops_per_s, 100 * data_wait)

    def _data_report(self) -> dict:
        """Damaged training records this run skipped, over all ranks (collective); logged, tracked and written
        to ``<output_dir>/damaged.json`` when there are any."""
        from dist_seg.data.shards import DamagedRecord, describe_damage, gather_damage

        report = gather_damage(getattr(self, "train_skips", None))
        if self.accelerator.is_main_process and (report["skipped_samples"] or report["damaged"]):
            path = Path(self.cfg.train.output_dir) / "damaged.json"
            path.write_text(json.dumps(report, indent=1) + "\n")
            log.warning("training skipped %d damaged records (%d shard errors): %s; listed in %s",
                        report["skipped_samples"], report["shard_errors"],
                        describe_damage([DamagedRecord(**r) for r in report["damaged"]]), path)
            self.tracker.log_metrics({"data/skipped_records": float(report["skipped_samples"])}, step=self.step)
        return report

    def _validate_and_select(self, final: bool = False) -> Optional[dict]:
        from dist_seg.eval.evaluate import save_reports, summary

        num_overlays = self.cfg.eval.num_overlays if final else 0
        result = self.validate(num_overlays=num_overlays)
        if result is None:
            return None
        scores = summary(result)
        if result["cluster"] is not None:
            self.assignment = list(result["cluster"]["assignment"])
        self.tracker.log_metrics({f"val/{k}": v for k, v in scores.items()}, step=self.step)
        if self.on_eval is not None:
            self.on_eval(self.step, {f"val/{k}": v for k, v in scores.items()})
        if "cluster_mIoU" in scores and scores["cluster_mIoU"] > self.best_miou:
            self.best_miou = scores["cluster_mIoU"]
            self.save_checkpoint(best=True)
        if final and self.accelerator.is_main_process:
            if result["cluster"] is not None:
                paths = save_reports(result, Path(self.cfg.train.output_dir) / "eval",
                                     class_names=self.info.class_names, colors=self.info.colors, name="final",
                                     step=self.step)
                for p in paths.values():
                    self.tracker.log_artifact(p, "eval")
            self.tracker.log_metrics({f"final/{k}": v for k, v in scores.items()}, step=self.step)
        return result


def configure_precision(cfg: RunConfig, device: torch.device) -> None:
    """Float32 matmul precision and determinism of this process, from ``cfg.train``.

    - ``allow_tf32`` (CUDA): TF32 for float32 matmuls and convolutions (the head, losses and probes when they
      run in float32). The exact KNN search turns it off around its own matmuls.
    - ``deterministic``: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN without
      benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (read by cuBLAS when the process creates its first
      handle, so :func:`~dist_seg.runtime.make_accelerator` sets it first). ``warn_only``: the probes'
      cross-entropy (``nll_loss2d``) has no deterministic CUDA kernel, so raising would forbid every run; it
      warns instead. The sampling of every method (``grid_sample``, whose CUDA backward accumulates with
      atomics) switches to a deterministic matrix form (:func:`dist_seg.methods.base.grid_sample`).
      docs/decisions.md (issue 19, C11) lists what remains nondeterministic.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if cfg.train.allow_tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


_NEVER = 1 << 62  # larger than any step


class _Window:
    """Steps and wall time since the last logging step (validation and checkpoints excluded)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.paused = 0.0


def _dataset_record(cfg: RunConfig) -> Optional[dict]:
    """The training data as the run's MLflow dataset input (None for a dataset without a manifest)."""
    from dist_seg.data.manifest import describe_dataset

    try:
        return describe_dataset(cfg.data.root) if cfg.tracking.enabled else None
    except (OSError, ValueError):
        return None


def _mean_over_ranks(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Means over ranks of scalars (floats or 0-dim tensors on any device), read with one device-to-host copy."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k]).detach().to(device=device, dtype=torch.float64).reshape(())
                     for k in keys])
    t = D.all_reduce_sum(t) / D.get_world_size()
    return dict(zip(keys, t.tolist()))


def train(cfg: RunConfig, accelerator=None, *, on_eval: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train (or resume) a run described by ``cfg``; returns final step, validation scores and metrics.

    ``on_eval(step, metrics)`` is called on the main process after every validation (Ray Tune reports
    through it). When no accelerator is given, one is built and ended here (``end_training`` in ``finally``); a caller
    that trains several models in one process builds one accelerator and passes it to each call.
    """
    own = accelerator is None
    accelerator = accelerator or make_accelerator(cfg)
    try:
        return Trainer(cfg, accelerator, on_eval=on_eval).fit()
    finally:
        if own:
            accelerator.end_training()


# ------------------------------------------------------------------------------------ recipes/CLI
def run_recipe(config_fn: Callable[[], RunConfig], argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of every recipe file: ``accelerate launch recipes/X.py [--config f.yaml] [k=v ...]``."""
    previous = catch_stop_signals_early()  # a SIGTERM during start-up stops the run at its first check
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = resolve_config(config_fn(), argv)
        accelerator = make_accelerator(cfg)
        # Read before end_training(): once the process group is gone every rank reports itself as rank 0.
        is_main = accelerator.is_main_process
        try:
            result = train(cfg, accelerator)
        finally:
            accelerator.end_training()
    except (ConfigError, FileNotFoundError, TrainingError, CheckpointError, DataError, OutputDirBusy) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        restore_signal_handlers(previous)
    if result.get("stopped"):
        return RESUMABLE_EXIT  # checkpointed after SIGTERM/SIGUSR1: the same command resumes
    val = result.get("val")
    if is_main and val:
        from dist_seg.eval.evaluate import format_table

        if val.get("cluster") is not None:
            print(format_table({cfg.method: val}, title=f"validation after {result['step']} steps"))
        if val.get("label_free") is not None:
            print(f"label-free score (feature silhouette of the predicted clusters): {val['label_free']:.4f}")
    return 0


def _one_line(err: BaseException) -> str:
    # A loader worker's error arrives with the worker's traceback in its message; its last line is the error.
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith("dist_seg.") and ": " in last else last


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config_fn = load_recipe(args.recipe)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_recipe(config_fn, recipe_argv(args))


def train_baseline(base: RunConfig, kind: str, *, crf: bool = False, accelerator=None) -> dict:
    """Fit a backbone-feature baseline's probes on the training split and evaluate it (SPEC §5)."""
    cfg = merge(base, overrides=[
        "method=baseline", f"baseline.kind={kind}", f"baseline.dim={_head_dim(base)}",
        f"train.output_dir={Path(base.train.output_dir) / ('baseline-' + kind)}", "train.resume=false",
        f"eval.crf={str(crf).lower()}", f"tracking.run_name=baseline-{kind}",
    ])
    own = accelerator is None
    accelerator = accelerator or make_accelerator(cfg)
    try:
        trainer = Trainer(cfg, accelerator)
        result = trainer.fit()
        result["info"] = trainer.info
        return result
    finally:
        if own:
            accelerator.end_training()


def _head_dim(cfg: RunConfig) -> int:
    return cfg.ds2dl.dim if cfg.method == "ds2dl" else cfg.stego.dim
