"""launch/: every config loads through the library that consumes it, and the CPU ones really start 2 ranks."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
ACCELERATE_CONFIGS = {
    # file: (distributed_type, num_processes, num_machines)
    "single_gpu.yaml": ("NO", 1, 1),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1),
    "multi_node.yaml": ("MULTI_GPU", 16, 2),
    "cpu_2proc.yaml": ("MULTI_GPU", 2, 1),
}
LAUNCH_TIMEOUT = 120


def _accelerate() -> str:
    exe = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    assert Path(exe).exists(), "the `accelerate` command is not installed next to this Python"
    return exe


def _cpu_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _rank_lines(output: str) -> list[str]:
    """The ``rank=...`` reports of launch/check_ranks.py, sorted (found anywhere: launchers interleave output)."""
    return sorted(re.findall(r"rank=\d+ world=\d+ .*?rank_sum=\d+", output))


def test_launch_folder_has_every_config():
    names = {p.name for p in LAUNCH.iterdir()}
    missing = (set(ACCELERATE_CONFIGS) | {"deepspeed_zero2.json", "slurm_multinode.sbatch", "check_ranks.py"}) - names
    assert not missing, f"launch/ lacks {sorted(missing)}"
    assert set(p.name for p in LAUNCH.glob("*.yaml")) == set(ACCELERATE_CONFIGS), (
        "a YAML in launch/ is not covered by this test: add it to ACCELERATE_CONFIGS")


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_yaml_parses_and_loads_as_an_accelerate_config(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    raw = yaml.safe_load((LAUNCH / name).read_text())
    assert isinstance(raw, dict), f"{name} is not a YAML mapping"
    # Accelerate's own loader rejects unknown keys and bad enum values.
    cfg = load_config_from_file(str(LAUNCH / name))
    assert isinstance(cfg, ClusterConfig), f"{name} loaded as {type(cfg).__name__}"
    kind, procs, machines = ACCELERATE_CONFIGS[name]
    assert cfg.distributed_type.value == kind, f"{name}: distributed_type {cfg.distributed_type}"
    assert (cfg.num_processes, cfg.num_machines) == (procs, machines), (
        f"{name}: {cfg.num_processes} processes on {cfg.num_machines} machines")


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_launch_resolves_the_config(name, monkeypatch):
    """What ``accelerate launch --config_file X script`` makes of the file, without starting anything.

    ``_validate_launch_command`` is the step of ``accelerate launch`` that merges a config file into the
    launch arguments (it picks the launcher that will run).
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(ROOT)
    args = launch_command_parser().parse_args(["--config_file", f"launch/{name}", "launch/check_ranks.py"])
    args, _, _ = _validate_launch_command(args)
    kind, procs, machines = ACCELERATE_CONFIGS[name]
    assert args.num_processes == procs and args.num_machines == machines
    assert args.multi_gpu == (kind == "MULTI_GPU"), f"{name}: multi-process launcher {args.multi_gpu}"
    assert args.use_deepspeed == (kind == "DEEPSPEED")
    if name == "multi_gpu.yaml":
        assert args.mixed_precision == "bf16"
    if name == "multi_node.yaml":
        assert args.main_process_ip and isinstance(args.main_process_port, int) and args.machine_rank == 0


def test_deepspeed_json_is_accepted_by_accelerate_and_deepspeed():
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    from dist_seg.ds_engine import resolve_ds_config

    path = LAUNCH / "deepspeed_zero2.json"
    raw = json.loads(path.read_text())
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == 2, f"accelerate reads ZeRO stage {plugin.zero_stage}"
    # DeepSpeed validates every section strictly (unknown keys raise) once "auto" values are filled.
    ds = DeepSpeedConfig(resolve_ds_config(path, micro_batch_size=4, gradient_clipping=1.0))
    assert ds.zero_optimization_stage == 2
    assert ds.train_micro_batch_size_per_gpu == 4 and ds.gradient_clipping == 1.0
    assert raw["bf16"]["enabled"] == "auto", "precision must follow the run (accelerate/mixed_precision)"


def test_deepspeed_config_typo_is_rejected():
    """Guards the previous test: DeepSpeedConfig would reject a misspelt key in the shipped JSON."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from dist_seg.ds_engine import resolve_ds_config

    cfg = json.loads((LAUNCH / "deepspeed_zero2.json").read_text())
    cfg["zero_optimization"]["overlap_com"] = True
    with pytest.raises(Exception, match="overlap_com"):
        DeepSpeedConfig(resolve_ds_config(cfg))


def test_sbatch_script_is_valid_bash():
    res = subprocess.run(["bash", "-n", str(LAUNCH / "slurm_multinode.sbatch")], capture_output=True, text=True)
    assert res.returncode == 0, f"bash -n failed:\n{res.stderr}"
    text = (LAUNCH / "slurm_multinode.sbatch").read_text()
    assert "#SBATCH --nodes" in text and "srun" in text and "SLURM_NODEID" in text
    # time-limit warning, requeue and restarts (run against a real SLURM by tests/test_faults.py)
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text and "scontrol requeue" in text
    assert "--max-restarts" in text and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text


def test_cpu_2proc_config_starts_two_gloo_ranks():
    res = subprocess.run(
        [_accelerate(), "launch", "--config_file", "launch/cpu_2proc.yaml", "--main_process_port", str(free_port()),
         "launch/check_ranks.py", "--expect-world", "2"],
        cwd=ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"accelerate launch failed ({res.returncode}):\n{out[-4000:]}"
    lines = _rank_lines(res.stdout)
    assert [line.split()[0] for line in lines] == ["rank=0", "rank=1"], f"expected ranks 0 and 1, got:\n{out[-4000:]}"
    assert all("world=2" in line and "backend=gloo" in line and "rank_sum=1" in line for line in lines), lines
    reports = re.findall(r"rank_sum=1 torch=\S+ cuda_build=\S+ driver=\S+ driver_cuda=\S+ gpu=.*", res.stdout)
    assert len(reports) == 2, f"every rank names torch's CUDA build, the driver and the GPU:\n{res.stdout[-2000:]}"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_script_runs_one_node_with_stub_srun(tmp_path):
    """The sbatch script end to end on one 'node' of 2 CPU processes: srun and scontrol are stand-ins that
    run the task here and name this host, so the rendezvous variables it derives are really used."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: drop its options, run the task once as node 0.
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    _stub(bin_dir, "scontrol", 'echo 127.0.0.1\n')
    env = _cpu_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="1", SLURM_JOB_NODELIST="node1",
                   SLURM_JOB_ID="42", GPUS_PER_NODE="2", MAIN_PORT=str(free_port()))
    env.pop("MAIN_IP", None)
    res = subprocess.run(["bash", "launch/slurm_multinode.sbatch", "launch/check_ranks.py", "--expect-world", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"sbatch script failed ({res.returncode}):\n{out[-4000:]}"
    assert "1 node(s) x 2 process(es) = 2, rendezvous 127.0.0.1:" in res.stdout, res.stdout[-2000:]
    lines = _rank_lines(res.stdout)
    assert len(lines) == 2 and all("world=2" in line for line in lines), f"expected 2 ranks of 2:\n{out[-4000:]}"


def test_sbatch_script_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", "launch/slurm_multinode.sbatch", "recipes/stego_toy.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "SLURM_NNODES" in res.stderr, res.stderr
