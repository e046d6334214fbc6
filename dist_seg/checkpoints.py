"""Checkpoint files that load without running code, and the ``dist-seg convert-checkpoint`` stage.

A dist_seg checkpoint is one ``torch.save`` file holding only tensors and plain Python values (dict, list,
tuple, str, int, float, bool, None), so ``torch.load(path, weights_only=True)`` reads it: a file someone
shares cannot run code when it is evaluated, used for prediction or resumed. :func:`save_checkpoint`
converts what a trainer hands it (numpy scalars and arrays, dataclasses, paths, enums) to plain values
first and refuses anything else, so nothing unsafe is ever written.

:func:`load_checkpoint` reads with ``weights_only=True`` only and turns every file it cannot use into a
:class:`CheckpointError` whose one-line message names the file and what was expected:

* a missing file, a folder, an empty, truncated or random file, a text file (``FileNotFoundError`` /
  :class:`CheckpointError`);
* a pickle that needs Python objects built to load (:class:`UntrustedCheckpointError`): a checkpoint
  written by an older dist_seg that pickled numpy scalars or config objects looks like this, and so does a
  file crafted to run code. It is read only when the caller passes ``trust=True`` (``--trust-checkpoint``
  on the command line), and :func:`convert_checkpoint` re-saves such a file in the safe format;
* a torch file that is not a dist_seg checkpoint (a backbone's weights, another project's state dict);
* a damaged checkpoint (:class:`DamagedCheckpointError`): every tensor of a checkpoint is written with its
  SHA-256 (:data:`CHECKSUM_KEY`) and checked when the file is read, so flipped bytes inside a weight, which
  ``torch.load`` itself accepts, are found and named; a DeepSpeed run also records the size and SHA-256 of
  every ZeRO shard file of the step (:data:`DEEPSPEED_FILES_KEY`), checked before a resume.

:func:`latest_checkpoint` picks the newest checkpoint of a folder that passes these checks, naming and
skipping the ones that do not; :func:`select_checkpoint` is what ``eval``/``predict`` call with a file or a
run folder.

This module sits low in the layout: it imports torch and the standard library only, so every stage
(trainer, eval, predict, the DeepSpeed engine) can use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import logging
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "CHECKSUM_KEY",
    "DEEPSPEED_FILES_KEY",
    "CheckpointError",
    "DamagedCheckpointError",
    "UntrustedCheckpointError",
    "atomic_save",
    "convert_checkpoint",
    "file_digests",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights_only",
    "save_checkpoint",
    "select_checkpoint",
    "tensor_checksums",
    "to_plain",
    "verify_files",
]

# Written into every checkpoint: a later dist_seg can tell which layout it reads, and refuse a newer one.
FORMAT_KEY = "dist_seg_format"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("step", "method", "config", "meta")
EXPECTED = "a dist_seg training checkpoint (a .pt file written by `dist-seg train`, e.g. checkpoints/step-00000100.pt)"
# SHA-256 of every tensor, by its place in the checkpoint ("method.head.weight"), written with the file.
CHECKSUM_KEY = "checksums"
# DeepSpeed runs: {file under checkpoints/deepspeed/step-N/: {"size", "sha256"}} of the step's ZeRO shards.
DEEPSPEED_FILES_KEY = "deepspeed_files"
CHECKPOINT_GLOB = "step-*.pt"
_TORCH_LEAVES = (torch.Tensor, torch.dtype, torch.device, torch.Size)
_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


class CheckpointError(ValueError):
    """A file that is not a usable dist_seg checkpoint; the message names the file and what was expected."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose bytes changed after it was written: a tensor or a DeepSpeed shard file no longer
    matches the checksum written with it, or a shard file is missing or truncated."""


class UntrustedCheckpointError(CheckpointError):
    """A pickle that needs Python objects built to load: read only with ``trust=True``.

    Attributes:
        path: the file.
        global_name: the first object ``weights_only`` refused (e.g. ``numpy._core.multiarray.scalar``).
    """

    def __init__(self, message: str, *, path: Path, global_name: str) -> None:
        super().__init__(message)
        self.path, self.global_name = path, global_name


# ----------------------------------------------------------------------------------- plain values
def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with only tensors and plain values left, as ``torch.load(weights_only=True)`` reads them.

    numpy scalars become Python numbers, numpy arrays lists, dataclasses dicts, paths strings, enums their
    values and sets sorted lists; dicts (``OrderedDict`` kept), lists, tuples, tensors, dtypes, devices and
    plain values pass through.

    Args:
        obj: the value to convert.
        where: its place in the checkpoint, for the error message.

    Raises:
        TypeError: a value of any other type (a programming error: it would make the file unsafe to load).
    """
    import numpy as np

    if obj is None or type(obj) in (bool, int, float, str, bytes) or isinstance(obj, _TORCH_LEAVES):
        return obj
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value, where)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        items = ((to_plain(k, f"{where} key"), to_plain(v, f"{where}.{k}")) for k, v in obj.items())
        # OrderedDict (module state dicts, with their _metadata) is one of weights_only's own types.
        if type(obj).__name__ == "OrderedDict" and type(obj).__module__ == "collections":
            out = type(obj)(items)
            if hasattr(obj, "_metadata"):
                out._metadata = to_plain(obj._metadata, f"{where}._metadata")
            return out
        return dict(items)
    if isinstance(obj, tuple) and type(obj) is not tuple:
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]  # a namedtuple: its values
    if isinstance(obj, (list, tuple)):
        values = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return values if isinstance(obj, list) else tuple(values)
    if isinstance(obj, (set, frozenset)):
        return sorted(to_plain(v, where) for v in obj)
    for base in (bool, int, float, str):  # subclasses of plain types (IntEnum is handled above)
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a checkpoint cannot hold "
                    f"(torch.load(weights_only=True) would refuse it): store tensors and plain values")


