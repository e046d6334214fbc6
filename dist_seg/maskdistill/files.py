"""Where the MaskDistill stages keep their outputs, and atomic JSON I/O for them (SPEC §8).

The formats are described in :mod:`dist_seg.maskdistill`. JSON is the only format a stage reads back:
nothing a user hands in is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MaskDistillFileError", "candidates_path", "masks_path", "read_json", "work_dir", "write_json_atomic"]


class MaskDistillFileError(ValueError):
    """A stage's input file is missing, unreadable or from another stage/run: the message names the fix."""


def work_dir(cfg) -> Path:
    """``maskdistill.work_dir``, or ``<data.root>/maskdistill`` when unset."""
    return Path(cfg.maskdistill.work_dir or Path(cfg.data.root) / "maskdistill")


def masks_path(cfg, split: str, method: str | None = None) -> Path:
    """The mined (and, after ``name``, clustered) object masks of ``split``.

    ``method`` (default ``maskdistill.mine.method``): MaskDistill's own masks are ``masks_<split>.json``; a
    baseline miner's are ``masks_<method>_<split>.json``, so every miner's masks can sit side by side.
    """
    method = method or cfg.maskdistill.mine.method
    return work_dir(cfg) / (f"masks_{split}.json" if method == "maskdistill" else f"masks_{method}_{split}.json")


def candidates_path(cfg, split: str) -> Path:
    """The trained Mask R-CNN's scored candidates for every image of ``split``."""
    return work_dir(cfg) / f"candidates_{split}.json"


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike, *, what: str, made_by: str) -> Any:
    """Read a stage's JSON output, turning a missing or broken file into a one-line error.

    Args:
        path: the file.
        what: what the file should hold (for the message), e.g. ``"mined object masks"``.
        made_by: the command that writes it, e.g. ``"dist-seg masks RECIPE"``.
    """
    path = Path(path)
    if not path.is_file():
        raise MaskDistillFileError(f"{path}: no {what} found; create them with `{made_by}`")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MaskDistillFileError(f"{path} is not a readable JSON file of {what} ({err}); "
                                   f"delete it and re-run `{made_by}`") from None
