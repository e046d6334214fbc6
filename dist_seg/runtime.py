"""What every stage needs to start: logging, the Accelerator, loading a recipe, resolving a config.

Imported by the stages (``extract``, ``knn``, ``train``, ``eval``, ``sweep``, ...); it imports none of
them, so any stage can start without pulling in the trainer (see ARCHITECTURE.md, "Layout").
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Union

from dist_seg.config import ConfigError, RunConfig, merge

PathLike = Union[str, os.PathLike]
# Recipes shipped with the project (``recipes/`` beside the package), for names such as ``stego_toy``.
PROJECT_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The recipe a process last loaded: what MLflow records as the source of the runs it starts (mlflow.source.name).
SOURCE_ENV = "DIST_SEG_SOURCE"


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted, not the one of the
    first call: in-process callers that swap stderr (notebooks, pytest's capture) never get a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the current stderr always wins
        pass


def setup_logging() -> None:
    """Log ``dist_seg.*`` messages to stderr (once; later calls change nothing)."""
    if not logging.getLogger("dist_seg").handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger("dist_seg").addHandler(handler)
        logging.getLogger("dist_seg").setLevel(logging.INFO)


def make_accelerator(cfg: RunConfig):
    """The run's ``accelerate.Accelerator`` (device, processes, mixed precision, DDP settings).

    Stops with one ``error:`` line (:class:`LaunchError`, exit 2) instead of a silent CPU run when a GPU was
    asked for and CUDA is not usable, or when the launcher started more processes than joined the group
    (:func:`check_device_request`, :func:`check_process_group`).

    Raises:
        ConfigError: the process was started with Accelerate's own DeepSpeed plugin (a launch config with
            ``distributed_type: DEEPSPEED``), which dist_seg does not use (docs/scaling.md, "DeepSpeed ZeRO-2").
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError("this process was started with Accelerate's DeepSpeed plugin (distributed_type: DEEPSPEED), "
                          "which dist_seg does not use: launch with a DDP config and select DeepSpeed in the run, "
                          "e.g. accelerate launch --config_file launch/multi_gpu.yaml RECIPE "
                          "train.deepspeed_config=launch/deepspeed_zero2.json")
    if cfg.train.deterministic:
        # cuBLAS reads this when the process creates its first handle: set it before any CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    check_device_request(cfg)
    handlers = [
        # The safe default for a module the trainer knows nothing about; the trainer sets the method's own choice
        # (Method.find_unused_parameters) before it wraps the method.
        DistributedDataParallelKwargs(find_unused_parameters=True),
        # The start-up timeout (train.init_timeout_min) instead of torch's 10-minute NCCL default; the training
        # loop lowers it to train.step_timeout_s after its first step (HangWatch, below).
        InitProcessGroupKwargs(timeout=init_timeout(cfg)),
    ]
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cfg.train.device == "cpu",
                              kwargs_handlers=handlers)
    check_process_group(accelerator.num_processes)
    return accelerator


# ------------------------------------------------------------------------------- device refusals
class LaunchError(SystemExit):
    """The run cannot start as launched; the one-line reason was printed (by rank 0) as ``error: ...``.

    A ``SystemExit`` with code 2, so every stage stops the same way without a traceback, whatever it catches.
    """

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def _refuse(message: str, environ: Mapping[str, str]) -> None:
    if environ.get("RANK", "0") == "0":  # one line per launch, not one per process
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise LaunchError(message)


@dataclass(frozen=True)
class CudaFacts:
    """What decides whether CUDA is usable here (read by :func:`cuda_facts`; tests pass their own).

    Attributes:
        torch_version: ``torch.__version__``.
        cuda_build: the CUDA version torch was built for (``torch.version.cuda``; None for a CPU-only build).
        driver_cuda: the newest CUDA version the installed NVIDIA driver supports (``cuDriverGetVersion``,
            e.g. ``(12, 4)``); None when no driver library loads.
        available: ``torch.cuda.is_available()``.
        device_count: GPUs torch sees.
        visible_devices: ``CUDA_VISIBLE_DEVICES`` (None when unset).
    """

    torch_version: str
    cuda_build: Optional[str]
    driver_cuda: Optional[tuple[int, int]]
    available: bool
    device_count: int
    visible_devices: Optional[str]