# -------------------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a training checkpoint that ``torch.load(weights_only=True)`` reads (atomically).

    Args:
        state: at least ``step``, ``method`` (the method's state dict), ``config`` (plain dict) and ``meta``.
        path: the ``.pt`` file to write.

    Raises:
        TypeError: ``state`` holds a value :func:`to_plain` cannot convert.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"a checkpoint needs the keys {list(REQUIRED_KEYS)}; missing {missing}")
    plain = to_plain({k: v for k, v in state.items() if k != CHECKSUM_KEY})
    plain[FORMAT_KEY] = FORMAT_VERSION
    plain[CHECKSUM_KEY] = tensor_checksums(plain)
    return atomic_save(plain, path)


# ------------------------------------------------------------------------------------ checksums
def _tensors(obj: Any, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if not (prefix == "" and key == CHECKSUM_KEY):
                yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}.{i}" if prefix else str(i))


def _tensor_digest(tensor: torch.Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype (bf16 too)
    return digest.hexdigest()


def tensor_checksums(state: Any) -> dict[str, str]:
    """SHA-256 of every tensor in ``state`` (bytes, dtype and shape), keyed by its dotted place
    (``method.head.weight``, ``optimizer.state.0.exp_avg``)."""
    return {name: _tensor_digest(t) for name, t in _tensors(state, "")}


def verify_checksums(state: Mapping[str, Any], path: Path) -> None:
    """Check every tensor of a loaded checkpoint against the checksums written with it.

    A file written before checksums were (no :data:`CHECKSUM_KEY`) passes unchecked.

    Raises:
        DamagedCheckpointError: a tensor differs from what was written, or one is missing.
    """
    recorded = state.get(CHECKSUM_KEY)
    if recorded is None:
        return
    if not isinstance(recorded, Mapping):
        raise DamagedCheckpointError(f"{path} is damaged: its '{CHECKSUM_KEY}' entry is not a mapping")
    found = tensor_checksums(state)
    bad = sorted(name for name, digest in recorded.items() if found.get(name) != digest)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DamagedCheckpointError(f"{path} is damaged: tensor {bad[0]}{more} does not match the checksum written "
                                     "with it (the file changed after it was written: a bad disk, copy or transfer)")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: str | os.PathLike, *, part: tuple[int, int] = (0, 1)) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of the files under ``folder`` (sorted).

    Args:
        folder: e.g. a DeepSpeed checkpoint tag folder.
        part: ``(i, n)``: only every ``n``-th file from the ``i``-th, so ``n`` ranks can share the hashing of a
            large checkpoint and merge their parts.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    i, n = part
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _file_digest(p)}
            for p in files[i::n]}


