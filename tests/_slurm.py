"""A throw-away single-node SLURM cluster for tests: munged, slurmctld and slurmd on this host, as root.

Everything lives in one temporary folder (config, state, spool, logs, the munge key and socket); the daemons
run in the foreground of their own processes and are stopped by :meth:`LocalSlurm.stop`. Debian's
``slurm-wlm`` and ``munge`` packages provide the binaries (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")


def missing() -> Optional[str]:
    """Why a local cluster cannot start here (None when it can)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM needs Linux"
    absent = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if absent:
        return (f"{', '.join(absent)} not installed (apt-get install -y slurm-wlm munge; .ci/run installs them)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """One node (this host, its CPUs), one partition, requeued jobs eligible again after ``cred_expire`` s."""

    def __init__(self, root: Path, *, cred_expire: int = 5) -> None:
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []
        for d in ("munge", "state", "spool", "log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "ClusterName=distseg_test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A requeued job may start again after cred_expire seconds (120 by default).
            f"AuthInfo=socket={self.socket},cred_expire={cred_expire}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin",
            # The main scheduler pass every 2 s (60 by default): a requeued job starts soon after its begin time.
            "SchedulerParameters=sched_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=30",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        munge = self.root / "munge"
        self._spawn([_which("munged"), "--foreground", "--force", f"--socket={self.socket}",
                     f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--seed-file={munge / 'munged.seed'}", f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait(lambda: self.socket.exists(), timeout, "munged")
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn([_which("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "slurmd (node idle)")

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while not ready():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited {p.returncode} while waiting for {what}:\n"
                                       f"{self.logs()}")
            if time.time() > end:
                raise RuntimeError(f"{what} not ready after {timeout} s:\n{self.logs()}")
            time.sleep(0.5)

    def _node_idle(self) -> bool:
        res = self.run("sinfo", "-h", "-o", "%T", check=False)
        return res.returncode == 0 and res.stdout.strip() in ("idle", "idle~")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}")
        return res

    def job_field(self, job: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for word in out.split():
            if word.startswith(f"{field}="):
                return word.split("=", 1)[1]
        return ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").iterdir()))

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