def driver_cuda_version() -> Optional[tuple[int, int]]:
    """The newest CUDA version the NVIDIA driver supports, from ``libcuda``; None without a driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def driver_release() -> Optional[str]:
    """The NVIDIA driver's release (``580.159.03``) from NVML (``libnvidia-ml.so.1``); None without a driver."""
    import ctypes

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        buf = ctypes.create_string_buffer(96)
        ok = nvml.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(96)) == 0
        nvml.nvmlShutdown()
        return buf.value.decode() if ok else None
    except (OSError, AttributeError):
        return None


def cuda_facts() -> CudaFacts:
    """This process's :class:`CudaFacts`."""
    import torch

    available = torch.cuda.is_available()
    return CudaFacts(torch.__version__, torch.version.cuda, driver_cuda_version(), available,
                     torch.cuda.device_count() if available else 0, os.environ.get("CUDA_VISIBLE_DEVICES"))


def cuda_problem(facts: CudaFacts) -> Optional[str]:
    """Why CUDA is not usable, with the fix, in one sentence; None when it is."""
    if facts.available and facts.device_count > 0:
        return None
    guide = "docs/scaling.md, 'GPU install'"
    if facts.cuda_build is None:
        return (f"this torch ({facts.torch_version}) is a CPU-only build; install a CUDA build of torch that your "
                f"driver runs ({guide})")
    if facts.visible_devices is not None and facts.visible_devices.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={facts.visible_devices!r} hides every GPU; unset it or name the GPUs to use"
    if facts.driver_cuda is None:
        return ("no NVIDIA driver or GPU found on this machine (libcuda.so.1 does not load); run on a GPU machine, "
                "or on CPU drop train.device=cuda and launch with ACCELERATE_USE_CPU=1 (launch/cpu_2proc.yaml)")
    build = tuple(int(x) for x in facts.cuda_build.split(".")[:2])
    if facts.driver_cuda < build:
        have = f"{facts.driver_cuda[0]}.{facts.driver_cuda[1]}"
        if facts.driver_cuda[0] == build[0]:
            fix = f"update the NVIDIA driver to one for CUDA {facts.cuda_build}"
        elif facts.driver_cuda[0] == 12:
            fix = ("install torch built for CUDA 12 (pip install torch torchvision --index-url "
                   "https://download.pytorch.org/whl/cu128, or the cu12x index pytorch.org lists for your torch) "
                   "or update the driver to R580+ for CUDA 13")
        else:
            fix = (f"update the NVIDIA driver to one for CUDA {facts.cuda_build} (or install a torch built for "
                   f"CUDA {have})")
        return (f"the NVIDIA driver supports CUDA up to {have} but this torch ({facts.torch_version}) is built for "
                f"CUDA {facts.cuda_build}; {fix} ({guide})")
    return (f"torch.cuda.is_available() is False although the driver supports CUDA "
            f"{facts.driver_cuda[0]}.{facts.driver_cuda[1]} and torch is built for CUDA {facts.cuda_build}: no GPU "
            "is visible to this process (check nvidia-smi)")


def _truthy(value: Optional[str]) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def gpu_request(cfg: RunConfig, environ: Mapping[str, str]) -> Optional[str]:
    """Who asked for a GPU, in words, or None: ``train.device=cuda``, or a launcher given GPU ids.

    ``accelerate launch`` with ``launch/single_gpu.yaml`` sets ``ACCELERATE_USE_CPU=False`` and
    ``CUDA_VISIBLE_DEVICES`` to its ``gpu_ids``; the multi-process configs are caught by
    :func:`check_process_group` instead (their processes come up alone without CUDA).
    """
    if cfg.train.device == "cuda":
        return "train.device=cuda"
    if cfg.train.device == "auto" and "ACCELERATE_USE_CPU" in environ and not _truthy(environ["ACCELERATE_USE_CPU"]) \
            and environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
        return (f"the launcher asked for GPU {environ['CUDA_VISIBLE_DEVICES']} (gpu_ids, use_cpu: false, as in "
                "launch/single_gpu.yaml)")
    return None


