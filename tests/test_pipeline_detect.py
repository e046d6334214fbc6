"""``dist-seg detect RECIPE``: train Mask R-CNN under the trainer, predict candidates; resume after a kill;
skip what is done; a one-line error without weights."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from dist_seg import cli
from dist_seg.maskdistill.detect import read_candidates
from tests._detect_data import SIZES, detect_overrides, make_detect_dataset, one_thread  # noqa: F401

RECIPE_TEXT = '''from dist_seg.config import RunConfig


def config():
    return RunConfig(method="maskdistill")
'''
STEPS = 3


@pytest.fixture(scope="module")
def detect_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detect_cli")
    make_detect_dataset(root)
    (root / "recipe.py").write_text(RECIPE_TEXT)
    return root


def _args(root: Path, run: Path, *extra: str) -> list[str]:
    """Overrides for one run with its own output and work folders (the masks JSON copied in)."""
    work = run / "work"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "maskdistill" / "masks_train.json", work / "masks_train.json")
    overrides = [o for o in detect_overrides(root, run / "out", "train.checkpoint_every=2", "train.keep_last=5",
                                             f"maskdistill.work_dir={work}", *extra)
                 if not o.startswith(("method=", "data.batch_size=", "train.num_steps="))]
    return ["detect", str(root / "recipe.py"), *overrides, "maskdistill.detect.batch_size=2",
            f"maskdistill.detect.num_steps={STEPS}"]


def _final(run: Path) -> dict:
    return torch.load(run / "out" / "detect" / "checkpoints" / f"step-{STEPS:08d}.pt", map_location="cpu",
                      weights_only=False)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, f"detect ended before {path.name} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.1)


def test_detect_without_weights_is_a_one_line_error(detect_root, tmp_path, capsys):
    args = [a for a in _args(detect_root, tmp_path / "noweights") if a != "maskdistill.detect.init=random"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert line.startswith("error:") and "maskdistill.detect.weights=" in line and "init=random" in line, err


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_detect_cli_trains_predicts_resumes_and_skips(detect_root, tmp_path, caplog):
    # Log records, not stderr: an earlier test in the same process may own dist_seg's stderr handler.
    caplog.set_level(logging.INFO, logger="dist_seg")
    ref = tmp_path / "ref"
    assert cli.main(_args(detect_root, ref)) == 0
    candidates = ref / "work" / "candidates_train.json"
    info, rows = read_candidates(candidates)
    assert info["complete"] and info["step"] == STEPS and info["num_images"] == 6 and info["stage"] == "detect"
    assert info["checkpoint"].endswith(f"step-{STEPS:08d}.pt")
    assert rows, "a random-init detector still scores candidates above 0.05"
    per_image: dict[int, list[float]] = {}
    for row in rows:
        h, w = SIZES[row["image_id"] % len(SIZES)]
        rle = row["segmentation"]
        mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert mask.shape == (h, w), "masks at the image's full size"
        assert 1 <= row["category_id"] <= 2 and row["score"] >= 0.05 and len(row["bbox"]) == 4
        x, y, bw, bh = row["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
        per_image.setdefault(row["image_id"], []).append(row["score"])
    assert set(per_image) <= set(range(6)) and 5 in per_image, "every image is predicted, the unmasked one too"
    for scores in per_image.values():
        assert scores == sorted(scores, reverse=True) and len(scores) <= 10
    caplog.clear()

    # Re-running the finished stage trains nothing and predicts nothing.
    mtime = candidates.stat().st_mtime_ns
    assert cli.main(_args(detect_root, ref)) == 0
    assert "skipping training" in caplog.text and "skipping prediction" in caplog.text, caplog.text[-2000:]
    assert candidates.stat().st_mtime_ns == mtime

    # Killed after its step-2 checkpoint, then re-run: same final weights and candidates as uninterrupted.
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "dist_seg.cli", *_args(detect_root, killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(killed / "out" / "detect" / "checkpoints" / "step-00000002.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "out" / "detect" / "checkpoints" / f"step-{STEPS:08d}.pt").exists(), "killed too late"
    caplog.clear()
    assert cli.main(_args(detect_root, killed)) == 0
    assert "resumed from" in caplog.text
    a, b = _final(ref), _final(killed)
    assert sorted(a["method"]) == sorted(b["method"])
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), f"{key} differs after kill and resume"
    _, resumed_rows = read_candidates(killed / "work" / "candidates_train.json")
    assert resumed_rows == rows, "the resumed detector predicts the same candidates"
    assert np.isfinite([r["score"] for r in rows]).all()
