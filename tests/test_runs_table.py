"""`dist-seg runs`: a paper-style table of MLflow runs logged through the project's Tracker (real sqlite store)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from dist_seg import cli
from dist_seg.config import RunConfig, flatten, merge
from dist_seg.tracking import PARENT_RUN_ENV, Tracker, format_runs, search

# (run name, stego.lr, cluster mIoU, label-free, steps done); planned steps are 10 for every run
PLAIN = [("stego-a", 0.001, 41.5, 0.21, 10), ("stego-b", 0.003, 55.25, 0.34, 10), ("stego-c", 0.0005, 12.0, 0.05, 4)]
TRIALS = [("dist_seg_trial_ab12c_00000", 0.002, 30.0), ("dist_seg_trial_ab12c_00001", 0.004, 60.0),
          ("dist_seg_trial_ab12c_00002", 0.001, 45.0)]


def _log(uri: str, experiment: str, name: str, lr: float, miou: float, *, steps: int = 10,
         label_free: float | None = None, status: str = "FINISHED") -> str:
    cfg = merge(RunConfig(), overrides=[f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                                        f"tracking.run_name={name}", f"stego.lr={lr}", "train.num_steps=10",
                                        f"train.output_dir=runs/{name}", "data.dataset=toy", "data.root=data/toy"])
    tracker = Tracker(cfg.tracking, active=True, params=flatten(cfg),
                      tags={"dataset": cfg.data.root, "method": cfg.method})
    for step in range(5, steps + 1, 5) if steps >= 5 else [steps]:
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    scores = {"val/cluster_mIoU": miou, "val/cluster_Acc": miou + 20}
    if label_free is not None:
        scores["val/label_free"] = label_free
    tracker.log_metrics(scores, step=steps)
    run_id = tracker.run_id
    tracker.end(status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two experiments: three plain runs, and a sweep (parent run + three nested trials) like `dist-seg sweep`'s."""
    import os

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    for name, lr, miou, lf, steps in PLAIN:
        _log(uri, "dist_seg", name, lr, miou, label_free=lf, steps=steps, status="KILLED" if steps < 10 else "FINISHED")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweeps") or client.create_experiment("sweeps")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    parent = client.create_run(exp_id, run_name="toy_sweep", tags={"sweep.name": "toy_sweep"}).info.run_id
    os.environ[PARENT_RUN_ENV] = parent
    try:
        trial_ids = [_log(uri, "sweeps", name, lr, miou) for name, lr, miou in TRIALS]
    finally:
        del os.environ[PARENT_RUN_ENV]
    client.set_terminated(parent, status="FINISHED")
    client.create_experiment("empty_one")
    return uri, parent, trial_ids


def _rows(text: str) -> list[str]:
    lines = text.splitlines()
    return lines[lines.index(next(ln for ln in lines if ln.startswith("---"))) + 1:]


def test_table_columns_sort_and_width(store, capsys):
    uri, _, _ = store
    assert cli.main(["runs", "--uri", uri, "--experiment", "dist_seg"]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 120 for line in out.splitlines()), max(out.splitlines(), key=len)
    header = next(line for line in out.splitlines() if line.startswith("run"))
    for column in ("run", "method", "dataset", "status", "steps", "cluster mIoU", "cluster Acc", "label-free",
                   "stego.lr"):
        assert column in header, f"column {column!r} missing from {header!r}"
    assert "linear mIoU" not in header, "a column no run has is left out"
    assert "data.res" not in header and "train.output_dir" not in header, "only params that differ are shown"
    rows = _rows(out)
    assert [r.split()[0] for r in rows] == ["stego-b", "stego-a", "stego-c"], "sorted by cluster mIoU, descending"
    first = rows[0].split()
    assert first[1:6] == ["stego", "toy", "FINISHED", "10/10", "55.25"], first
    assert "4/10" in rows[2] and "KILLED" in rows[2]
    assert "0.003" in rows[0]


