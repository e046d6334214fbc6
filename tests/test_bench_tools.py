"""Smoke tests of the benchmark tools (tools/bench_*.py) at tiny sizes.

They check that every tool runs end to end, times every case it promises, prints ratios and bounds,
and that the built-in correctness checks hold (the reference-style STEGO step computes our loss; pool
CRF outputs equal serial ones). No test asserts a speed: timings on a shared machine are not testable.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    if str(TOOLS) not in sys.path:  # as when run as a script: the tools share tools/bench_common.py
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(f"bench_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_train_runs_every_case_and_reports_ratios(tmp_path, capsys):
    tool = load_tool("bench_train")
    out = tmp_path / "train.json"
    assert tool.main(["--backbone", "toy", "--res", "32", "--batch", "2", "--num-classes", "3", "--repeats", "2",
                      "--warmup", "0", "--cached-steps", "1", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    info = json.loads(out.read_text())
    cases = {"reference", "stego-cached", "stego-online", "ds2dl-cached", "ds2dl-online"}
    assert set(info["results"]) == cases, f"every case must be timed, got {sorted(info['results'])}"
    assert info["parity"]["equal"], f"the reference-style step must compute our loss: {info['parity']}"
    assert "random init (speed only)" in info["backbone"], "random weights must be labelled as such"
    for name, entry in info["results"].items():
        assert len(entry["crops_per_s"]) == 2 and all(map(positive, entry["crops_per_s"])), f"{name}: bad timings"
        assert positive(entry["bound_crops_per_s"]), f"{name}: no physical bound"
        if name != "reference":
            assert positive(entry["ratio_median"]) and positive(entry["ratio_min"]), f"{name}: no ratio to reference"
            assert f"{name:>14}" in printed, f"{name} missing from the printed table"
    # DS²DL uses no KNN partner: its online step runs the backbone once per crop, STEGO's twice.
    online_flops = {n: info["results"][n]["matmul_flops_per_crop"] for n in ("stego-online", "ds2dl-online")}
    assert online_flops["stego-online"] == 2 * online_flops["ds2dl-online"], online_flops
    assert "x ref" in printed and "% bound" in printed, "the table must show ratios and bounds"


def test_bench_train_loader_times_the_real_input_path(tmp_path, capsys):
    tool = load_tool("bench_train")
    out = tmp_path / "loader.json"
    assert tool.main(["--loader", "--methods", "stego", "--batch", "4", "--workers", "1", "--loader-samples", "16",
                      "--loader-steps", "2", "--repeats", "2", "--warmup", "0", "--threads", "1",
                      "--json", str(out)]) == 0
    results = json.loads(out.read_text())["loader"]["results"]
    assert set(results) == {"stego-cached", "stego-online"}, sorted(results)
    for name, entry in results.items():
        assert len(entry["ratios"]) == 2 and all(map(positive, entry["ratios"])), f"{name}: no loader/memory ratio"
        assert all(0 <= w <= 1 for w in entry["data_wait"]), f"{name}: data-wait share outside [0, 1]"
        assert all(c > 0 for c in entry["cpu_s_per_step"]["workers"]), f"{name}: the worker did no work"
    assert "x memory" in capsys.readouterr().out


def test_bench_train_times_a_git_revision_beside_the_work_tree(tmp_path):
    tool = load_tool("bench_train")
    out = tmp_path / "before.json"
    assert tool.main(["--backbone", "toy", "--res", "32", "--batch", "2", "--num-classes", "3", "--repeats", "1",
                      "--warmup", "0", "--cached-steps", "1", "--threads", "1", "--methods", "stego", "--modes",
                      "cached", "--no-reference", "--before", "HEAD", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"stego-cached", "stego-cached@HEAD"}, sorted(results)
    assert positive(results["stego-cached"]["speedup_vs_before_median"]), "no before/after ratio"


def test_bench_train_profile_and_errors(capsys):
    tool = load_tool("bench_train")
    args = ["--backbone", "toy", "--res", "32", "--batch", "2", "--num-classes", "3", "--cached-steps", "1",
            "--threads", "1", "--methods", "stego", "--modes", "cached", "--no-reference"]
    assert tool.main(args + ["--profile", "stego-cached"]) == 0
    assert "profile of stego-cached" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool.main(args + ["--profile", "nothing"])
    with pytest.raises(SystemExit):
        tool.main(args + ["--mixed-precision", "bf16", "--device", "cpu"])


def test_bench_data_times_stream_and_indexed_reads(tmp_path, capsys):
    tool = load_tool("bench_data")
    out = tmp_path / "data.json"
    root = tmp_path / "ds"
    args = ["--root", str(root), "--num-samples", "16", "--samples-per-shard", "4", "--image-size", "40", "--res",
            "32", "--feat-dim", "16", "--workers", "0", "1", "--batch", "2", "--batches", "2", "--repeats", "1",
            "--json", str(out)]
    assert tool.main(args) == 0
    info = json.loads(out.read_text())
    formats = ("jpg", "png", "features")
    expected = {f"{d}-stream-w{w}" for d in formats for w in (0, 1)} | {f"{d}-indexed" for d in formats}
    assert set(info["results"]) == expected, f"cases: {sorted(info['results'])}"
    for name, entry in info["results"].items():
        assert positive(entry["samples_per_s_median"]) and positive(entry["bound_samples_per_s"]), name
        assert entry["samples_per_s_per_worker"] == entry["samples_per_s_median"], "0 or 1 worker: same rate"
    assert info["feature_shape"] == [16, 4, 4]
    assert not any((root / d).exists() for d in formats), "written data must be removed"
    assert "samples/s" in capsys.readouterr().out

    # --keep leaves the data for the next run, which then reuses it instead of writing again.
    assert tool.main(args + ["--keep"]) == 0
    assert (root / "features" / "train" / "wids.json").is_file(), "--keep must leave the dataset"
    assert tool.main(args) == 0
    assert (root / "features" / "train" / "wids.json").is_file(), "an existing dataset must never be removed"


def test_bench_crf_pool_matches_serial(tmp_path, capsys):
    tool = load_tool("bench_crf")
    out = tmp_path / "crf.json"
    assert tool.main(["--images", "3", "--size", "32", "--num-classes", "3", "--grid", "4", "--workers", "1", "2",
                      "--repeats", "1", "--json", str(out)]) == 0
    info = json.loads(out.read_text())
    assert info["pool_equals_serial"], "CRFPool must return exactly the serial results"
    assert set(info["results"]) == {"serial", "pool-1", "pool-2"}
    pool = info["results"]["pool-2"]
    assert positive(pool["images_per_s_median"]) and positive(pool["ratio_median"]) and positive(pool["startup_s"])
    assert info["results"]["pool-1"]["startup_s"] is None, "CRFPool(1) runs in-process: no start-up to report"
    assert "x serial" in capsys.readouterr().out


def test_bench_predict_compares_the_engine_with_the_loop(tmp_path, capsys):
    import json

    tool = load_tool("bench_predict")
    out = tmp_path / "predict.json"
    assert tool.main(["--images", "3", "--sizes", "48", "--num-workers", "0", "--device", "cpu",
                      "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert positive(result["loop_images_per_s"]) and positive(result["engine_images_per_s"])
    assert result["same_label_maps"] is True, "both paths write the same label maps"
    assert result["h200_bound_images_per_s_at_320"]["ViT-B/8 (DINO)"] == 1079
    assert "loop" in capsys.readouterr().out and result["commit"] and result["machine"]["nproc"]
