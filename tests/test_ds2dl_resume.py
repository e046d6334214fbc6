"""A DS²DL toy run killed mid-way and restarted ends exactly where an uninterrupted one does, the affinity
bias ``b`` (its own optimiser group) and the optimiser state included (the pattern of tests/test_trainer.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_seg.config import RunConfig, merge
from dist_seg.trainer import load_latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "ds2dl_toy.py")
STEPS = 10


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy_ds2dl")
    generate_toy(root, num_train=64, num_val=16, samples_per_shard=8)
    return root


def _run(out: Path, root: Path, *, wait: bool = True):
    cmd = [sys.executable, "-m", "dist_seg.cli", "train", RECIPE, f"data.root={root}", f"train.output_dir={out}",
           "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16", "ds2dl.feature_samples=4",
           f"train.num_steps={STEPS}", "train.checkpoint_every=2", "train.val_every=0", "train.keep_last=10",
           "train.log_every=2", "tracking.enabled=false", "ds2dl.dropout=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final(out: Path) -> dict:
    state, _ = load_latest_checkpoint(merge(RunConfig(), overrides=[f"train.output_dir={out}"]))
    assert state is not None, f"no checkpoint in {out}"
    return state


def _bias_group(state: dict) -> tuple[dict, list]:
    groups = state["optimizer"]["param_groups"]
    group = next(g for g in groups if g.get("name") == "bias")
    return group, [state["optimizer"]["state"][i] for i in group["params"]]


@pytest.mark.slow
def test_killed_ds2dl_run_resumes_to_identical_weights_and_bias_state(toy_root, tmp_path):
    ref = _run(tmp_path / "ref", toy_root)
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = _run(killed, toy_root, wait=False)
    marker = killed / "checkpoints" / "step-00000004.pt"
    start = time.time()
    while not marker.exists():
        assert proc.poll() is None, f"training ended before {marker.name}: {proc.stderr.read()[-2000:]}"
        assert time.time() - start < 600, f"{marker} did not appear"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "checkpoints" / f"step-{STEPS:08d}.pt").exists(), "the kill came too late to test resume"
    resumed = _run(killed, toy_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    a, b = _final(tmp_path / "ref"), _final(killed)
    assert a["step"] == b["step"] == STEPS
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), f"{key} differs after resume"
    assert a["method"]["bias"].item() != -0.5, "setup: b must have moved from its init"
    group_a, state_a = _bias_group(a)
    group_b, state_b = _bias_group(b)
    assert group_a["lr"] == group_b["lr"] == 5e-4, "b's group keeps ds2dl.bias_lr"
    assert len(group_a["params"]) == 1, "b's group holds b alone"
    for sa, sb in zip(state_a, state_b):
        assert set(sa) == set(sb) and sa, "b's optimiser state must be saved"
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), f"b's optimiser {key} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), f"optimiser {key} differs"
