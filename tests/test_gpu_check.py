"""`tools/gpu_check.sh --dry-run`: the GPU check's code paths on CPU at tiny sizes, so the script never rots.

Every GPU-only item must come back as "skipped: no GPU" with the figures of the CPU run it did instead,
and nothing may fail. The GPU numbers themselves come from a run on a GPU machine (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_ONLY = ("attention", "train-stego-online", "train-stego-cached", "train-ds2dl-online", "train-ds2dl-cached",
            "bench-train", "knn-faiss-gpu", "nccl", "deepspeed-zero2")


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "OUT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--json", str(out),
                          "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"dry run failed:\n{(res.stdout + res.stderr)[-4000:]}"
    info = json.loads(out.read_text())
    assert info["dry_run"] is True and {"date", "command", "machine", "code"} <= set(info)
    results = info["results"]
    assert set(results) == {"environment", *GPU_ONLY}, sorted(results)
    assert results["environment"]["status"] == "ok" and results["environment"]["packages"]["torch"]
    for name in GPU_ONLY:
        assert results[name]["status"] == "skipped: no GPU", (name, results[name])
    for name in ("train-stego-online", "train-stego-cached", "train-ds2dl-online", "train-ds2dl-cached"):
        ran = results[name]["dry_run"]
        assert ran["steps"] == 2 and ran["checkpoint_weights_only"], (name, ran)
    assert results["attention"]["kernels"]["math"]["rel_error_vs_fp32_math"] < 1e-4
    assert results["attention"]["kernels"]["flash"]["status"] == "skipped: no GPU"
    assert results["nccl"]["dry_run"]["correct"] and results["nccl"]["dry_run"]["backend"] == "gloo"
    ds = results["deepspeed-zero2"]["dry_run"]
    assert ds["resumed_to"] == 2 * ds["first_run_steps"] and "resumed from" in ds["resumed_log"], ds
    assert any("optim_states" in s for s in ds["shards"]), ds
    assert "skipped: no GPU" in res.stdout, "the summary table is printed last"