def verify_files(folder: str | os.PathLike, record: Mapping[str, Mapping[str, Any]]) -> None:
    """Check that every file ``record`` (from :func:`file_digests`) lists is under ``folder`` with its size
    and SHA-256.

    Raises:
        DamagedCheckpointError: naming the first file that is missing, of another size, or changed.
    """
    folder = Path(folder)
    for name in sorted(record):
        path, want = folder / name, record[name]
        if not path.is_file():
            raise DamagedCheckpointError(f"{path} is missing (it was written with this checkpoint)")
        size = path.stat().st_size
        if size != int(want["size"]):
            raise DamagedCheckpointError(f"{path} is damaged: {size} bytes but {want['size']} were written "
                                         "(truncated: an interrupted write or copy)")
        if _file_digest(path) != want["sha256"]:
            raise DamagedCheckpointError(f"{path} is damaged: its bytes do not match the checksum written with it")


def _check_unrecorded_shards(folder: Path) -> None:
    """A DeepSpeed step folder written before shard checksums were: each file must at least be a whole zip."""
    files = sorted(p for p in folder.rglob("*.pt") if p.is_file()) if folder.is_dir() else []
    if not files:
        raise DamagedCheckpointError(f"{folder} holds no DeepSpeed shards (the optimiser state of this step)")
    for path in files:
        if not zipfile.is_zipfile(path):
            raise DamagedCheckpointError(f"{path} is damaged: a truncated or corrupted torch zip archive")


# -------------------------------------------------------------------------------------- reading
def _describe_unreadable(path: Path, err: BaseException) -> str:
    size = path.stat().st_size
    if size == 0:
        return "it is empty"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "a truncated or corrupted torch zip archive (was it copied completely?)"
        return f"a zip archive torch cannot read ({str(err).splitlines()[0][:120]})"
    if head[:1] == b"\x80":
        return "a pickle that torch.save did not write, or a damaged one"
    return "not a torch file (no zip archive or pickle inside)"


