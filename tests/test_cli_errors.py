"""Ordinary user mistakes through `dist-seg`: one `error:` line naming the fix (exit 2), never a traceback."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import yaml

from dist_seg import cli

REPO = Path(__file__).resolve().parents[1]
SWEEP_TOY = REPO / "recipes" / "sweep_toy.yaml"


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    """`setup_logging` binds its handler to the stderr of the first test that called it; start afresh."""
    logger = logging.getLogger("dist_seg")
    saved = logger.handlers[:]
    logger.handlers.clear()
    yield
    logger.handlers[:] = saved


def _without_logging_errors(text: str) -> str:
    """Drop logging's own "--- Logging error ---" reports: a library logger (Ray's) configured during an earlier
    test still writes to that test's closed capture stream. They are an artefact of the test run."""
    out, skipping = [], False
    for line in text.splitlines():
        if line.startswith("--- Logging error ---"):
            skipping = True
        elif skipping and line.startswith("Arguments:"):
            skipping = False
        elif not skipping:
            out.append(line)
    return "\n".join(out)


def _one_error_line(capsys) -> str:
    err = _without_logging_errors(capsys.readouterr().err)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one error: line, got:\n{err}"
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("errors") / "toy"
    generate_toy(root, num_train=8, num_val=4, samples_per_shard=4)
    return root


# --------------------------------------------------------------------------------------------- YAML
def test_broken_config_yaml_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "extra.yaml"
    bad.write_text("train:\n  num_steps: 3\n  seed: [1,\n")
    assert cli.main(["train", "stego_toy", "--config", str(bad)]) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line and "not valid YAML" in line, line
    assert "line 4, column 1" in line, f"PyYAML's position, counted from 1: {line}"


def test_broken_sweep_yaml_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "sweep.yaml"
    bad.write_text("name: s\nrecipe: recipes/stego_toy.py\nparams:\n  stego.lr: {uniform: [0.1, 0.2}\n")
    assert cli.main(["sweep", str(bad)]) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line and "line 4, column" in line, line


def test_malformed_override_value_names_the_key(capsys):
    assert cli.main(["train", "stego_toy", "maskdistill.detect.min_sizes=[480,"]) == 2
    line = _one_error_line(capsys)
    assert "'maskdistill.detect.min_sizes'" in line and "not valid YAML" in line, line


# ------------------------------------------------------------------------------------------- sweeps
def test_sweep_file_reads_exponents_without_a_dot_as_numbers():
    from dist_seg.sweeps.spec import parse_sweep

    spec = parse_sweep(SWEEP_TOY, ["params.stego.lr={loguniform: [1e-4, 1e-3]}"])
    assert spec.params["stego.lr"].args == [1e-4, 1e-3]
    text = "name: s\nrecipe: recipes/stego_toy.py\nparams:\n  stego.lr: {loguniform: [5e-5, 2E-3]}\n"
    assert yaml.safe_load(text)["params"]["stego.lr"]["loguniform"][0] == "5e-5", "PyYAML alone reads a string"
    path = SWEEP_TOY.parent / "sweep_toy.yaml"  # a real file: the loader, not only the command line
    assert parse_sweep(path).params  # the shipped file still parses
    from dist_seg.sweeps.spec import _load_yaml

    assert _load_yaml(text)["params"]["stego.lr"]["loguniform"] == [5e-5, 2e-3]
    assert _load_yaml("a: 1e-4x")["a"] == "1e-4x", "only whole numbers are converted"


def test_sweep_with_a_run_override_says_overrides_plus_equals(capsys):
    assert cli.main(["sweep", str(SWEEP_TOY), "data.root=/data/toy"]) == 2
    line = _one_error_line(capsys)
    assert "overrides+=data.root=/data/toy" in line, line


def test_sweep_on_missing_data_stops_at_once_with_the_data_error(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    code = cli.main(["sweep", str(SWEEP_TOY), "overrides+=data.root=no_such_dataset", "storage_path=ray",
                     "tracking.uri=sqlite:///mlflow.db"])
    assert code == 2
    line = _one_error_line(capsys)
    assert "no dataset at no_such_dataset" in line and "dist-seg prepare toy --out no_such_dataset" in line, line
    assert not ray.is_initialized(), "the data is checked before Ray starts"
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists(), "nothing was scheduled"
    assert time.monotonic() - start < 60


def test_sweep_no_node_fits_a_trial(tmp_path, monkeypatch, capsys, toy_root):
    """{'GPU': 1} on a local cluster without GPUs: one line naming the resource and the fix, not a wait."""
    import ray

    assert not ray.is_initialized(), "this test needs Ray started by the sweep itself (a cluster that cannot grow)"
    monkeypatch.chdir(tmp_path)
    code = cli.main(["sweep", str(SWEEP_TOY), f"overrides+=data.root={toy_root}", "resources.gpu=1", "--num-cpus",
                     "1", "--num-gpus", "0", "storage_path=ray", "tracking.uri=sqlite:///mlflow.db",
                     "budget.time_budget_s=30"])  # a safety net: were the check gone, Tune would stop after 30 s
    assert code == 2
    line = _one_error_line(capsys)
    assert "'GPU': 1.0" in line and "resources.gpu=0" in line and "--num-gpus" in line, line
    assert not ray.is_initialized(), "the sweep's own Ray is shut down"


# ----------------------------------------------------------------------------------- weights, hints
@pytest.mark.parametrize("command", ["train", "extract", "knn"])
def test_missing_dino_weights_is_one_line_from_every_stage(command, toy_root, tmp_path, capsys):
    code = cli.main([command, "stego_toy", f"data.root={toy_root}", "backbone.name=dino_vits16",
                     f"backbone.weights={tmp_path / 'dino.pth'}", f"train.output_dir={tmp_path / 'run'}",
                     "tracking.enabled=false", "data.num_workers=0"])
    assert code == 2
    line = _one_error_line(capsys)
    assert "weights file not found" in line and "backbone.weights" in line, line


def test_missing_weights_message_names_the_key_given(monkeypatch):
    from dist_seg import backbones

    monkeypatch.setattr(backbones, "_find_cached", lambda name: None)  # as on a machine with no hub cache
    with pytest.raises(backbones.BackboneWeightsError, match=r"maskdistill\.mine\.weights=PATH"):
        backbones.load_backbone("dino_vits16", weights_key="maskdistill.mine.weights")
    with pytest.raises(backbones.BackboneWeightsError, match=r"backbone\.weights=PATH"):
        backbones.load_backbone("dino_vits16")


def test_mining_backbone_weights_error_names_its_key(toy_root, tmp_path, capsys):
    code = cli.main(["masks", "maskdistill_toy", f"data.root={toy_root}", "data.dataset=toy",
                     f"maskdistill.work_dir={tmp_path / 'md'}", "maskdistill.mine.backbone=dino_vits16",
                     f"maskdistill.mine.weights={tmp_path / 'x.pth'}"])
    assert code == 2
    line = _one_error_line(capsys)
    assert "maskdistill.mine.weights" in line and "check backbone.weights" not in line, line


@pytest.mark.parametrize("command", ["masks", "maskdistill"])
def test_missing_voc_names_prepare_voc12_not_toy(command, tmp_path, capsys):
    root = tmp_path / "voc12"
    assert cli.main([command, "maskdistill_voc", f"data.root={root}", f"maskdistill.work_dir={tmp_path / 'md'}"]) == 2
    line = _one_error_line(capsys)
    assert f"`dist-seg prepare voc12 --src SRC --out {root}`" in line, line
    assert "prepare toy" not in line, line