def _launched(environ: Mapping[str, str]) -> int:
    try:
        return int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _partial_group_message(launched: int, group: int, problem: Optional[str]) -> str:
    cause = (f"CUDA is not usable ({problem}), so each process runs alone" if problem else
             "the processes did not join one process group")
    return (f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this one runs in a process "
            f"group of {group}: {cause}. Fix: on a machine without GPUs launch with ACCELERATE_USE_CPU=1 "
            "(ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/cpu_2proc.yaml ...); with GPUs, make "
            f"{launched} GPUs visible (nvidia-smi, launch/check_ranks.py)")


def check_device_request(cfg: RunConfig, *, facts: Optional[CudaFacts] = None,
                         environ: Optional[Mapping[str, str]] = None) -> None:
    """Refuse (one ``error:`` line, :class:`LaunchError`) when a GPU was asked for and CUDA is not usable.

    A GPU is asked for by ``train.device=cuda``, by a launcher given GPU ids (:func:`gpu_request`), and by a
    multi-process launch without ``ACCELERATE_USE_CPU=1`` (``WORLD_SIZE>1``, e.g. ``launch/multi_gpu.yaml``):
    without CUDA its processes would come up alone, N independent runs writing one output folder. Under
    ``train.device=auto`` with no GPU request, a CUDA build of torch on a machine whose NVIDIA driver cannot
    run it still runs on the CPU, but says so (a warning naming both versions).
    """
    import torch.distributed as dist

    environ = os.environ if environ is None else environ
    asked = gpu_request(cfg, environ)
    launched = _launched(environ)
    multi = (launched > 1 and cfg.train.device != "cpu" and not _truthy(environ.get("ACCELERATE_USE_CPU"))
             and not (dist.is_available() and dist.is_initialized()))
    if asked is None and not multi and cfg.train.device != "auto":
        return
    facts = facts or cuda_facts()
    problem = cuda_problem(facts)
    if problem is None:
        return
    if asked is not None:
        _refuse(f"{asked}, but CUDA is not usable: {problem}", environ)
    if multi:
        _refuse(_partial_group_message(launched, 1, problem), environ)
    gpu_machine = facts.driver_cuda is not None and facts.cuda_build is not None
    if gpu_machine and not _truthy(environ.get("ACCELERATE_USE_CPU")):
        logging.getLogger("dist_seg").warning("running on the CPU: %s (set train.device=cuda to make this an error)",
                                              problem)


def check_process_group(num_processes: int, *, environ: Optional[Mapping[str, str]] = None,
                        facts: Optional[CudaFacts] = None) -> None:
    """Refuse when the launcher started ``WORLD_SIZE`` processes but this one joined a group of another size.

    That is what ``accelerate launch --config_file launch/multi_gpu.yaml`` gives on a machine without usable
    GPUs: N independent one-process runs writing one output folder, with wrong numbers.
    """
    environ = os.environ if environ is None else environ
    launched = _launched(environ)
    if launched <= 1 or num_processes == launched:
        return
    _refuse(_partial_group_message(launched, num_processes, cuda_problem(facts or cuda_facts())), environ)


def default_cache_dir(cfg: RunConfig) -> str:
    """Where ``dist-seg extract`` writes the feature cache when ``data.feature_cache`` is not set."""
    return str(Path(cfg.data.root) / "features" / f"{cfg.backbone.name}_{cfg.data.res}")


def recipe_candidates(path_or_name: PathLike, *, search: Iterable[PathLike] = ()) -> list[Path]:
    """The files ``load_recipe`` tries, in order.

    A path (``recipes/stego_toy.py``) is tried against each folder of ``search`` (a relative path in a sweep
    file means the sweep file's folder, then its project root), then as given (the working directory). A bare
    name (``stego_toy``) is looked up as ``recipes/<name>.py`` in the same places, then among the project's
    shipped recipes.
    """
    text = os.fspath(path_or_name)
    path = Path(text)
    bases = [Path(b) for b in search]
    if path.suffix:
        if path.is_absolute():
            return [path]
        tried = [b / path for b in bases] + [path]
    else:
        rel = Path("recipes") / f"{text}.py"
        tried = [b / rel for b in bases] + [rel, PROJECT_RECIPES / f"{text}.py"]
    unique: list[Path] = []
    for p in tried:
        if p not in unique:
            unique.append(p)
    return unique