def load_weights_only(path: str | os.PathLike, *, map_location: Any = "cpu", allowed_globals: Iterable[type] = (),
                      expected: str = EXPECTED, refused_hint: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure turned into a one-line error.

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        allowed_globals: classes that hold only data (e.g. DeepSpeed's loss-scaler records) that the
            file may contain besides tensors and plain values; nothing else is built.
        expected: what the file should have been, for the messages.
        refused_hint: what to do when the file needs other objects built (default: the
            ``--trust-checkpoint`` / ``dist-seg convert-checkpoint`` advice for training checkpoints).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the file needs other Python objects built to load.
        CheckpointError: the file is a folder, empty, truncated, or not a torch file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is a folder, not a file: expected {expected}")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found:
            name = found.group(1)
            hint = refused_hint or (
                "a checkpoint of an older dist_seg (numpy values, config objects) looks like this, and so does a file "
                "made to run code. Only if you trust its source, pass --trust-checkpoint, or convert it once with "
                f"`dist-seg convert-checkpoint {path} NEW.pt --trust-checkpoint`")
            raise UntrustedCheckpointError(
                f"{path} holds pickled Python objects ({name}) that loading would have to build, i.e. run code: {hint}",
                path=path, global_name=name) from None
        raise CheckpointError(f"{path} cannot be read: {_describe_unreadable(path, err)}; "
                              f"expected {expected}") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, UnicodeDecodeError,
            AttributeError, TypeError) as err:
        # torch reports damaged archives and non-torch files through many exception types (a text file
        # ends in a KeyError from the legacy loader, a truncated zip in a RuntimeError from miniz).
        raise CheckpointError(f"{path} cannot be read: {_describe_unreadable(path, err)}; "
                              f"expected {expected}") from None


def _load_trusted(path: Path) -> Any:
    log.warning("loading %s with weights_only=False because --trust-checkpoint was given: this runs whatever "
                "code the file holds", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a trusted but broken file is still a one-line error
        raise CheckpointError(f"{path} cannot be read even with --trust-checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); expected {EXPECTED}") from None


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False, verify: bool = True) -> dict:
    """Read a dist_seg training checkpoint with ``weights_only=True`` and check its layout.

    Args:
        path: the ``.pt`` file.
        trust: read a file that ``weights_only`` refuses (an old-format checkpoint) with a full unpickle.
            Only for files from a trusted source: unpickling runs whatever code the file holds. The result
            is converted to plain values, so it can be re-saved safely (:func:`convert_checkpoint`).
        verify: check every tensor against the checksums written with it (:func:`verify_checksums`).

    Returns:
        The checkpoint dict (``step``, ``method``, ``config``, ``meta``, ``optimizer``, ...).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: an old-format (or malicious) pickle and ``trust`` is False.
        DamagedCheckpointError: a tensor does not match its checksum.
        CheckpointError: an unreadable file, a torch file that is not a dist_seg checkpoint, or a checkpoint
            of a newer format.
    """
    path = Path(path)
    try:
        state = load_weights_only(path)
    except UntrustedCheckpointError:
        if not trust:
            raise
        try:
            state = to_plain(_load_trusted(path))
        except TypeError as err:
            raise CheckpointError(f"{path} holds objects that cannot be converted to a safe checkpoint: "
                                  f"{err}") from None
    state = check_layout(state, path)
    if verify:
        verify_checksums(state, path)
    return state


def deepspeed_folder(path: Path) -> Path:
    """Where the ZeRO shards of checkpoint ``checkpoints/step-N.pt`` live: ``checkpoints/deepspeed/step-N``."""
    return path.parent / "deepspeed" / path.stem


def verify_deepspeed_shards(path: Path, state: Mapping[str, Any]) -> None:
    """Check the DeepSpeed shard files of checkpoint ``path`` against the sizes and checksums it recorded
    (or, for a checkpoint written before they were, that each shard is a whole zip archive).

    Raises:
        DamagedCheckpointError: naming the missing, truncated or changed file.
    """
    folder = deepspeed_folder(path)
    record = state.get(DEEPSPEED_FILES_KEY)
    if record:
        verify_files(folder, record)
    else:
        _check_unrecorded_shards(folder)


def latest_checkpoint(folder: str | os.PathLike, *, deepspeed: bool = False, trust: bool = False,
                      ) -> tuple[dict | None, Path | None]:
    """The newest ``step-*.pt`` checkpoint of ``folder`` that loads and passes its checksums.

    Every newer file that does not (half-written, truncated, flipped bytes, a DeepSpeed shard missing or
    damaged, a pickle that would run code) is named in a warning and skipped for the one before it.

    Args:
        folder: a run's ``checkpoints/`` folder.
        deepspeed: also check the step's DeepSpeed shard files (what a ZeRO run needs to resume; ``eval`` and
            ``predict`` need only the ``.pt`` file).
        trust: read old-format pickles too (see :func:`load_checkpoint`).

    Returns:
        ``(state, path)``, or ``(None, None)`` when no checkpoint is usable.
    """
    for path in sorted(Path(folder).glob(CHECKPOINT_GLOB), reverse=True):
        try:
            state = load_checkpoint(path, trust=trust)
            if deepspeed:
                verify_deepspeed_shards(path, state)
            return state, path
        except Exception as err:  # noqa: BLE001 - any unusable file is skipped, never fatal
            log.warning("skipping unreadable checkpoint %s (%s); trying the previous one", path, err)
    return None, None


def select_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> tuple[dict, Path]:
    """The checkpoint ``eval``/``predict`` use: a named file, or the newest valid one of a run folder.

    Args:
        path: a checkpoint file (checked; a damaged one is an error naming it), a run's ``output_dir`` or its
            ``checkpoints/`` folder (the newest ``step-*.pt`` that passes its checksums; damaged newer ones
            are named in a warning and skipped).
        trust: read old-format pickles too (see :func:`load_checkpoint`).

    Raises:
        FileNotFoundError: no such file or folder.
        CheckpointError: the named file cannot be used (:class:`DamagedCheckpointError` when it was changed
            after writing), or the folder holds no usable checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        return load_checkpoint(path, trust=trust), path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    state, found = latest_checkpoint(folder, trust=trust)
    if state is None:
        names = sorted(p.name for p in folder.glob(CHECKPOINT_GLOB))
        why = f"none of {', '.join(names)} is usable (see the warnings above)" if names else "no step-*.pt file"
        raise CheckpointError(f"no usable checkpoint in the folder {folder}: {why}; expected {EXPECTED}")
    log.info("using %s, the newest valid checkpoint in %s", found, folder)
    return state, found


def check_layout(state: Any, path: Path) -> dict:
    """``state`` if it has a dist_seg checkpoint's layout, else a :class:`CheckpointError` naming what is off."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is a torch file holding a {type(state).__name__}, not a dist_seg checkpoint: "
                              f"expected {EXPECTED}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        keys = ", ".join(map(str, list(state)[:6])) + (", ..." if len(state) > 6 else "")
        raise CheckpointError(f"{path} is a torch file but not a dist_seg checkpoint (no {', '.join(missing)}; its "
                              f"keys are {keys or 'none'}): expected {EXPECTED}")
    version = state.get(FORMAT_KEY, 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer dist_seg (checkpoint format {version!r}; this version "
                              f"reads up to {FORMAT_VERSION}): upgrade dist_seg to use it")
    problems = []
    method = state["method"]
    if not isinstance(method, Mapping) or not all(isinstance(v, torch.Tensor) for v in method.values()):
        problems.append("'method' is not a state dict of tensors")
    if not isinstance(state["config"], Mapping):
        problems.append("'config' is not a mapping")
    if not isinstance(state["meta"], Mapping) or any(k not in state["meta"] for k in ("feat_dim", "num_classes")):
        problems.append("'meta' lacks feat_dim/num_classes")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool):
        problems.append("'step' is not an integer")
    if problems:
        raise CheckpointError(f"{path} is not a usable dist_seg checkpoint ({'; '.join(problems)}): "
                              f"expected {EXPECTED}")
    return state


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, trust: bool = False) -> Path:
    """Re-save checkpoint ``src`` as ``dst`` in the safe format (``weights_only=True`` loads it).

    Args:
        src: the checkpoint to read.
        dst: the file to write (may be ``src`` itself).
        trust: allow reading an old-format pickle (runs the code it holds: trusted sources only).

    Raises:
        UntrustedCheckpointError: ``src`` needs ``trust``.
        CheckpointError: ``src`` is not a usable checkpoint.
    """
    state = load_checkpoint(src, trust=trust)
    state.pop(FORMAT_KEY, None)
    out = save_checkpoint(state, dst)
    load_checkpoint(out)  # the point of converting: prove the new file reads with weights_only=True
    return out


# ------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint to read (e.g. one written before safe checkpoints)")
    parser.add_argument("dst", help="where to write the converted checkpoint (may be SRC itself)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read SRC even if loading it needs a full unpickle, which runs any code it holds: "
                             "only for files from a source you trust")


def run(args: argparse.Namespace) -> int:
    try:
        out = convert_checkpoint(args.src, args.dst, trust=args.trust_checkpoint)
    except (FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (loads with torch.load(weights_only=True))")
    return 0

