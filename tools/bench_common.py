"""What every ``tools/bench_*.py`` sets up: this checkout on the path, the machine and commit a figure was
measured on, and where the JSON record goes.

Import it first from a benchmark in ``tools/`` (the script's folder is on ``sys.path``)::

    from bench_common import REPO, machine, commit, write_record
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Benchmark the checkout this file belongs to, whatever `dist_seg` the environment has installed.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine(device=None) -> dict:
    """CPU model, core count, GPU (of ``device``, or the first one when CUDA is used), torch, threads, load."""
    import torch

    cpu = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    gpu = None
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        gpu = torch.cuda.get_device_name(device)
    return {"nproc": os.cpu_count(), "cpu": cpu, "gpu": gpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def commit() -> str:
    """Short commit of this checkout (``+dirty`` when it has uncommitted changes)."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def write_record(path, result: dict) -> None:
    """Write ``result`` as indented JSON to ``path`` (nothing when ``path`` is None)."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
