"""`tools/gpu_check.sh --dry-run`: the GPU check's code paths on CPU at tiny sizes, so the script never rots.

Every GPU-only item must come back as "skipped: no GPU" with the figures of the CPU run it did instead,
and nothing may fail. The collectives item really runs 2 gloo processes (checked against one-process
references, distributed_knn included) and the DeepSpeed item trains, validates, checkpoints and resumes.
The GPU numbers themselves come from a run on a GPU machine (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_ONLY = ("matmul-bf16", "encode", "decode", "attention", "train-stego-online", "train-stego-cached",
            "train-ds2dl-online", "train-ds2dl-cached", "host-syncs", "bench-train-in-memory", "knn-torch",
            "knn-faiss-gpu", "collectives", "deepspeed-zero2")


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "OUT", "ACCELERATE_USE_CPU")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--json", str(out),
                          "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"dry run failed:\n{(res.stdout + res.stderr)[-4000:]}"
    info = json.loads(out.read_text())
    assert info["dry_run"] is True and {"date", "command", "machine", "code"} <= set(info)
    results = info["results"]
    assert set(results) == {"environment", *GPU_ONLY}, sorted(results)
    env_item = results["environment"]
    assert env_item["status"] == "ok" and env_item["packages"]["torch"]
    assert "faiss-gpu-cu12" in env_item["packages"], "the distribution the `gpu` extra installs is asked for"
    assert env_item["knn_auto_backend"]["backend"] == "torch"
    for name in GPU_ONLY:
        assert results[name]["status"] == "skipped: no GPU", (name, results[name])
    for name in ("train-stego-online", "train-stego-cached", "train-ds2dl-online", "train-ds2dl-cached"):
        ran = results[name]["dry_run"]
        assert ran["steps"] == 4 and ran["checkpoint_weights_only"], (name, ran)
        # steady state apart from set-up: 1 warm-up step, 3 timed ones
        assert ran["timed_steps"] == 3 and ran["steady_crops_per_s"] > 0, (name, ran)
        assert 0 < ran["setup_and_teardown_s"] < ran["train_wall_s"], (name, ran)
    assert results["attention"]["kernels"]["math"]["rel_error_vs_fp32_math"] < 1e-4
    toy = results["encode"]["dry_run"]["toy"]  # the CPU holds float32 weights (bf16 ones only on a GPU)
    assert toy["matmul_weights_dtype"] == ["torch.float32"] and toy["weights_gib"] == toy["weights_fp32_gib"] > 0
    assert results["attention"]["kernels"]["flash"]["status"] == "skipped: no GPU"
    coll = results["collectives"]["dry_run"]
    assert coll["processes"] == 2 and coll["backend"] == "gloo" and len(coll["ranks"]) == 2, coll
    for rank in coll["ranks"]:
        assert rank["world_size"] == 2 and rank["correct"] and all(rank["checks"].values()), rank
        assert set(rank["checks"]) >= {"all_gather_with_grad", "all_gather_variable", "distributed_knn"}
    ds = results["deepspeed-zero2"]["dry_run"]
    assert ds["resumed_to"] == 2 * ds["first_run_steps"] and "resumed from" in ds["resumed_log"], ds
    assert any("optim_states" in s for s in ds["shards"]), ds
    assert ds["validation"], "the DeepSpeed run must reach its final validation"
    assert ds["mixed_precision"] == "bf16" and ds["checkpoint_dtypes"] == ["torch.float32"], "fp32 master saved"
    knn_item = results["knn-torch"]["dry_run"]
    assert knn_item["symmetric"] is False and knn_item["queries"] < knn_item["keys"], knn_item
    assert results["knn-faiss-gpu"]["dry_run"]["auto_backend"] == "torch"
    assert results["decode"]["dry_run"]["cpu_images_per_s_per_core"] > 0
    assert "skipped: no GPU" in res.stdout, "the summary table is printed last"
