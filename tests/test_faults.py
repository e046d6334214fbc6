"""Runs that survive preemption, dead ranks and dead launchers (issue 28, items 1, 2 and 5).

Real processes and real signals, 2 gloo ranks with 2 loader workers each (the recipes' default), on the toy
data. Each check compares the final checkpoint of an interrupted-and-resumed run, parameter for parameter,
with an uninterrupted run's. docs/scaling.md, "When things fail", is the user's side of each.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from dist_seg.config import RunConfig, merge
from dist_seg.runtime import RESUMABLE_EXIT, OutputDirBusy, lock_output_dir, unlock_output_dir
from dist_seg.trainer import list_checkpoints, load_latest_checkpoint
from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stego_toy.py")
STEPS = 40


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy")
    generate_toy(root, num_train=64, num_val=16, samples_per_shard=8)
    return root


def overrides(root: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """A seconds-long 2-rank run with 2 loader workers per rank; no periodic checkpoint unless asked."""
    return [f"data.root={root}", f"train.output_dir={out}", "data.batch_size=8", "data.num_workers=2",
            "data.shuffle_buffer=16", "stego.feature_samples=5", "stego.neg_samples=2", "train.log_every=2",
            f"train.num_steps={steps}", "train.checkpoint_every=1000", "train.val_every=0", "train.keep_last=10",
            "tracking.enabled=false", "stego.dropout=0.1", *extra]


def cpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def start_ranks(out: Path, root: Path, log: Path, *extra: str, steps: int = STEPS) -> list[subprocess.Popen]:
    """Two rank processes in ONE new process group, started the way SLURM's ``srun`` starts tasks (no agent
    between them and the signal): ``kill -TERM -PGID`` reaches both ranks and their 4 loader workers."""
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    for rank in range(2):
        env = cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with open(f"{log}.{rank}", "w") as err:
            procs.append(subprocess.Popen([sys.executable, RECIPE, *overrides(root, out, *extra, steps=steps)],
                                          env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                                          process_group=procs[0].pid if procs else 0))
    return procs


def accelerate_cmd(out: Path, root: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(free_port()), RECIPE, *overrides(root, out, *extra, steps=steps)]


def torchrun_cmd(out: Path, root: Path, *extra: str, restarts: int = 0, steps: int = STEPS) -> list[str]:
    """The restart launcher of docs/scaling.md: torchrun with c10d rendezvous (needs
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment, see :func:`restart_env`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"localhost:{free_port()}", RECIPE, *overrides(root, out, *extra, steps=steps)]


def restart_env() -> dict[str, str]:
    return cpu_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def wait_for_text(path: Path, text: str, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    start = time.time()
    while text not in (path.read_text() if path.exists() else ""):
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"the run ended before {text!r} appeared in {path}:\n{path.read_text()[-3000:]}")
        assert time.time() - start < timeout, f"{text!r} did not appear in {path} within {timeout} s"
        time.sleep(0.05)


