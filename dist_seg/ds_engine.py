"""DeepSpeed ZeRO-2 for a dist_seg :class:`~dist_seg.methods.base.Method` and its own optimiser.

The trainer's Accelerate path covers one process, DDP and multi-node runs. This module is the DeepSpeed
path: :class:`DeepSpeedEngine` hands the method and the optimiser it built (named parameter groups, per-group
learning rates) to ``deepspeed.initialize`` with ZeRO stage 2, so optimiser states and gradients are
partitioned over the data-parallel ranks while every rank keeps the full parameters (``after_step`` and
``state_dict`` of the method keep working on ``engine.module``).

It is driven directly rather than through Accelerate's DeepSpeed plugin: with accelerate 1.15 and DeepSpeed
0.19 that plugin needs ``transformers`` installed even for ZeRO-2, and ``Accelerator(cpu=True)`` silently drops
it, so that route cannot be exercised without a GPU; ``deepspeed.initialize`` runs ZeRO-2 on CPU over gloo
(DeepSpeed's CPU accelerator), which is how the tests check it. Any launcher works (the DDP accelerate
configs, ``torchrun``, ``deepspeed``), and so does a plain ``python`` process. The JSON config
(``launch/deepspeed_zero2.json``, selected by ``train.deepspeed_config``) uses Accelerate-style ``"auto"``
values; :func:`resolve_ds_config` fills them in. Accelerate's own DeepSpeed route (a launch config with
``distributed_type: DEEPSPEED``) is refused by :func:`dist_seg.runtime.make_accelerator`: it needs a
DataLoader in ``prepare`` and turns ``accelerator.autocast()`` into a no-op (docs/scaling.md).

Typical use (one process per device, started by ``accelerate launch``, ``torchrun`` or ``deepspeed``)::

    engine = DeepSpeedEngine(method, method.build_optimizer(), "launch/deepspeed_zero2.json",
                             micro_batch_size=local_batch, mixed_precision="bf16", gradient_clipping=1.0)
    loss, logs = engine.forward(batch, ctx)
    engine.backward(loss)
    engine.step()                      # optimiser step (with clipping) and zero_grad
    engine.module.after_step()
    engine.save("runs/x/ds_checkpoints", "step-00000100", {"step": 100})   # collective

DeepSpeed 0.19 reads its own checkpoint files with ``torch.load(..., weights_only=False)`` (its
``TorchCheckpointEngine``). The engine built here swaps that loader for one that reads with
``weights_only=True``, allowing only the four record classes DeepSpeed's ZeRO-1/2 files hold besides tensors
and plain values (:data:`DEEPSPEED_SAFE_GLOBALS`); a shard that needs anything else is refused with a
one-line error instead of being unpickled (docs/scaling.md, "What is trusted").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any, Optional

import torch

from dist_seg import distributed as D
from dist_seg.checkpoints import file_digests, load_weights_only
from dist_seg.methods.base import Batch, Method, StepContext

__all__ = ["DEEPSPEED_SAFE_GLOBALS", "DeepSpeedEngine", "resolve_ds_config"]

# Classes, by import path, that DeepSpeed's ZeRO stage 0-2 checkpoint files pickle besides tensors and plain
# values (read off files written by deepspeed 0.19 on CPU): plain records whose unpickling only sets attributes.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

# Keys of our client state inside DeepSpeed's checkpoint dict: one key, so the caller's names ("step",
# "optimizer", ...) can never collide with DeepSpeed's own entries, and load() returns exactly what save() got.
_CLIENT_KEY = "dist_seg_client_state"
_MIXED_PRECISION = ("no", "bf16", "fp16")


def _load_json(config: dict | str | os.PathLike) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path} (see launch/deepspeed_zero2.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from None


def resolve_ds_config(
    config: dict | str | os.PathLike,
    *,
    micro_batch_size: Optional[int] = None,
    gradient_clipping: Optional[float] = None,
    mixed_precision: str = "no",
    device_type: str = "cuda",
) -> dict:
    """A DeepSpeed config ready for ``deepspeed.initialize`` with a dist_seg method and its optimiser.

    Accelerate-style ``"auto"`` values are filled in: the micro batch from ``micro_batch_size`` (1 when not
    given: DeepSpeed uses it only for throughput reports, since the trainer feeds batches itself),
    ``train_batch_size`` from micro batch × ranks, gradient accumulation 1, ``gradient_clipping`` from the
    argument (0 = off), ``bf16``/``fp16`` from ``mixed_precision``. A ``gradient_clipping`` argument
    overrides the file. ZeRO stage defaults to 2.

    Args:
        config: a dict or the path of a JSON file.
        micro_batch_size: rows per rank and step (the trainer's local batch).
        gradient_clipping: max global gradient norm, or None to keep the config's value.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (the run's ``train.mixed_precision``).
        device_type: DeepSpeed's accelerator (``"cuda"``, ``"cpu"``, ...): fp16 is refused on CPU (bf16 runs there).

    Raises:
        ValueError: settings this wrapper cannot honour (ZeRO-3, an optimizer or scheduler section,
            gradient accumulation, fp16 on CPU), with the fix in the message.
    """
    cfg = _load_json(config)
    if mixed_precision not in _MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {_MIXED_PRECISION}, got {mixed_precision!r}")
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(
                f"the DeepSpeed config has an '{section}' section, but the method builds its own optimiser "
                f"(named parameter groups with their own learning rates): remove '{section}' from the config")
    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", 2)
    if stage not in (0, 1, 2):
        raise ValueError(
            f"zero_optimization.stage={stage} is not supported: stage 3 partitions the parameters themselves, "
            f"which the methods' after_step/state_dict and the evaluation code do not expect; use stage 2")

    accum = cfg.get("gradient_accumulation_steps", "auto")
    if accum == "auto":
        accum = cfg["gradient_accumulation_steps"] = 1
    if accum != 1:
        raise ValueError("gradient_accumulation_steps must be 1: data.batch_size is the global batch of one "
                         "optimiser step; raise it instead (see docs/scaling.md)")
    micro = cfg.get("train_micro_batch_size_per_gpu", "auto")
    if micro == "auto":
        cfg["train_micro_batch_size_per_gpu"] = int(micro_batch_size or 1)
    elif micro_batch_size is not None and int(micro) != int(micro_batch_size):
        raise ValueError(f"train_micro_batch_size_per_gpu={micro} in the DeepSpeed config but the local batch is "
                         f"{micro_batch_size}: set it to \"auto\"")
    # DeepSpeed derives the global batch from micro batch × accumulation × ranks; a fixed value would have
    # to be kept in step with the number of processes by hand.
    if cfg.get("train_batch_size") == "auto":
        del cfg["train_batch_size"]

    if gradient_clipping is not None:
        cfg["gradient_clipping"] = float(gradient_clipping)
    elif cfg.get("gradient_clipping") == "auto":
        cfg["gradient_clipping"] = 0.0

    for key in ("bf16", "fp16"):
        section = cfg.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = mixed_precision == key
    if device_type == "cpu" and cfg["fp16"]["enabled"]:
        # DeepSpeed's CPU accelerator runs bf16 (its ZeRO-2 master copy and casts are what the tests check);
        # fp16 with loss scaling is a GPU path.
        raise ValueError("fp16 is enabled in the DeepSpeed config but DeepSpeed is running on CPU: use "
                         "train.mixed_precision=bf16 or train.mixed_precision=no (or \"enabled\": \"auto\")")
    # ZeRO splits each flattened parameter group across ranks, which is exact for element-wise optimisers
    # (Adam, AdamW, RAdam, SGD); DeepSpeed lists only some of them and asks for this flag for the others.
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own step lines are noise
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_process_group() -> None:
    """Make sure ``deepspeed.initialize`` finds a process group it can use.

    Launched processes (``accelerate launch``, ``torchrun``, ``deepspeed``) carry ``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK`` and DeepSpeed initialises from them with its accelerator's backend (nccl on GPUs, gloo on
    CPU); an existing torch process group (Accelerate's) is reused. A plain ``python`` process has neither:
    DeepSpeed would try MPI discovery and then insist on ``LOCAL_RANK``, so it is described as rank 0 of 1
    on localhost, which is what a one-process launcher would export.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized() or "RANK" in os.environ:
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)


