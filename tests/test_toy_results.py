"""tools/toy_results.py: the protocol behind the toy table of docs/results.md.

The report reader and the table are checked on hand-written reports (prototype usage and "beats the
baseline" counts must come out of the numbers, not out of the tool), and the whole protocol runs once end
to end on a tiny toy dataset through the real command line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from dist_seg.data.toy import generate_toy

TOOL = Path(__file__).resolve().parent.parent / "tools" / "toy_results.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("toy_results_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_report(path: Path, cluster_miou: float, confusion: list[list[int]], linear: dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"cluster": {"mIoU": cluster_miou, "Acc": cluster_miou + 20}, "cluster_confusion": confusion}
    if linear is not None:
        data["linear"] = linear
    path.write_text(json.dumps(data))


def test_read_row_counts_the_clusters_that_own_pixels(tool, tmp_path):
    # rows are classes, columns clusters: clusters 1 and 3 own no pixel
    confusion = [[5, 0, 1, 0], [0, 0, 7, 0], [2, 0, 0, 0]]
    path = tmp_path / "final.json"
    write_report(path, 33.0, confusion, {"mIoU": 40.0, "Acc": 60.0})
    row = tool.read_row(path)
    assert row["clusters_used"] == 2 and row["clusters"] == 4
    assert row["cluster_mIoU"] == 33.0 and row["linear_mIoU"] == 40.0
    # cluster histogram (column sums) 7 / 0 / 8 / 0 of 15 pixels: smallest share 0, entropy of (7/15, 8/15)
    p = [7 / 15, 8 / 15]
    assert row["cluster_min_share"] == 0.0
    assert row["cluster_entropy"] == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(4))
    # labels 6 / 7 / 2 over K = 3 classes
    q = [6 / 15, 7 / 15, 2 / 15]
    assert row["class_entropy"] == pytest.approx(-sum(v * math.log(v) for v in q) / math.log(3))
    write_report(path, 33.0, confusion, None)  # unlabelled runs have no linear probe
    assert tool.read_row(path)["linear_mIoU"] is None


def test_table_counts_wins_against_the_baseline_per_seed(tool, tmp_path):
    out = tmp_path / "runs"
    full = [[3, 0], [0, 4]]
    for seed, (stego, raw) in enumerate([(40.0, 30.0), (29.0, 31.0), (45.0, 44.9)]):
        write_report(tool.report_path("stego", seed, out), stego, full, {"mIoU": 50.0, "Acc": 70.0})
        write_report(tool.report_path("raw", seed, out), raw, full, {"mIoU": 45.0, "Acc": 65.0})
    rows = {(m, s): tool.read_row(tool.report_path(m, s, out)) for m in ("stego", "raw") for s in range(3)}
    table = tool.markdown(rows, ["stego", "raw"], [0, 1, 2])
    assert "STEGO head: mean cluster mIoU 38.0 over 3 seed(s); beats the raw baseline on 2 of 3 seed(s)" in table
    assert "| STEGO head | 1 | 29.0 |" in table
    # a balanced 2-cluster confusion: 2 / 2 clusters used, entropy 1.00, smallest share 3/7 = 42.9 %
    assert "| 2 / 2 | 0.99 | 42.9 |" in table
    # a missing run is shown as missing, never silently dropped
    del rows[("stego", 2)]
    assert "| STEGO head | 2 | (missing) |" in tool.markdown(rows, ["stego", "raw"], [0, 1, 2])


@pytest.mark.timeout(1200)
def test_protocol_runs_end_to_end_through_the_cli(tool, tmp_path, capsys):
    root = tmp_path / "toy"
    generate_toy(root, num_classes=5, num_train=32, num_val=8, size=64, seed=0, samples_per_shard=8)
    out = tmp_path / "runs"
    tiny = ["train.num_steps=2", "train.val_every=2", "train.checkpoint_every=2", "train.log_every=1",
            "data.batch_size=8", "data.num_workers=0", "eval.num_overlays=0"]
    table_file = tmp_path / "table.md"
    code = tool.main(["--root", str(root), "--out", str(out), "--seeds", "0", "--markdown", str(table_file), *tiny])
    assert code == 0
    for method in ("stego", "ds2dl", "ds2dl_code", "raw"):
        assert tool.report_path(method, 0, out).is_file(), method
    import yaml

    saved = yaml.safe_load((out / "ds2dl_code_0" / "config.yaml").read_text())
    assert saved["ds2dl"]["affinity_target"] == "code", "the first-reading row must run affinity_target=code"
    assert yaml.safe_load((out / "ds2dl_0" / "config.yaml").read_text())["ds2dl"]["affinity_target"] == "backbone"
    table = table_file.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "(missing)" not in line]
    assert len(rows) == 5  # header + one row per method
    ds2dl_row = next(line for line in rows if line.startswith("| DS²DL | "))
    cells = [c.strip() for c in ds2dl_row.strip("|").split("|")]
    assert cells[6].endswith("/ 5"), cells  # clusters used out of K = 5
    entropy, share = float(cells[7]), float(cells[8])
    assert 0.0 <= entropy <= 1.0 and 0.0 <= share <= 20.0, cells  # the smallest share is at most 100 / K
    assert "beats the raw baseline on" in capsys.readouterr().out