def load_recipe(path_or_name: PathLike, *, search: Iterable[PathLike] = ()) -> Callable[[], RunConfig]:
    """The ``config()`` function of a recipe file (``recipes/stego_toy.py``) or name (``stego_toy``).

    Args:
        path_or_name: a recipe file or the name of one.
        search: folders to resolve a relative path against before the working directory (see
            :func:`recipe_candidates`).

    Raises:
        ConfigError: no such recipe (the message lists every place tried), or it defines no ``config()``.
    """
    candidates = recipe_candidates(path_or_name, search=search)
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        places = ", ".join(str(c if c.is_absolute() else Path.cwd() / c) for c in candidates)
        raise ConfigError(f"recipe not found: {os.fspath(path_or_name)} (tried {places}; give a path such as "
                          f"recipes/stego_toy.py)")
    spec = importlib.util.spec_from_file_location(f"dist_seg_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"{path} defines no config() function")
    os.environ[SOURCE_ENV] = str(path.resolve())
    return module.config


def resolve_config(base: RunConfig, argv: Sequence[str]) -> RunConfig:
    """``--config a.yaml`` files and ``key=value`` overrides from ``argv`` merged onto ``base``."""
    yaml_files, overrides = [], []
    it = iter(argv)
    for item in it:
        if item == "--config":
            yaml_files.append(next(it))
        elif item.startswith("--config="):
            yaml_files.append(item.split("=", 1)[1])
        else:
            overrides.append(item[2:] if item.startswith("--") else item)
    return merge(base, yaml_files=yaml_files, overrides=overrides)


def add_recipe_arguments(parser, *, overrides_help: str = "config overrides key.sub=value") -> None:
    """``RECIPE``, ``--config FILE.yaml`` (repeatable) and trailing ``key=value`` overrides.

    The arguments of every recipe-driven command (``train``, ``extract``, ``knn``, the MaskDistill stages);
    :func:`config_from_args` turns them into the run config.
    """
    parser.add_argument("recipe", help="recipe file or name, e.g. recipes/stego_toy.py or stego_toy")
    parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="YAML config merged onto the recipe before the overrides (repeatable)")
    parser.add_argument("overrides", nargs="*", help=overrides_help)


def recipe_argv(args) -> list[str]:
    """``--config`` files and overrides of :func:`add_recipe_arguments` as one argv for :func:`resolve_config`."""
    return [item for path in args.config for item in ("--config", path)] + list(args.overrides)


def config_from_args(args) -> RunConfig:
    """The recipe named by ``args.recipe`` with ``args.config`` files and ``args.overrides`` merged on top."""
    return resolve_config(load_recipe(args.recipe)(), recipe_argv(args))


# ------------------------------------------------------------------------------- timeouts and hang detection
# Two timeouts (docs/scaling.md, "A rank hangs"). Start-up (process-group set-up, the KNN table, the first step)
# and the pauses of the loop (validation, checkpoints) run under ``train.init_timeout_min``: slow nodes and a rank
# working alone are normal there. Training steps after the first run under ``train.step_timeout_s``: a collective
# that waits that long means a rank stopped. torchtitan's defaults for the same pair are 300 s and 100 s
# (``comm.init_timeout_seconds``, ``comm.train_timeout_seconds``).
HEARTBEAT_DIR = "heartbeat"


def init_timeout(cfg: RunConfig) -> timedelta:
    """The start-up timeout (``train.init_timeout_min``)."""
    return timedelta(minutes=cfg.train.init_timeout_min)


def set_collective_timeout(timeout: timedelta) -> bool:
    """Set the timeout of every later collective of the default process group; False without a group.

    gloo applies it to each collective it starts; NCCL's watchdog aborts the process when one exceeds it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    if hasattr(dist, "set_timeout"):  # torch >= 2.8
        dist.set_timeout(timeout)
    else:
        dist.distributed_c10d._set_pg_timeout(timeout)
    return True


def is_collective_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective that gave up waiting for another rank (gloo's or NCCL's timeout)."""
    import torch.distributed as dist

    text = str(err).lower()
    if "timed out" not in text and "timeout" not in text:
        return False
    # gloo raises a plain RuntimeError from its transport ("[.../gloo/transport/tcp/...] Timed out waiting ...");
    # other timeouts (a DataLoader's, a store's) are not a peer that stopped.
    return isinstance(err, getattr(dist, "DistBackendError", ())) or "gloo" in text or "nccl" in text