def wait_for_path(path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    start = time.time()
    while not path.exists():
        assert all(p.poll() is None for p in procs), f"the run ended before {path.name} appeared"
        assert time.time() - start < timeout, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def checkpoints(out: Path) -> list[str]:
    return [p.name for p in list_checkpoints(merge(RunConfig(), overrides=[f"train.output_dir={out}"]))]


def final_state(out: Path) -> dict:
    state, _ = load_latest_checkpoint(merge(RunConfig(), overrides=[f"train.output_dir={out}"]))
    assert state is not None, f"no checkpoint in {out}"
    return state


def assert_same_params(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), f"parameter {key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(toy_root, tmp_path_factory) -> dict:
    """The final checkpoint of an uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = subprocess.run(accelerate_cmd(out, toy_root), env=cpu_env(), capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return final_state(out)


# ------------------------------------------------------------------------------ 1. preemption
@pytest.mark.slow
def test_sigterm_to_process_group_with_loader_workers_checkpoints_and_resumes(toy_root, tmp_path, reference):
    """SIGTERM to the process group of 2 ranks and their 4 loader workers: the workers outlive it, the ranks
    agree on one stop step, write one checkpoint there and exit 75; the same command resumes to the
    uninterrupted run's parameters."""
    out, log = tmp_path / "run", tmp_path / "rank.err"
    procs = start_ranks(out, toy_root, log)
    wait_for_text(Path(f"{log}.0"), "step 4/", procs)
    # Each rank has its 2 loader workers now: the signal reaches 6 processes.
    assert all(len(psutil.Process(p.pid).children()) == 2 for p in procs), "expected 2 loader workers per rank"
    os.killpg(procs[0].pid, signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    errs = [Path(f"{log}.{r}").read_text() for r in range(2)]
    assert codes == [RESUMABLE_EXIT, RESUMABLE_EXIT], f"exit statuses {codes}:\n{errs[0][-3000:]}"
    assert not any("killed by signal" in e for e in errs), errs[0][-3000:]
    saved = checkpoints(out)
    assert len(saved) == 1, f"one checkpoint at the stop step, got {saved}"
    step = final_state(out)["step"]
    assert 4 <= step < STEPS
    for rank, err in enumerate(errs):
        assert f"rank {rank} stopped at step {step} " in err, f"rank {rank} did not stop at step {step}:\n{err[-2000:]}"

    procs = start_ranks(out, toy_root, log)  # the same command
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], Path(f"{log}.0").read_text()[-3000:]
    assert f"resumed from {out / 'checkpoints' / saved[0]}" in Path(f"{log}.0").read_text()
    assert_same_params(reference, final_state(out))


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_checkpoints_and_resumes(toy_root, tmp_path, reference):
    """The issue's command: SIGTERM to the process group of ``accelerate launch`` (its elastic agent forwards
    it to each rank's process group, loader workers included). The launcher itself ends by the signal
    (143); the ranks agree on a step, checkpoint once, and the same command resumes exactly."""
    out, log = tmp_path / "run", tmp_path / "launch.err"
    cmd = accelerate_cmd(out, toy_root)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                                start_new_session=True)
    wait_for_text(log, "step 4/", [proc])
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=300)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, f"launcher status {code}:\n{text[-3000:]}"
    assert "killed by signal" not in text, text[-3000:]
    saved = checkpoints(out)
    assert len(saved) == 1, f"one checkpoint at the stop step, got {saved}:\n{text[-3000:]}"
    step = final_state(out)["step"]
    assert f"rank 0 stopped at step {step} " in text and f"rank 1 stopped at step {step} " in text, text[-3000:]

    res = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_params(reference, final_state(out))


# -------------------------------------------------------------------- 2b. restarts after a rank dies
RESTARTS = 5


def _newest_step(out: Path) -> int:
    names = checkpoints(out)
    return int(names[-1][5:13]) if names else -1


def _live_ranks(launcher: int) -> dict[int, psutil.Process]:
    """The launcher's rank processes by RANK, without the dead attempt's not yet reaped ones."""
    ranks = {}
    for p in psutil.Process(launcher).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                ranks[int(p.environ().get("RANK", -1))] = p
        except psutil.Error:  # gone (or a zombie) since it was listed
            continue
    return ranks


