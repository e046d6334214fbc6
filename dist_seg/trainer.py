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
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Optional

import torch

from dist_seg import distributed as D
from dist_seg.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from dist_seg.config import ConfigError, RunConfig, merge, save_config, to_dict
from dist_seg.features import DataInfo, check_feature_cache, read_data_info  # noqa: F401  (re-exported)
from dist_seg.methods import build_method, method_class
from dist_seg.methods.base import Batch, Method, StepContext

# What every stage needs to start lives in dist_seg.runtime; these names stay importable from here.
from dist_seg.runtime import (  # noqa: F401  (re-exported)
    add_recipe_arguments,
    default_cache_dir,
    load_recipe,
    make_accelerator,
    recipe_argv,
    resolve_config,
    setup_logging,
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
    """Newest checkpoint that loads; unreadable ones (half-written, corrupted) are skipped with a warning.

    Files are read with ``weights_only=True`` only (:func:`dist_seg.checkpoints.load_checkpoint`): a pickle
    dropped into the folder that would run code is skipped like a corrupted file, never executed.
    """
    for path in reversed(list_checkpoints(cfg)):
        try:
            return load_checkpoint(path), path
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, never fatal
            log.warning("skipping unreadable checkpoint %s (%s)", path, err)
    return None, None


def prune_checkpoints(cfg: RunConfig) -> None:
    keep = max(1, cfg.train.keep_last)
    for path in list_checkpoints(cfg)[:-keep]:
        path.unlink(missing_ok=True)
        # DeepSpeed never deletes its own tags: drop the ZeRO shards of pruned steps too.
        shutil.rmtree(checkpoint_dir(cfg) / "deepspeed" / path.stem, ignore_errors=True)


def load_method_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", overrides: Sequence[str] = (),
                           trust: bool = False) -> tuple[Method, RunConfig, dict]:
    """Rebuild a method from a checkpoint (its saved config, optionally overridden) for eval/predict.

    The file is read with ``weights_only=True``; ``trust=True`` (``--trust-checkpoint``) also reads an
    old-format pickle, which runs any code it holds. Every file that cannot be used raises a
    :class:`~dist_seg.checkpoints.CheckpointError` (a ``ValueError``) naming it.
    """
    import yaml

    from dist_seg.config import from_yaml

    path = Path(path)
    state = load_checkpoint(path, trust=trust)
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
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.train.seed + self.rank)
        self.images_in = method_class(cfg.method).inputs_of(cfg) == "images"
        if self.images_in and cfg.train.mode == "cached":
            raise ConfigError(f"method {cfg.method!r} trains on images, not cached features: set train.mode=online")
        self.info = read_data_info(cfg)
        self.backbone = None
        if not self.images_in and (cfg.train.mode == "online" or (self.info.has_val and not self.info.val_cached)):
            from dist_seg.backbones import load_backbone

            # The backbone runs its own autocast in this dtype (bf16/fp16 on GPUs, fp32 with "no").
            self.backbone = load_backbone(cfg.backbone.name, cfg.backbone.weights,
                                          allow_download=cfg.backbone.allow_download,
                                          dtype=cfg.train.mixed_precision).to(self.device)
        feat_dim = 3 if self.images_in else (self.info.feat_dim or self.backbone.embed_dim)
        method = build_method(cfg, feat_dim=feat_dim, num_classes=self.info.num_classes,
                              has_labels=self.info.has_train_labels)
        self.needs_partners = getattr(method, "needs_partners", True)
        self.knn = self._knn_indices() if self.needs_partners else None
        if self.needs_partners:
            from dist_seg.data.shards import IndexedShards

            # Partners are read by global index from the same shards the stream reads (no second copy).
            cached = cfg.train.mode == "cached"
            self._indexed = IndexedShards(self.info.cache if cached else cfg.data.root, cfg.data.train_split,
                                          res=cfg.data.res, decode="features" if cached else "image")
        if getattr(method, "needs_fit", False):
            method.fit(self._fit_features(getattr(method, "fit_samples", 2000)))
        optimizer = method.build_optimizer()
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
        self.step = 0
        self.best_miou = -math.inf
        self.assignment: Optional[list] = None  # cluster -> class matching of the latest validation
        self._stop_requested = False
        self.tracker = None

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
        """Up to ``num`` training feature vectors (pixels) for baselines that fit on data (PCA)."""
        loader, _ = self._loader(self.cfg.data.train_split, infinite=False, shuffle=False)
        rows, total = [], 0
        for batch in loader:
            f = batch["feat"].float() if "feat" in batch else self._features(batch["image"]).cpu()
            rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
            total += rows[-1].shape[0]
            if total >= num:
                break
        return torch.cat(rows)[:num]

    def _loader(self, split: str, *, infinite: bool, shuffle: bool, start_batch: int = 0, val: bool = False):
        from dist_seg.data.shards import make_loader

        # Validation reads the cache only when it holds the validation split (flipped views at eval_res).
        cached = self.cfg.train.mode == "cached" and (not val or self.info.val_cached)
        return make_loader(
            self.info.cache if cached else self.cfg.data.root, split,
            batch_size=self.local_batch, res=self.cfg.data.eval_res if val else self.cfg.data.res,
            num_workers=self.cfg.data.num_workers, seed=self.cfg.train.seed, shuffle=shuffle,
            infinite=infinite, start_batch=start_batch, shuffle_buffer=self.cfg.data.shuffle_buffer,
            decode="features" if cached else "image",
        )

    def _knn_indices(self) -> torch.Tensor:
        from dist_seg.knn_table import ensure_knn_table

        indices = ensure_knn_table(self.cfg, backbone=self.backbone, cache=self.info.cache, device=self.device)
        need = self.cfg.stego.num_neighbors
        if indices.shape[1] < need:
            raise ConfigError(f"the KNN table holds {indices.shape[1]} neighbours but stego.num_neighbors={need}")
        return indices[:, :need]

    def _partners(self, index: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Features of a KNN partner drawn uniformly from each anchor's first ``num_neighbors`` (SPEC §2)."""
        choice = torch.randint(self.knn.shape[1], (ctx.global_batch,), generator=ctx.generator("knn"))
        partner = self.knn[index.cpu(), ctx.local(choice)]
        fetched = self._indexed.get_batch(partner)
        if "feat" in fetched:
            return fetched["feat"].to(self.device).float()
        return self._features(fetched["image"])

    def _batches(self) -> Iterator[Batch]:
        own = self.unwrapped.train_batches(start_step=self.step, local_batch=self.local_batch, device=self.device)
        if own is not None:
            yield from own
            return
        from dist_seg.data.transforms import normalize

        cached = self.cfg.train.mode == "cached"
        loader, _ = self._loader(self.cfg.data.train_split, infinite=True, shuffle=True, start_batch=self.step)
        for raw in loader:
            label = raw["label"].to(self.device) if self.info.has_train_labels else None
            if self.images_in:
                yield Batch(images=normalize(raw["image"].to(self.device)), label=label, index=raw["index"])
                continue
            feats = raw["feat"].to(self.device).float() if cached else self._features(raw["image"])
            yield Batch(feats=feats, label=label, index=raw["index"])

    def _context(self) -> StepContext:
        return StepContext(step=self.step, seed=self.cfg.train.seed, rank=self.rank, world_size=self.world,
                           local_batch=self.local_batch)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "step": int(self.step),
            "method": self.unwrapped.state_dict(),
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
            self.engine.save(checkpoint_dir(self.cfg) / "deepspeed", f"step-{self.step:08d}")  # collective
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
        state, path = load_latest_checkpoint(self.cfg)
        # All ranks read the same folder; agree on the newest one rank 0 could load.
        step = D.broadcast_object(None if state is None else int(state["step"]))
        if step is None:
            return False
        if state is None or int(state["step"]) != step:
            state = load_checkpoint(checkpoint_dir(self.cfg) / f"step-{step:08d}.pt")
        self.load_state_dict(state)
        if self.accelerator.is_main_process:
            log.info("resumed from %s at step %d", path, self.step)
        return True

    # -- validation ------------------------------------------------------------------------------
    def validate(self, *, num_overlays: int = 0, crf: Optional[bool] = None) -> Optional[dict]:
        from dist_seg.eval.evaluate import validate_run

        return validate_run(self.unwrapped, self.cfg, self.info, device=self.device, local_batch=self.local_batch,
                            backbone=self.backbone, autocast=self.accelerator.autocast,
                            num_overlays=num_overlays, crf=crf)

    # -- the loop --------------------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("signal %d received: checkpointing at the end of step %d, then exiting", signum, self.step)
        self._stop_requested = True

    def fit(self) -> dict:
        from dist_seg.tracking import Tracker

        cfg = self.cfg
        out_dir = Path(cfg.train.output_dir)
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
        previous = signal.signal(signal.SIGTERM, self._request_stop) if _main_thread() else None
        status = "FAILED"
        try:
            result = self._loop()
            status = "FINISHED" if not self._stop_requested else "KILLED"
            return result
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.tracker.end(status)

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
        t0, steps_timed = time.perf_counter(), 0
        logs: dict[str, float] = {}
        while self.step < cfg.train.num_steps:
            batch = next(batches)
            ctx = self._context()
            # The global RNG (dropout) is re-seeded from (seed, step, rank) every step: a resumed run draws
            # exactly the masks of an uninterrupted one, whatever else consumed random numbers in between.
            torch.manual_seed(D.seeded_generator(cfg.train.seed, self.step, "torch", self.rank).initial_seed())
            if self.needs_partners:
                batch.partner_feats = self._partners(batch.index, ctx)
            self.unwrapped.before_step(self.step, self.optimizer)
            with self.accelerator.autocast():
                loss, logs = self.method(batch, ctx)
            finite = torch.tensor([float(torch.isfinite(loss).all())], device=self.device)
            if D.all_reduce_sum(finite).item() < self.world:
                raise TrainingError(f"non-finite loss ({loss.item()}) at step {self.step}: lower the learning rates, "
                                    f"enable train.grad_clip, or check the features (mixed precision overflow?)")
            self._optimise(loss)
            self.unwrapped.after_step()
            self.step += 1
            steps_timed += 1
            if progress is not None:
                progress.update(1)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.num_steps:
                elapsed = time.perf_counter() - t0
                metrics = {**_mean_over_ranks({"loss": float(loss.detach()), **logs}, self.device),
                           "crops_per_s": steps_timed * cfg.data.batch_size / max(elapsed, 1e-9),
                           **self.unwrapped.extra_logs()}
                self.tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=self.step)
                if progress is not None:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", crops_s=f"{metrics['crops_per_s']:.1f}")
                t0, steps_timed = time.perf_counter(), 0
            stop = D.broadcast_object(self._stop_requested)
            at_val_step = cfg.train.val_every and self.step % cfg.train.val_every == 0
            if at_val_step and self.step < cfg.train.num_steps and not stop:
                self._validate_and_select()
            if stop or (self.step % cfg.train.checkpoint_every == 0 and self.step < cfg.train.num_steps):
                self.save_checkpoint()
            if stop:
                self._stop_requested = True
                if progress is not None:
                    progress.close()
                log.warning("stopped at step %d after a termination signal; re-run the same command to resume",
                            self.step)
                return {"step": self.step, "stopped": True}
        if progress is not None:
            progress.close()
        # The final checkpoint comes after the final validation so it carries that cluster→class matching.
        result = self._validate_and_select(final=True) or {}
        self.save_checkpoint()
        return {"step": self.step, "stopped": False, "val": result,
                "metrics": summary(result) if result else {}}

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


def _dataset_record(cfg: RunConfig) -> Optional[dict]:
    """The training data as the run's MLflow dataset input (None for a dataset without a manifest)."""
    from dist_seg.data.manifest import describe_dataset

    try:
        return describe_dataset(cfg.data.root) if cfg.tracking.enabled else None
    except (OSError, ValueError):
        return None


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
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
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = resolve_config(config_fn(), argv)
        result = train(cfg)
    except (ConfigError, FileNotFoundError, TrainingError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    val = result.get("val")
    if D.is_main_process() and val:
        from dist_seg.eval.evaluate import format_table

        if val.get("cluster") is not None:
            print(format_table({cfg.method: val}, title=f"validation after {result['step']} steps"))
        if val.get("label_free") is not None:
            print(f"label-free score (feature silhouette of the predicted clusters): {val['label_free']:.4f}")
    return 0


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
