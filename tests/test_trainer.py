"""The training loop end to end on the toy data: CLI, checkpoints, resume after a kill, cache, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_seg import cli
from dist_seg.config import ConfigError, RunConfig, merge
from dist_seg.runtime import RESUMABLE_EXIT, load_recipe
from dist_seg.trainer import Trainer, TrainingError, list_checkpoints, load_latest_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stego_toy.py")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy")
    generate_toy(root, num_train=64, num_val=16, samples_per_shard=8)
    return root


def small(root: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run on the toy data."""
    return [f"data.root={root}", f"train.output_dir={out}", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle_buffer=16", "stego.feature_samples=5", "stego.neg_samples=2", "train.log_every=2",
            f"tracking.uri=sqlite:///{out.parent / 'mlflow.db'}", *extra]


def final_state(out: Path) -> dict:
    state, path = load_latest_checkpoint(merge(RunConfig(), overrides=[f"train.output_dir={out}"]))
    assert state is not None, f"no checkpoint in {out}"
    return state


def test_train_cli_end_to_end(toy_root, tmp_path):
    out = tmp_path / "run"
    code = cli.main(["train", RECIPE, *small(toy_root, out, "train.num_steps=6", "train.val_every=3",
                                           "train.checkpoint_every=3", "train.keep_last=1")])
    assert code == 0
    assert (out / "config.yaml").is_file(), "the resolved config is saved beside the run"
    ckpts = [p.name for p in list_checkpoints(merge(RunConfig(), overrides=[f"train.output_dir={out}"]))]
    assert ckpts == ["step-00000006.pt"], f"keep_last=1 must leave only the final checkpoint, got {ckpts}"
    assert (out / "checkpoints" / "best-val-cluster-mIoU.pt").is_file()
    for name in ("final.json", "final_confusion.png", "final_overlays.png"):
        assert (out / "eval" / name).is_file(), f"missing report {name}"
    state = final_state(out)
    assert state["step"] == 6 and state["assignment"] is not None and len(state["assignment"]) == 5

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dist_seg"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["params.train.num_steps"] == "6"
    for metric in ("metrics.train/loss", "metrics.val/cluster_mIoU", "metrics.final/linear_Acc",
                   "metrics.val/label_free", "metrics.val/cluster_entropy", "metrics.final/cluster_min_share",
                   "metrics.perf/crops_per_s", "metrics.perf/data_wait"):
        assert metric in runs.columns and runs.iloc[0][metric] == runs.iloc[0][metric], f"{metric} not logged"
    assert runs.iloc[0]["metrics.perf/crops_per_s"] > 0 and 0 <= runs.iloc[0]["metrics.perf/data_wait"] <= 1


def _run_train(out: Path, root: Path, steps: int, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "dist_seg.cli", "train", RECIPE,
           *small(root, out, f"train.num_steps={steps}", "train.checkpoint_every=2", "train.val_every=0",
                  "train.keep_last=10", "tracking.enabled=false", "stego.dropout=0.1", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path.name} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.02)


def _assert_same_params(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), f"parameter {key} differs after resume"