class HangWatch:
    """Names the rank that stopped making progress, and switches the collective timeout between phases.

    Every rank runs a daemon thread that writes a heartbeat (its pid, host, the step it last finished, what
    its loop is doing) to ``<output_dir>/heartbeat/rank-NNNNN.json`` every few seconds and reads the others'.
    A rank whose heartbeat stops changing (the process is frozen: SIGSTOP, a swapped-out node, a stuck
    driver call holding the GIL) or whose step stays behind while its loop sits in one activity is named in a
    warning after half the current timeout, so the line is in the log before the collective timeout (gloo's
    exception, NCCL's watchdog) tears the job down; :meth:`describe` says the same for the error message.

    The loop tells it where it is: :meth:`reached` after each step (the first call lowers the collective
    timeout from ``train.init_timeout_min`` to ``train.step_timeout_s``), :meth:`activity` before waiting for
    data, and :meth:`relaxed` around validation and checkpoints (back to the start-up timeout meanwhile).

    Args:
        cfg: the run's config (timeouts, ``train.output_dir``).
        rank: this process's rank.
        world: number of ranks.
    """

    def __init__(self, cfg: RunConfig, *, rank: int, world: int) -> None:
        import socket
        import threading

        self.rank, self.world = rank, world
        self.init_s = cfg.train.init_timeout_min * 60.0
        self.step_s = cfg.train.step_timeout_s
        self.folder = Path(cfg.train.output_dir) / HEARTBEAT_DIR
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.interval = min(max(self.step_s / 10.0, 0.5), 15.0)
        self.step: Optional[int] = None  # last finished step (None: not one yet)
        self.doing = "starting"
        self.guarded = False  # the short timeout is in force
        self._seq = 0
        self._step_changed = time.monotonic()
        self._seen: dict[int, tuple[int, float, dict]] = {}  # rank -> (seq, when it last changed, heartbeat)
        self._warned: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dist_seg-hang-watch", daemon=True)
        self._log = logging.getLogger("dist_seg.runtime")

    # -- what the loop calls ------------------------------------------------------------------------
    def start(self) -> HangWatch:
        """Start the heartbeat thread (after the ranks agreed the folder is clear, see :meth:`clear`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread.start()
        return self

    def clear(self) -> None:
        """Remove heartbeats left by an earlier run of this ``output_dir`` (rank 0, before a barrier)."""
        for path in self.folder.glob("rank-*.json"):
            path.unlink(missing_ok=True)

    def reached(self, step: int) -> None:
        """A training step finished; the first one switches collectives to the training-loop timeout."""
        self.step = step
        self._step_changed = time.monotonic()
        if not self.guarded:
            self._guard(True)

    def activity(self, what: str) -> None:
        """What the loop does now (``"waiting for data"``, ``"training step"``), shown in the reports."""
        self.doing = what

    def relaxed(self, what: str):
        """Context manager: the start-up timeout for a pause of the loop (validation, a checkpoint)."""
        import contextlib

        @contextlib.contextmanager
        def pause():
            was, before = self.guarded, self.doing
            self.doing = what
            if was:
                self._guard(False)
            try:
                yield
            finally:
                self.doing = before
                if was:
                    self._guard(True)

        return pause()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 1)

    # -- reports -------------------------------------------------------------------------------------
    def stalled(self) -> list[tuple[int, str]]:
        """``(rank, why)`` for every rank that looks stopped now.

        A rank whose heartbeat has not changed for half the current timeout is frozen. Otherwise, when this
        rank has finished no step for that long in the training loop, the ranks that are behind it or doing
        something else (waiting for data while the others wait in a collective of the next step) are named.
        """
        now = time.monotonic()
        limit = (self.step_s if self.guarded else self.init_s) / 2
        found = []
        for rank, (_, changed, beat) in sorted(self._seen.items()):
            if rank != self.rank and now - changed > limit:
                found.append((rank, f"rank {rank} ({beat.get('host')}, pid {beat.get('pid')}) stopped responding: "
                                    f"no heartbeat for {now - changed:.0f} s (the last one said: step "
                                    f"{beat.get('step')} finished, {beat.get('doing')})"))
        if found or not self.guarded or now - self._step_changed <= limit:
            return found
        for rank, (_, _, beat) in sorted(self._seen.items()):
            step = beat.get("step")
            if rank != self.rank and ((step is not None and step < self.step) or beat.get("doing") != self.doing):
                found.append((rank, f"rank {rank} ({beat.get('host')}, pid {beat.get('pid')}) makes no progress: "
                                    f"it last finished step {step} and is {beat.get('doing')}, while rank "
                                    f"{self.rank} finished step {self.step} {now - self._step_changed:.0f} s ago "
                                    f"and is {self.doing}"))
        return found

    def describe(self) -> str:
        """One sentence naming the stalled rank(s), or saying that none could be named."""
        found = self.stalled()
        if found:
            return "; ".join(why for _, why in found)
        if len(self._seen) < self.world:
            return (f"no rank could be named (heartbeats of {len(self._seen)} of {self.world} ranks seen in "
                    f"{self.folder}: is train.output_dir on a filesystem all nodes share?)")
        return "every rank's heartbeat is recent: a rank may be stuck inside a collective or a device call"

    def timeout_message(self, err: BaseException) -> str:
        """The error of a collective that timed out in the training loop: who stalled, what to do."""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        limit = f"train.step_timeout_s={self.step_s:g}" if self.guarded else \
            f"train.init_timeout_min={self.init_s / 60:g}"
        return (f"a collective on rank {self.rank} timed out after step {self.step} ({limit}; {first[:160]}): "
                f"{self.describe()}. Stop that process (or its node) if it is still there and re-run the same "
                "command to resume from the last checkpoint; raise the timeout if a step legitimately takes "
                "that long")

    # -- the thread ----------------------------------------------------------------------------------
    def _guard(self, on: bool) -> None:
        self.guarded = on
        set_collective_timeout(timedelta(seconds=self.step_s if on else self.init_s))

    def _beat(self) -> None:
        import json

        self._seq += 1
        beat = {"rank": self.rank, "host": self.host, "pid": self.pid, "seq": self._seq, "step": self.step,
                "doing": self.doing, "time": time.time()}
        path = self.folder / f"rank-{self.rank:05d}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, path)
        except OSError:  # a full or vanished folder must not kill the run it watches
            pass

    def _read(self) -> None:
        import json

        now = time.monotonic()
        for path in self.folder.glob("rank-*.json"):
            try:
                beat = json.loads(path.read_text())
                rank, seq = int(beat["rank"]), int(beat["seq"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being replaced, or not ours
            if rank >= self.world:
                continue
            old = self._seen.get(rank)
            if old is None or old[0] != seq:
                self._seen[rank] = (seq, now, beat)
                self._warned.discard(rank)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()
            self._read()
            found = self.stalled()
            # One line per stalled rank, from the lowest-numbered rank still working (rank 0 unless it stalled).
            reporter = min([r for r in range(self.world) if r not in {s for s, _ in found}], default=self.rank)
            for rank, why in found:
                if rank not in self._warned and reporter == self.rank:
                    limit = f"train.step_timeout_s={self.step_s:g}" if self.guarded else \
                        f"train.init_timeout_min={self.init_s / 60:g}"
                    self._log.warning("hang watch: %s; the run stops when a collective has waited %s", why, limit)
                self._warned.add(rank)

# ------------------------------------------------------------------------ signals and process lifetime
# How a run stops on a signal, what its loader workers do with one, what its processes do when their launcher
# dies, and who may write an output folder. docs/scaling.md, "When things fail", tells the user's side.

# A run stopped by SIGTERM / SIGUSR1 after writing its checkpoint exits with this status: EX_TEMPFAIL of
# sysexits.h ("temporary failure; the user is invited to retry"). Distinct from 0 (finished), 1 (a Python
# error), 2 (a refused launch or bad config) and 128+N (killed by signal N), so a wrapper (the sbatch script,
# a retry loop) can tell "re-run the same command to resume" from both success and failure.
RESUMABLE_EXIT = 75
# SIGTERM: what SLURM (scancel, preemption, the time limit), torchrun's agent and Kubernetes send first.
# SIGUSR1: the early warning the sbatch script asks for (`#SBATCH --signal=B:USR1@...`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Seconds a rank whose launcher died keeps running to reach its stop checkpoint before it exits anyway.
ORPHAN_GRACE_ENV = "DIST_SEG_ORPHAN_GRACE_S"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


_early_signal: Optional[int] = None


def catch_stop_signals_early() -> dict[int, object]:
    """From now on, remember a SIGTERM / SIGUSR1 instead of dying of it, until :class:`StopSignals` takes over.

    Called first thing by the training entry points: a signal that arrives while the run is still starting
    (building the model, reading the KNN table) then stops it at its first check, with a checkpoint, like
    one that arrives during training. Main thread only; elsewhere nothing changes.

    Returns:
        the previous handlers, for :func:`restore_signal_handlers` when the run is over.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def remember(signum, frame) -> None:  # noqa: ARG001
        global _early_signal
        _early_signal = signum

    return {sig: signal.signal(sig, remember) for sig in STOP_SIGNALS}


