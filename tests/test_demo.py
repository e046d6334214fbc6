"""The README's main command, end to end: `dist-seg demo` (what `make demo` runs after installing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(3000)  # minutes on an idle 2-core machine; far more when the cores are shared
def test_demo_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-m", "dist_seg.cli", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=2900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()
            if line.startswith(("stego head", "raw backbone features"))}
    assert set(rows) == {"stego head", "raw backbone features"}, f"results table missing rows:\n{out}"
    for line in rows.values():
        numbers = [float(x) for x in line.split()[-4:]]
        assert all(0 <= x <= 100 for x in numbers), line
    assert (tmp_path / "data" / "toy" / "manifest.json").is_file(), "the demo generates the toy data itself"
    overlays = tmp_path / "runs" / "demo" / "stego" / "eval" / "final_overlays.png"
    assert overlays.is_file() and str(overlays.relative_to(tmp_path)) in out, "the demo says where the overlays are"
    assert (tmp_path / "mlflow.db").is_file(), "runs are tracked in the default local MLflow store"