@pytest.mark.slow
def test_kill_and_resume_gives_identical_parameters(toy_root, tmp_path):
    """A run killed with SIGKILL and restarted with the same command ends bitwise equal to an uninterrupted one;
    SIGTERM checkpoints and exits with the resumable status (75); a corrupted newest checkpoint is skipped."""
    # Long enough that the signals, sent when a checkpoint appears, arrive well before the run's end on a
    # loaded machine (a toy step takes milliseconds; the stop is seen at the next logging step).
    steps = 40
    ref = _run_train(tmp_path / "ref", toy_root, steps)
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = _run_train(killed, toy_root, steps, wait=False)
    _wait_for(killed / "checkpoints" / "step-00000004.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "checkpoints" / f"step-{steps:08d}.pt").exists(), "the kill came too late to test resume"

    term = tmp_path / "term"
    proc = _run_train(term, toy_root, steps, wait=False)
    _wait_for(term / "checkpoints" / "step-00000002.pt", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == RESUMABLE_EXIT, "SIGTERM must end the run with the resumable status"
    stopped = final_state(term)
    assert 2 <= stopped["step"] < steps, f"SIGTERM checkpoint at step {stopped['step']}"

    # A half-written file at a later step must be skipped on resume, not crash it.
    (killed / "checkpoints" / "step-00000039.pt").write_bytes(b"not a checkpoint")
    for out in (killed, term):
        resumed = _run_train(out, toy_root, steps)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stderr
        _assert_same_params(final_state(tmp_path / "ref"), final_state(out))


def test_cached_features_match_online(toy_root, tmp_path):
    from dist_seg.backbones import load_backbone
    from dist_seg.data.shards import make_loader
    from dist_seg.features import extract

    base = load_recipe(RECIPE)()
    cfg = merge(base, overrides=small(toy_root, tmp_path / "run", f"data.feature_cache={tmp_path / 'cache'}",
                                      "tracking.enabled=false"))
    cache = extract(cfg, splits=["train", "val"])
    backbone = load_backbone("toy")
    online, _ = make_loader(toy_root, "train", batch_size=8, res=cfg.data.res, num_workers=0, shuffle=False,
                            infinite=False)
    cached, _ = make_loader(cache, "train", batch_size=8, res=None, num_workers=0, shuffle=False, infinite=False,
                            decode="features")
    from dist_seg.methods import build_method
    from dist_seg.methods.base import Batch, StepContext

    method = build_method(merge(cfg, overrides=["stego.dropout=0"]), feat_dim=backbone.embed_dim, num_classes=5,
                          has_labels=True)
    count = 0
    for a, b in zip(online, cached):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        with torch.no_grad():
            fa = backbone.patch_features(a["image"])
        torch.testing.assert_close(b["feat"], fa, atol=2e-3, rtol=2e-3)
        ctx = StepContext(step=count, seed=0, rank=0, world_size=1, local_batch=8)
        la, _ = method(Batch(feats=fa, partner_feats=fa.roll(1, 0), label=a["label"]), ctx)
        lb, _ = method(Batch(feats=b["feat"], partner_feats=b["feat"].roll(1, 0), label=b["label"]), ctx)
        torch.testing.assert_close(la, lb, atol=1e-3, rtol=1e-3)
        count += 1
    assert count == 8

    # Training from the cache runs, and a cache built at another resolution is refused.
    result = train(merge(cfg, overrides=["train.mode=cached", "train.num_steps=3", "train.val_every=0"]))
    assert result["step"] == 3 and result["metrics"]["cluster_mIoU"] > 0
    with pytest.raises(ConfigError, match="res"):
        Trainer(merge(cfg, overrides=["train.mode=cached", "data.res=56"]))

    # Evaluation from the cache (flipped views stored at eval_res) needs no backbone and agrees with online.
    cached_trainer = Trainer(merge(cfg, overrides=["train.mode=cached", "train.resume=false"]))
    assert cached_trainer.backbone is None and cached_trainer.info.val_cached
    online_trainer = Trainer(merge(cfg, overrides=["train.resume=false"]))
    online_trainer.unwrapped.load_state_dict(cached_trainer.unwrapped.state_dict())
    from_cache, from_images = cached_trainer.validate(), online_trainer.validate()
    for kind in ("cluster", "linear"):
        assert abs(from_cache[kind]["Acc"] - from_images[kind]["Acc"]) < 0.5, (
            kind, from_cache[kind], from_images[kind])


def test_missing_dataset_names_prepare_command(tmp_path):
    cfg = merge(load_recipe(RECIPE)(), overrides=[f"data.root={tmp_path / 'nothing'}", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match="dist-seg prepare toy"):
        Trainer(cfg)
    assert cli.main(["train", RECIPE, f"data.root={tmp_path / 'nothing'}"]) == 2


def test_nan_loss_stops_with_step(toy_root, tmp_path, monkeypatch):
    from dist_seg.methods.stego import StegoMethod

    real = StegoMethod.training_loss

    def poisoned(self, batch, ctx):
        loss, logs = real(self, batch, ctx)
        return (loss * float("nan") if ctx.step == 2 else loss), logs

    monkeypatch.setattr(StegoMethod, "training_loss", poisoned)
    cfg = merge(load_recipe(RECIPE)(), overrides=small(toy_root, tmp_path / "nan", "train.num_steps=5",
                                                       "tracking.enabled=false"))
    with pytest.raises(TrainingError, match="step 2"):
        train(cfg)


def test_knn_table_of_other_run_is_refused(toy_root, tmp_path):
    from dist_seg.knn_table import KnnTableError, save_knn_table

    table = tmp_path / "table.npz"
    save_knn_table(table, torch.zeros(64, 7), torch.zeros(64, 7, dtype=torch.long),
                   provenance={"split": "train", "num_samples": 64, "res": 32, "backbone": "toy"})
    cfg = merge(load_recipe(RECIPE)(), overrides=small(toy_root, tmp_path / "r", f"data.knn_table={table}",
                                                       "tracking.enabled=false"))
    with pytest.raises(KnnTableError, match="res"):
        Trainer(cfg)


def test_unlabelled_folder_trains_and_reports_label_free(tmp_path):
    """Users without labels: a folder of images trains (no linear probe) and validation reports the label-free
    score instead of mIoU."""
    from PIL import Image

    from dist_seg.data.folder import prepare_folder
    from dist_seg.data.toy import toy_sample

    for split, count in (("train", 16), ("val", 4)):
        src = tmp_path / "src" / split
        src.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(toy_sample(i, split=split, num_classes=5, size=64, seed=0).image).save(src / f"{i}.png")
        prepare_folder(src, tmp_path / "data", split=split, samples_per_shard=4)
    out = tmp_path / "run"
    cfg = merge(load_recipe(RECIPE)(), overrides=[*small(tmp_path / "data", out), "num_classes=5", "train.num_steps=2",
                                                  "train.val_every=0", "tracking.enabled=false"])
    result = train(cfg)
    assert result["val"]["cluster"] is None, "an unlabelled split has no mIoU"
    assert -1.0 <= result["metrics"]["label_free"] <= 1.0
    assert final_state(out)["meta"]["has_labels"] is False


def test_damaged_newest_checkpoint_is_named_and_resume_uses_the_previous(toy_root, tmp_path, caplog):
    """Four flipped bytes inside a weight of the newest checkpoint (torch.load accepts the file): the resumed
    run names it, skips it, resumes from the checkpoint before and ends where an uninterrupted run ends."""
    from tests.test_checkpoints import flip_tensor_bytes

    def cfg(out: Path, steps: int) -> RunConfig:
        return merge(load_recipe(RECIPE)(), overrides=small(toy_root, out, f"train.num_steps={steps}",
                                                            "train.checkpoint_every=2", "train.val_every=0",
                                                            "train.keep_last=10", "tracking.enabled=false"))

    train(cfg(tmp_path / "ref", 6))
    run = tmp_path / "run"
    train(cfg(run, 4))
    damaged = run / "checkpoints" / "step-00000004.pt"
    flip_tensor_bytes(damaged)
    caplog.clear()
    train(cfg(run, 6))
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if "skipping unreadable checkpoint" in m]
    assert len(skipped) == 1 and str(damaged) in skipped[0] and "does not match the checksum" in skipped[0], skipped
    assert any("resumed from" in m and "step-00000002.pt" in m for m in messages), messages
    _assert_same_params(final_state(tmp_path / "ref"), final_state(run))


def test_nonfinite_loss_after_resume_names_the_checkpoint(toy_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    base = small(toy_root, out, "train.checkpoint_every=2", "train.val_every=0", "tracking.enabled=false")
    train(merge(load_recipe(RECIPE)(), overrides=[*base, "train.num_steps=2"]))
    from dist_seg.methods.stego import StegoMethod

    real = StegoMethod.training_loss

    def poisoned(self, batch, ctx):
        loss, logs = real(self, batch, ctx)
        return loss * float("nan"), logs

    monkeypatch.setattr(StegoMethod, "training_loss", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 2 \(this run resumed from .*step-00000002\.pt"):
        train(merge(load_recipe(RECIPE)(), overrides=[*base, "train.num_steps=4"]))