def restore_signal_handlers(previous: Mapping[int, object]) -> None:
    """Put back handlers returned by :func:`catch_stop_signals_early` (and forget a remembered signal)."""
    global _early_signal
    _early_signal = None
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set :attr:`signum` instead of ending the process.

    The training loop reads :attr:`requested` at its checks (a collective at logging, validation and checkpoint
    steps, where the ranks agree on a stop step); nothing happens inside a step. Handlers can only be set from
    the main thread: elsewhere (a Ray Train worker thread) entering changes nothing and the signals keep their
    previous effect. Leaving restores the previous handlers.

    Args:
        on_signal: called with the signal number from the handler (for a log line), after :attr:`signum` is set.
    """

    def __init__(self, on_signal: Optional[Callable[[int], None]] = None) -> None:
        self.on_signal = on_signal
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        first = self.signum is None
        self.signum = signum
        if first and self.on_signal is not None:
            self.on_signal(signum)

    def __enter__(self) -> StopSignals:
        global _early_signal
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            if _early_signal is not None:  # arrived during start-up (catch_stop_signals_early)
                signum, _early_signal = _early_signal, None
                self._handle(signum, None)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def _libc_prctl_pdeathsig(sig: int) -> bool:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: only the liveness thread of watch_launcher works there
        return False


def die_with_parent(sig: int = signal.SIGKILL, *, parent: Optional[int] = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Args:
        sig: the signal.
        parent: the pid the parent should have; when this process already has another parent (the expected
            one died before this call and we were re-parented), the signal is sent at once.

    Returns whether the request was made (False off Linux).
    """
    ok = _libc_prctl_pdeathsig(sig)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return ok