@pytest.mark.slow
def test_sigkill_of_a_rank_under_torchrun_restarts_and_resumes_5_of_5(toy_root, tmp_path, reference):
    """torchrun --max-restarts with c10d rendezvous (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): five times, as soon
    as the group has written a checkpoint, one rank (1, 0, 1, 0, 1) is SIGKILLed; every time the launcher
    re-forms the group, which resumes from the newest checkpoint, and the run ends with the uninterrupted
    parameters. Static rendezvous re-formed the group in 3 of 8 restarts on this stack (issue 28)."""
    out, log = tmp_path / "run", tmp_path / "torchrun.err"
    start = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen(torchrun_cmd(out, toy_root, "train.checkpoint_every=2", restarts=RESTARTS),
                                env=restart_env(), stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                                start_new_session=True)
    took = []
    try:
        for attempt in range(RESTARTS):
            begin = time.time()
            deadline = begin + 300
            while True:  # the current group has resumed (after a restart) and written a checkpoint of its own
                resumed = re.findall(r"resumed from \S+ at step (\d+)", log.read_text())
                if len(resumed) >= attempt and _newest_step(out) > (int(resumed[-1]) if attempt else -1):
                    break
                assert proc.poll() is None, f"torchrun ended ({proc.returncode}):\n{log.read_text()[-4000:]}"
                assert time.time() < deadline, f"no new checkpoint after restart {attempt}"
                time.sleep(0.02)
            last = _newest_step(out)
            ranks = _live_ranks(proc.pid)
            assert sorted(ranks) == [0, 1], f"torchrun's children: {ranks}"
            assert last < STEPS, "the run finished before it could be killed 5 times"
            ranks[1 - attempt % 2].send_signal(signal.SIGKILL)
            took.append(time.time() - begin)
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 0, f"torchrun exited {code}:\n{text[-4000:]}"
    resumed = [line for line in text.splitlines() if "resumed from" in line]
    assert len(resumed) == RESTARTS, f"{len(resumed)} resumes for {RESTARTS} kills:\n{text[-4000:]}"
    assert_same_params(reference, final_state(out))
    print(f"{RESTARTS} kills, restarts and resumes in {time.time() - start:.0f} s (from a kill to the next "
          f"group's first checkpoint: {', '.join(f'{t:.0f}' for t in took[1:])} s)")


# ------------------------------------------------------------------------- 5. orphans and collisions
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_sigkill_of_the_launcher_leaves_no_worker_behind(toy_root, tmp_path, launcher):
    """SIGKILL of the launcher: its ranks (parent-death signal) checkpoint and stop, their loader workers die
    with them, within seconds; the output folder's lock goes with them."""
    out, log = tmp_path / "run", tmp_path / "launch.err"
    cmd = (torchrun_cmd(out, toy_root, steps=2000) if launcher == "torchrun"
           else accelerate_cmd(out, toy_root, steps=2000))
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=restart_env(), stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                                start_new_session=True)
    wait_for_text(log, "step 4/", [proc])
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 6, f"expected 2 ranks with 2 loader workers each, got {family}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed = time.time()
    gone, alive = psutil.wait_procs(family, timeout=60)
    elapsed = time.time() - killed
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} processes outlived the launcher by 60 s: {alive}"
    text = log.read_text()
    saved = checkpoints(out)
    assert len(saved) == 1 and "stopped at step" in text, f"{saved}:\n{text[-3000:]}"
    print(f"{launcher}: every worker gone {elapsed:.1f} s after the launcher's SIGKILL")
    assert elapsed < 30, f"workers outlived the launcher by {elapsed:.1f} s"
    lock_output_dir(out)  # no dead run leaves the folder locked
    unlock_output_dir(out)


