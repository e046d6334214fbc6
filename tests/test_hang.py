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
        _wait(lambda: error in log.read_text(), proc, log, "the timeout error", 4 * STEP_TIMEOUT_S + 120)
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
    # The timeout counts from the collective rank 0 entered after the freeze; the rest is a loaded machine.
    assert took < 2 * STEP_TIMEOUT_S + 30, f"the error came {took:.0f} s after SIGSTOP"
    assert not (out / "checkpoints" / "step-00000060.pt").exists(), "the run finished despite the stalled rank"

    # The same command again: resumes from the last checkpoint and finishes.
    again = subprocess.run(_command(toy_root, out, free_port()), env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [ln for ln in again.stderr.splitlines() if "resumed from" in ln]
    assert resumed and "step-00000020.pt" in resumed[0], again.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000060.pt").is_file()


def _beat(folder: Path, rank: int, seq: int, step: int, doing: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank:05d}.json").write_text(json.dumps(
        {"rank": rank, "host": "node", "pid": 1000 + rank, "seq": seq, "step": step, "doing": doing, "time": 0}))


def test_hang_watch_names_frozen_and_stuck_ranks(tmp_path):
    """The watch's verdicts from heartbeat files (one process, no process group): a rank whose heartbeat stopped
    is frozen; with every heartbeat fresh, a rank doing something else while this one makes no step is stuck."""
    from dist_seg.config import RunConfig, merge
    from dist_seg.runtime import HEARTBEAT_DIR, HangWatch

    cfg = merge(RunConfig(), overrides=[f"train.output_dir={tmp_path}", "train.step_timeout_s=20"])
    watch = HangWatch(cfg, rank=0, world=3)
    folder = tmp_path / HEARTBEAT_DIR
    assert "no rank could be named" in watch.describe()

    watch.reached(7)  # guarded from now on: half of train.step_timeout_s is 10 s
    watch.activity("in a training step")
    _beat(folder, 1, 1, 7, "in a training step")
    _beat(folder, 2, 1, 7, "waiting for data")
    watch._read()
    assert watch.stalled() == [], "fresh heartbeats and a recent step: nobody is stalled"

    seq, _, beat = watch._seen[1]
    watch._seen[1] = (seq, time.monotonic() - 11, beat)  # rank 1's heartbeat unchanged for 11 s
    (rank, why), = watch.stalled()
    assert rank == 1 and "stopped responding" in why and "pid 1001" in why, why

    _beat(folder, 1, 2, 7, "in a training step")  # rank 1 is back; now this rank has made no step for 11 s
    watch._read()
    watch._step_changed = time.monotonic() - 11
    (rank, why), = watch.stalled()
    assert rank == 2 and "makes no progress" in why and "waiting for data" in why, why
    message = watch.timeout_message(RuntimeError("Timed out waiting 20000ms for recv operation to complete"))
    assert "rank 2 (node, pid 1002)" in message and "train.step_timeout_s=20" in message, message

    with watch.relaxed("validating or writing a checkpoint"):
        assert not watch.guarded and watch.stalled() == [], "no step is expected while validating"
    assert watch.guarded and watch.doing == "in a training step"


def test_hang_watch_thread_writes_heartbeats(tmp_path):
    from dist_seg.config import RunConfig, merge
    from dist_seg.runtime import HEARTBEAT_DIR, HangWatch

    cfg = merge(RunConfig(), overrides=[f"train.output_dir={tmp_path}", "train.step_timeout_s=5"])
    watch = HangWatch(cfg, rank=0, world=1).start()
    try:
        path = tmp_path / HEARTBEAT_DIR / "rank-00000.json"
        watch.reached(3)
        deadline = time.monotonic() + 60
        while json.loads(path.read_text())["step"] != 3:
            assert time.monotonic() < deadline, "the heartbeat was not rewritten"
            time.sleep(0.1)
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        watch.close()