def loader_worker_init(parent: Optional[int] = None) -> None:
    """Set-up of every data-loader worker process (called from its ``worker_init_fn``).

    A scheduler or launcher signals a whole process group (SLURM's time limit, torchrun's agent, ``kill -TERM
    -PGID``): the workers ignore SIGTERM and SIGUSR1, so they keep feeding their rank while it reaches its
    stop step and writes its checkpoint, instead of dying first and crashing it with "DataLoader worker ...
    is killed by signal: Terminated". They end with their rank: normally through the loader's own shutdown,
    and by SIGKILL from the kernel when the rank dies (``PR_SET_PDEATHSIG``), so an ignored SIGTERM never
    leaves one behind.

    Args:
        parent: the rank's pid (the process that built the loader).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL, parent=parent)


_reaper_registered = False


def reap_loader_workers_at_exit() -> None:
    """At interpreter exit, SIGKILL the daemonic child processes (loader workers) still alive.

    multiprocessing ends daemonic children at exit with SIGTERM and then joins them; loader workers ignore
    SIGTERM (:func:`loader_worker_init`), so a rank leaving through an exception, with a loader still open,
    would wait for them forever. Registered once per process, after multiprocessing's own exit hook, so it
    runs first (atexit is last-in, first-out).
    """
    global _reaper_registered
    if _reaper_registered:
        return
    import atexit
    import multiprocessing
    import multiprocessing.util  # noqa: F401  (its exit hook is registered at import: ours must come later)

    def reap() -> None:
        if threading.current_thread() is threading.main_thread():
            # torch's SIGCHLD handler would report each killed worker as a loader failure on the way out.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(reap)
    _reaper_registered = True


def launched_by_agent(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process was started by torch's elastic agent (``torchrun``, ``accelerate launch``)."""
    environ = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in environ and "TORCHELASTIC_RESTART_COUNT" in environ