def _hold_lock(out: Path) -> subprocess.Popen:
    code = ("import sys, time; from dist_seg.runtime import lock_output_dir; lock_output_dir(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=cpu_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_output_dir_lock_names_the_live_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        with pytest.raises(OutputDirBusy, match=rf"pid {holder.pid} on {socket.gethostname()}\b"):
            lock_output_dir(out)
    finally:
        holder.kill()
        holder.wait()
    lock_output_dir(out)  # the kernel released the dead holder's lock
    lock_output_dir(out)  # nested in one process
    unlock_output_dir(out)
    unlock_output_dir(out)


def test_train_refuses_an_output_dir_held_by_a_live_run(toy_root, tmp_path):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        res = subprocess.run([sys.executable, "-m", "dist_seg.cli", "train", RECIPE,
                              *overrides(toy_root, out, "data.num_workers=0", steps=2)],
                             env=cpu_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert f"in use by another live run (pid {holder.pid} on {socket.gethostname()})" in errors[0]
    assert "Traceback" not in res.stderr and not checkpoints(out)


# -------------------------------------------------------------------- 2a. SLURM time limit and requeue
# Long enough that an idle machine (~25 steps/s, ~7 s start-up) is still training when the warning comes:
# slurmctld checks time limits every 30 s from its start, so a job started just after it (as here) gets
# SIGUSR1 about 27 s in, whatever --signal asks for below 30.
SLURM_STEPS = 800


@pytest.fixture
def local_slurm(tmp_path):
    from tests._slurm import LocalSlurm, missing

    why = missing()
    if why is not None:
        pytest.skip(f"no local SLURM: {why}")
    cluster = LocalSlurm(tmp_path / "slurm")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_sbatch_time_limit_signal_checkpoints_requeues_and_resumes(local_slurm, toy_root, tmp_path):
    """launch/slurm_multinode.sbatch on a real one-node SLURM: a job whose time limit (2 min) is shorter than
    its work gets SIGUSR1 (--signal=B:USR1@100 here, the script's own is @600), the trap stops the ranks at a
    checkpoint, the script requeues the job, and the requeued job (the same command) resumes and finishes
    with the parameters of an uninterrupted run. Once requeued, the job's limit is raised to 10 minutes so
    that the test ends after one requeue (with 2 minutes it would be requeued again and again, each time
    resuming, until done)."""
    out = tmp_path / "run"
    job_log = tmp_path / "job.out"
    env = {**local_slurm.env, **cpu_env(GPUS_PER_NODE="2", MAIN_PORT=str(free_port()), LAUNCHER="torchrun"),
           "SLURM_CONF": str(local_slurm.conf)}
    res = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=2",
         "--signal=B:USR1@100", f"--output={job_log}", "launch/slurm_multinode.sbatch", RECIPE,
         *overrides(toy_root, out, steps=SLURM_STEPS)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"sbatch failed: {res.stderr}"
    job = res.stdout.strip().split(";")[0]
    start, deadline, restarts = time.time(), time.time() + 900, 0
    while time.time() < deadline:
        state = local_slurm.job_field(job, "JobState")
        restarts = int(local_slurm.job_field(job, "Restarts") or 0)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        if restarts >= 1 and local_slurm.job_field(job, "TimeLimit") == "00:02:00" and state == "RUNNING":
            # One requeue shows the path; give the requeued job room to finish instead of looping.
            local_slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
        time.sleep(1)
    text = job_log.read_text() if job_log.exists() else ""
    assert state == "COMPLETED", f"job {job} is {state} after {time.time() - start:.0f} s:\n{text[-4000:]}"
    assert restarts >= 1, f"the job was never requeued:\n{text[-4000:]}"
    assert "time limit near (SIGUSR1)" in text and "requeueing job" in text, text[-4000:]
    assert "stopped at step" in text and "resumed from" in text, text[-4000:]
    assert "killed by signal" not in text
    print(f"SLURM: signalled, requeued {restarts}x and finished in {time.time() - start:.0f} s")

    ref = tmp_path / "ref"
    res = subprocess.run(torchrun_cmd(ref, toy_root, steps=SLURM_STEPS), env=restart_env(), capture_output=True,
                         text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_params(final_state(ref), final_state(out))


# ------------------------------------------------------------------------------ signal plumbing
def test_stop_signals_record_sigterm_and_sigusr1_and_restore_handlers():
    """Real signals to this process: inside StopSignals they are recorded (first one reported once), before
    it they are remembered from start-up (catch_stop_signals_early) and handed over, and every handler
    comes back afterwards."""
    from dist_seg.runtime import StopSignals, catch_stop_signals_early, restore_signal_handlers

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    seen: list[int] = []
    with StopSignals(seen.append) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM and seen == [signal.SIGUSR1]
    assert {sig: signal.getsignal(sig) for sig in before} == before

    previous = catch_stop_signals_early()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # during "start-up": remembered, the process lives on
        with StopSignals(seen.append) as stop:
            assert stop.signum == signal.SIGTERM and seen[-1] == signal.SIGTERM
        with StopSignals() as stop:
            assert not stop.requested, "a remembered signal is handed over once"
    finally:
        restore_signal_handlers(previous)
    assert {sig: signal.getsignal(sig) for sig in before} == before