def _skip_cpu_shm_kernel() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce kernel.

    On its first use, DeepSpeed's CPU communication backend JIT-compiles ``deepspeed_shm_comm`` with g++ and
    ninja (over a minute on a small machine). That kernel only serves ``inference_all_reduce``; training
    collectives go through gloo either way. ``deepspeed.ops.__compatible_ops__`` is the table DeepSpeed
    consults before building an op, so marking the op incompatible there skips the build.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _safe_globals() -> list[type]:
    import importlib

    found = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: a file needing it is refused
            continue
    return found


def _weights_only_checkpoint_engine(config):
    """DeepSpeed's torch checkpoint engine with its ``load`` reading ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location=map_location, allowed_globals=_safe_globals(),
                                     expected="a DeepSpeed checkpoint shard written by `dist-seg train`",
                                     refused_hint="a ZeRO shard written by dist_seg holds only tensors, plain values "
                                                  "and dist_seg.ds_engine.DEEPSPEED_SAFE_GLOBALS, so this one was "
                                                  "written by something else (or by another DeepSpeed version): "
                                                  "delete this step's checkpoint (its step-*.pt file and deepspeed/ "
                                                  "folder) to resume from an earlier one")

    return WeightsOnlyCheckpointEngine(config)


class DeepSpeedEngine:
    """A :class:`Method` and its optimiser under DeepSpeed ZeRO (stage 2 by default).

    Args:
        method: the method (an ``nn.Module``); it is moved to DeepSpeed's device.
        optimizer: the method's own optimiser (``method.build_optimizer()``): its parameter groups, with
            their names and learning rates, are kept; ZeRO partitions their states over the ranks.
        config: DeepSpeed config dict or JSON path (``launch/deepspeed_zero2.json``); see
            :func:`resolve_ds_config` for how ``"auto"`` values are filled.
        gradient_clipping: max global gradient norm applied inside :meth:`step` (ZeRO holds only a shard of
            the gradients on each rank, so clipping must be DeepSpeed's); None keeps the config's value.
        micro_batch_size: rows per rank and step, for DeepSpeed's bookkeeping.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (fp16 on GPUs only).

    Attributes:
        engine: the ``deepspeed.DeepSpeedEngine``.
        optimizer: DeepSpeed's ZeRO optimiser; ``optimizer.param_groups`` are the method's named groups
            (read or set ``lr`` there).
        config: the resolved DeepSpeed config.
    """

    def __init__(self, method: Method, optimizer: torch.optim.Optimizer, config: dict | str | os.PathLike, *,
                 gradient_clipping: Optional[float] = None, micro_batch_size: Optional[int] = None,
                 mixed_precision: str = "no") -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        own = {id(p) for p in method.parameters()}
        if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimiser holds parameters that are not the method's: pass the optimiser built "
                             "by this method (method.build_optimizer())")
        self.config = resolve_ds_config(config, micro_batch_size=micro_batch_size,
                                        gradient_clipping=gradient_clipping, mixed_precision=mixed_precision,
                                        device_type=get_accelerator().device_name())
        _skip_cpu_shm_kernel()
        _ensure_process_group()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=method, optimizer=optimizer,
                                                                 config=self.config)
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        if type(self.engine.checkpoint_engine) is not TorchCheckpointEngine:
            raise ValueError(f"the DeepSpeed config selects the {type(self.engine.checkpoint_engine).__name__}; "
                             f"dist_seg reads DeepSpeed checkpoints only through the default torch engine, with "
                             f"weights_only=True: remove the 'checkpoint' writer / 'datastates' settings")
        # DeepSpeed's own loader unpickles with weights_only=False; ours builds nothing but tensors, plain
        # values and DEEPSPEED_SAFE_GLOBALS.
        self.engine.checkpoint_engine = _weights_only_checkpoint_engine(self.engine._config)
        self._dtype = next(self.engine.module.parameters()).dtype

    # -- the method --------------------------------------------------------------------------------
    @property
    def module(self) -> Method:
        """The unwrapped method (full parameters on every rank under ZeRO-2)."""
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def global_steps(self) -> int:
        """Optimiser steps taken (restored by :meth:`load`)."""
        return int(self.engine.global_steps)

    def train(self, mode: bool = True) -> DeepSpeedEngine:
        self.engine.train(mode)
        return self

    def eval(self) -> DeepSpeedEngine:
        return self.train(False)

    def parameters(self):
        return self.engine.module.parameters()

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's ``state_dict`` with every parameter taken from DeepSpeed's float32 master copy.

        With bf16/fp16 the module holds half-precision weights for the forward pass, while ZeRO keeps the
        float32 master weights partitioned over the ranks; DeepSpeed's ``safe_get_full_fp32_param`` assembles
        each one (an all-reduce over the data-parallel group). Without a master copy (fp32 runs) the parameter
        itself is used. Floating buffers are returned in float32 (DeepSpeed 0.19 keeps them so already).

        Collective: every rank must call it.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        state = self.module.state_dict()
        for name, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            state[name] = (param.detach() if full is None else full).to(device=param.device, dtype=torch.float32)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def _cast(self, batch: Batch) -> Batch:
        # With DeepSpeed's bf16/fp16 the weights themselves are half precision, and the caller casts inputs.
        if self._dtype == torch.float32:
            return batch
        changes = {f.name: getattr(batch, f.name).to(self._dtype) for f in dataclasses.fields(batch)
                   if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).is_floating_point()}
        return dataclasses.replace(batch, **changes)

    # -- one step ----------------------------------------------------------------------------------
    def forward(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's training loss on this rank's part of the global batch: ``(loss, logs)``."""
        return self.engine(self._cast(batch), ctx)

    __call__ = forward

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate; ZeRO-2 reduce-scatters gradient buckets to their owning ranks as they fill."""
        self.engine.backward(loss)

    def step(self) -> None:
        """Clip (if configured), take the optimiser step on each rank's shard, all-gather the updated
        parameters and zero the gradients."""
        self.engine.step()

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, ckpt_dir: str | os.PathLike, tag: str, client_state: Optional[dict[str, Any]] = None) -> Path:
        """Write a DeepSpeed checkpoint ``ckpt_dir/tag`` (parameters, every rank's optimiser shard,
        ``client_state``) and point ``ckpt_dir/latest`` at it.

        Collective: every rank must call it with the same ``ckpt_dir`` and ``tag``, on a filesystem all ranks
        share (each rank writes its own optimiser shard). DeepSpeed stores ``client_state`` in rank 0's file
        only, so :meth:`load` gives every rank rank 0's copy: gather per-rank values (RNG states) into it
        first, e.g. with ``dist_seg.distributed.all_gather_object``.
        """
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={_CLIENT_KEY: dict(client_state or {})})
        return Path(ckpt_dir) / tag

    def file_digests(self, ckpt_dir: str | os.PathLike, tag: str) -> dict[str, dict[str, Any]]:
        """Size and SHA-256 of every file of checkpoint ``ckpt_dir/tag`` (after :meth:`save`), for the run's
        checkpoint to record (:func:`dist_seg.checkpoints.verify_files` checks them before a resume).

        Collective: each rank hashes its share of the files and every rank gets the whole record.
        """
        D.barrier()  # every rank's shard is on disk before anyone lists the folder
        part = file_digests(Path(ckpt_dir) / tag, part=(D.get_rank(), D.get_world_size()))
        return {name: entry for piece in D.all_gather_object(part) for name, entry in sorted(piece.items())}

    def load(self, ckpt_dir: str | os.PathLike, tag: Optional[str] = None) -> dict[str, Any]:
        """Restore parameters, optimiser shards and step count; return the ``client_state`` given to :meth:`save`.

        Collective. ``tag=None`` loads the checkpoint named in ``ckpt_dir/latest``. The run must have the
        same number of ranks as the one that saved it (each rank reads its own optimiser shard).

        Raises:
            FileNotFoundError: no such checkpoint.
        """
        ckpt_dir = Path(ckpt_dir)
        if tag is None and not (ckpt_dir / "latest").is_file():
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {ckpt_dir} (no 'latest' file): pass tag= or "
                                    f"check the path")
        if tag is not None and not (ckpt_dir / tag).is_dir():
            raise FileNotFoundError(f"no DeepSpeed checkpoint {ckpt_dir / tag}")
        path, client = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load a checkpoint from {ckpt_dir} (tag={tag!r})")
        return dict(client.get(_CLIENT_KEY, {}))