_watching = False


def watch_launcher(*, grace_s: Optional[float] = None, poll_s: float = 1.0) -> bool:
    """Make this rank stop when the launcher that started it dies (orphans never train on unsupervised).

    Only under an elastic agent (:func:`launched_by_agent`): the agent is this process's parent (torchrun, or
    the ``accelerate launch`` process, which runs the agent in itself), and without it nobody restarts,
    signals or reaps the ranks. A run started directly (``dist-seg train`` from a shell, ``nohup``) has no
    launcher to lose and is left alone: its shell exiting must not stop it.

    Two mechanisms: the kernel sends SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), which the run
    handles like any stop signal (the ranks agree on a step, checkpoint, exit :data:`RESUMABLE_EXIT`); and a
    daemon thread that sees the parent gone (``getppid()`` changed) ends the process with
    :data:`RESUMABLE_EXIT` after ``grace_s`` seconds (``DIST_SEG_ORPHAN_GRACE_S``, default 30: torchrun's own
    SIGTERM-to-SIGKILL wait) if it has not stopped by then, e.g. while a collective waits for a dead peer.

    Returns whether the watch was set up.
    """
    global _watching
    if not launched_by_agent():
        return False
    if _watching:  # one watch per process, however many runs it trains
        return True
    _watching = True
    grace = float(os.environ.get(ORPHAN_GRACE_ENV, "30")) if grace_s is None else grace_s
    parent = os.getppid()
    die_with_parent(signal.SIGTERM, parent=parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logging.getLogger("dist_seg").error(
            "the launcher (pid %d) died: stopping; the newest checkpoint resumes with the same command", parent)
        time.sleep(grace)
        os._exit(RESUMABLE_EXIT)

    threading.Thread(target=watch, name="dist_seg-launcher-watch", daemon=True).start()
    return True


class OutputDirBusy(RuntimeError):
    """Another live run holds the output folder (see :func:`lock_output_dir`); the message is one line."""


LOCK_NAME = ".dist_seg.lock"
_held_locks: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, holders in this process)


def lock_output_dir(output_dir: PathLike) -> Path:
    """Take the run's lock on ``output_dir`` (``<output_dir>/.dist_seg.lock``) or refuse to start.

    One holder per run: rank 0 calls this (the trainer broadcasts the outcome). ``fcntl.flock`` is released
    by the kernel when the holder dies (SIGKILL included), so a dead run never leaves the folder stuck, and an
    elastic restart (whose old rank 0 is dead before the new one starts) takes it again. The file names the
    holder (``pid host``) for the error another run gets. Taking it again in the same process nests.
    On a shared filesystem the lock is as good as its ``flock``: NFSv4 and GPFS honour it across nodes;
    Lustre needs the ``flock`` mount option.

    Raises:
        OutputDirBusy: a live process holds it; the one-line message names its pid and host.
    """
    import fcntl
    import socket

    path = Path(output_dir).resolve() / LOCK_NAME
    key = str(path)
    if key in _held_locks:
        fd, count = _held_locks[key]
        _held_locks[key] = (fd, count + 1)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        pid, _, host = holder.partition(" ")
        raise OutputDirBusy(f"{output_dir} is in use by another live run (pid {pid} on {host or 'unknown host'}): "
                            "wait for it or stop it, or give this run another train.output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _held_locks[key] = (fd, 1)
    return path


def unlock_output_dir(output_dir: PathLike) -> None:
    """Release one hold of :func:`lock_output_dir` (the lock goes when the last one in this process does)."""
    key = str(Path(output_dir).resolve() / LOCK_NAME)
    if key not in _held_locks:
        return
    fd, count = _held_locks.pop(key)
    if count > 1:
        _held_locks[key] = (fd, count - 1)
    else:
        os.close(fd)  # closing the only descriptor releases the flock