def test_sort_ascending_by_another_metric_and_columns(store, capsys):
    uri, _, _ = store
    assert cli.main(["runs", "--uri", uri, "--experiment", "dist_seg", "--sort", "label-free", "--ascending",
                     "--columns", "run,label-free,stego.lr"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("run"))
    assert header.split() == ["run", "label-free", "stego.lr"], header
    assert [r.split()[0] for r in _rows(out)] == ["stego-c", "stego-a", "stego-b"]


def test_all_experiments_group_trials_under_their_sweep(store, capsys):
    uri, _, _ = store
    assert cli.main(["runs", "--uri", uri]) == 0
    out = capsys.readouterr().out
    assert "experiment 'dist_seg': 3 runs" in out and "experiment 'sweeps': 4 runs" in out, out
    sweep = out[out.index("experiment 'sweeps'"):].split("\n\n")[0]
    names = [r.split()[0] if not r.startswith("└") else r.split()[1] for r in _rows(sweep) if r.strip()]
    assert names == ["toy_sweep", "00001", "00002", "00000"], f"trials under their parent, best first:\n{sweep}"
    assert all(r.startswith("└") for r in _rows(sweep)[1:4])
    assert all(len(line) <= 120 for line in out.splitlines())


def test_filter_uses_mlflow_search_syntax(store, capsys):
    uri, _, _ = store
    assert cli.main(["runs", "--uri", uri, "--filter", "metrics.`val/cluster_mIoU` > 40 and status = 'FINISHED'",
                     "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(r["run"] for r in rows) == ["dist_seg_trial_ab12c_00001", "dist_seg_trial_ab12c_00002",
                                              "stego-a", "stego-b"]
    assert cli.main(["runs", "--uri", uri, "--filter", "no such syntax ((("]) == 1
    assert "bad --filter" in capsys.readouterr().err


def test_csv_and_json_for_scripts(store, capsys):
    uri, parent, trial_ids = store
    assert cli.main(["runs", "--uri", uri, "--experiment", "sweeps", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in rows] == [parent, trial_ids[1], trial_ids[2], trial_ids[0]]
    assert rows[1]["parent_run_id"] == parent and rows[1]["depth"] == 1 and rows[0]["depth"] == 0
    assert rows[1]["cluster mIoU"] == 60.0 and rows[1]["run"] == "dist_seg_trial_ab12c_00001"
    assert cli.main(["runs", "--uri", uri, "--experiment", "sweeps", "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 4 and float(table[1]["cluster mIoU"]) == 60.0 and table[1]["stego.lr"] == "0.004"


def test_empty_or_unknown_experiment_lists_the_ones_that_exist(store, capsys):
    uri, _, _ = store
    for name in ("empty_one", "no_such_experiment"):
        assert cli.main(["runs", "--uri", uri, "--experiment", name]) == 1
        err = capsys.readouterr().err
        assert f"no runs in experiment '{name}'" in err, err
        assert "'dist_seg' (3 runs)" in err and "'sweeps' (4 runs)" in err, err
        assert len(err.strip().splitlines()) == 1, "one line, no traceback"


def test_narrow_terminal_drops_columns_and_says_so(store):
    uri, _, _ = store
    text = format_runs(search("dist_seg", uri=uri), width=60)
    assert all(len(line) <= 60 for line in text.splitlines()), text
    assert "do not fit in 60 characters" in text and "--columns" in text


def test_best_prints_overrides_that_paste_back(store, capsys):
    """`runs --best`: sorted, shell-quoted key=value words that the CLI's own parser reads back to the run's
    config (lists with spaces, None, booleans and strings included)."""
    import shlex

    from dist_seg.runtime import config_from_args

    uri, _, _ = store
    assert cli.main(["runs", "--uri", uri, "--experiment", "dist_seg", "--best"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("# best run: stego-b"), out[-2]
    words = shlex.split(out[-1])
    keys = [w.split("=", 1)[0] for w in words]
    assert keys == sorted(keys), "overrides are sorted by key"
    assert "maskdistill.detect.min_sizes" in keys and "backbone.weights" in keys
    args, extra = cli.build_parser().parse_known_args(["train", "stego_toy", *words])
    assert not extra, extra
    pasted = config_from_args(args)
    logged = merge(RunConfig(), overrides=["stego.lr=0.003", "train.num_steps=10", "data.dataset=toy"])
    flat, want = flatten(pasted), flatten(logged)
    for key in keys:
        assert flat[key] == want[key], f"{key}: pasted {flat[key]!r}, logged {want[key]!r}"


def test_runs_without_a_store_leaves_no_database(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["runs"]) == 1
    assert "no MLflow store at mlflow.db" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists(), "asking for runs must not create an empty store"
