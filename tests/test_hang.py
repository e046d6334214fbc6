"""A hung rank: the job ends at the training-loop timeout with a line naming the stalled rank, and resumes.

Real processes and real signals: two gloo ranks under ``accelerate launch``; one is frozen with SIGSTOP
(what a swapped-out node or a stuck driver call looks like to the others).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]
STEP_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy_hang")
    generate_toy(root, num_train=64, num_val=16, samples_per_shard=8)
    return root


def _command(root: Path, out: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(port), str(REPO / "recipes" / "stego_toy.py"),
            f"data.root={root}", f"train.output_dir={out}", "data.batch_size=8", "data.num_workers=0",
            "stego.feature_samples=5", "stego.neg_samples=2", "train.num_steps=60", "train.checkpoint_every=20",
            "train.val_every=0", "train.log_every=10", "tracking.enabled=false",
            f"train.step_timeout_s={STEP_TIMEOUT_S}",
            # Bounds the wait should the signal land while rank 0 writes a checkpoint (start-up timeout).
            "train.init_timeout_min=1.5"]


def _heartbeat(out: Path, rank: int) -> dict:
    try:
        return json.loads((out / "heartbeat" / f"rank-{rank:05d}.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    start = time.monotonic()
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - start < timeout, f"{what} did not happen in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigstop_of_a_rank_ends_the_job_naming_it_and_the_run_resumes(toy_root, tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = _command(toy_root, out, free_port())
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    stalled = None
    try:
        _wait(lambda: (out / "checkpoints" / "step-00000020.pt").is_file()
              and (_heartbeat(out, 1).get("step") or 0) > 22, proc, log, "a checkpoint and rank 1 past it", 600)
        stalled = _heartbeat(out, 1)["pid"]
        os.kill(stalled, signal.SIGSTOP)
        stopped_at = time.monotonic()
        error = "error: a collective on rank 0 timed out"
        _wait(lambda: error in log.read_text(), proc, log, "the timeout error", 4 * STEP_TIMEOUT_S + 60)
        took = time.monotonic() - stopped_at
        code = proc.wait(timeout=180)  # torchrun gives the frozen rank 30 s after SIGTERM, then SIGKILLs it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if stalled is not None:
            try:
                os.kill(stalled, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    assert code != 0, "a run torn down by a hang must not exit 0"
    named = [ln for ln in text.splitlines() if "hang watch: rank 1" in ln and f"pid {stalled}" in ln]
    assert named and "stopped responding" in named[0], f"no line naming the stalled rank:\n{text[-3000:]}"
    line = next(ln for ln in text.splitlines() if ln.startswith(error))
    assert "rank 1 (" in line and f"pid {stalled}" in line and f"train.step_timeout_s={STEP_TIMEOUT_S}" in line, line
    assert took < 4 * STEP_TIMEOUT_S + 60, f"the error came {took:.0f} s after SIGSTOP"
    assert not (out / "checkpoints" / "step-00000060.pt").exists(), "the run finished despite the stalled rank"

    # The same command again: resumes from the last checkpoint and finishes.
    again = subprocess.run(_command(toy_root, out, free_port()), env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [ln for ln in again.stderr.splitlines() if "resumed from" in ln]
    assert resumed and "step-00000020.pt" in resumed[0], again.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000060.pt").is_file()
