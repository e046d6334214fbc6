"""A GPU asked for but not usable, or a launch whose processes did not join one group: one `error:` line, exit 2.

The environment facts (torch's CUDA build, the driver's CUDA version, the launcher's variables) are given as
values to the pure functions; the end-to-end tests run `dist-seg train` on this CPU machine as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_seg.config import RunConfig, merge
from dist_seg.runtime import (
    CudaFacts,
    LaunchError,
    check_device_request,
    check_process_group,
    cuda_problem,
    gpu_request,
)
from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parent.parent
CU130 = dict(torch_version="2.11.0+cu130", cuda_build="13.0", visible_devices=None)


def facts(**changes) -> CudaFacts:
    values = dict(CU130, driver_cuda=(13, 0), available=True, device_count=1)
    values.update(changes)
    return CudaFacts(**values)


def cfg(device: str = "auto") -> RunConfig:
    return merge(RunConfig(), overrides=[f"train.device={device}"])


def test_cuda_problem_names_the_cause_and_both_versions():
    assert cuda_problem(facts()) is None
    old_driver = cuda_problem(facts(driver_cuda=(12, 4), available=False, device_count=0))
    assert "driver supports CUDA up to 12.4 but this torch (2.11.0+cu130) is built for CUDA 13.0" in old_driver
    assert "https://download.pytorch.org/whl/cu128" in old_driver and "R580" in old_driver
    no_driver = cuda_problem(facts(driver_cuda=None, available=False, device_count=0))
    assert "no NVIDIA driver or GPU found" in no_driver and "ACCELERATE_USE_CPU=1" in no_driver
    cpu_build = cuda_problem(facts(torch_version="2.11.0+cpu", cuda_build=None, available=False, device_count=0))
    assert "CPU-only build" in cpu_build
    hidden = cuda_problem(facts(visible_devices="", available=False, device_count=0))
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in hidden


def test_gpu_request_from_config_or_single_gpu_launcher():
    assert gpu_request(cfg("cuda"), {}) == "train.device=cuda"
    assert gpu_request(cfg(), {}) is None
    # what `accelerate launch --config_file launch/single_gpu.yaml` exports (use_cpu: false, gpu_ids: '0')
    single = {"ACCELERATE_USE_CPU": "False", "CUDA_VISIBLE_DEVICES": "0"}
    assert "launch/single_gpu.yaml" in gpu_request(cfg(), single)
    assert gpu_request(cfg(), {**single, "ACCELERATE_USE_CPU": "1"}) is None
    assert gpu_request(cfg("cpu"), single) is None


def test_check_device_request_refuses_with_one_line(capsys):
    broken = facts(driver_cuda=(12, 2), available=False, device_count=0)
    with pytest.raises(LaunchError) as err:
        check_device_request(cfg("cuda"), facts=broken, environ={})
    assert err.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.device=cuda, but CUDA is not usable: the NVIDIA "
                                                   "driver supports CUDA up to 12.2"), lines
    check_device_request(cfg("cuda"), facts=facts(), environ={})  # usable: nothing happens
    check_device_request(cfg("auto"), facts=broken, environ={})  # not asked: runs on the CPU (with a warning)


def test_check_process_group_refuses_a_partial_group(capsys):
    check_process_group(2, environ={"WORLD_SIZE": "2"}, facts=facts())
    check_process_group(1, environ={}, facts=facts())
    with pytest.raises(LaunchError):
        check_process_group(1, environ={"WORLD_SIZE": "8", "RANK": "3"}, facts=facts())
    assert capsys.readouterr().err == "", "only rank 0 prints the line"
    with pytest.raises(LaunchError) as err:
        check_process_group(1, environ={"WORLD_SIZE": "8"}, facts=facts(driver_cuda=None, available=False))
    assert "WORLD_SIZE=8" in err.value.message and "no NVIDIA driver" in err.value.message


def _train(tmp_path, env_changes: dict, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU",
                        "CUDA_VISIBLE_DEVICES")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **env_changes)
    return subprocess.run([sys.executable, "-m", "dist_seg.cli", "train", "stego_toy",
                           f"data.root={tmp_path / 'no-data'}", f"train.output_dir={tmp_path / 'run'}",
                           "tracking.enabled=false", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_world_size_two_with_a_one_process_group_stops(tmp_path):
    """The environment `accelerate launch --config_file launch/multi_gpu.yaml` gives each process on a CPU machine
    (without ACCELERATE_USE_CPU=1 each would come up in a group of its own)."""
    res = _train(tmp_path, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(free_port())})
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: the launcher started 2 processes (WORLD_SIZE=2)"), errors
    assert "ACCELERATE_USE_CPU=1" in errors[0]
    assert not (tmp_path / "run").exists(), "nothing may be written"


def test_train_device_cuda_on_this_cpu_machine_stops(tmp_path):
    res = _train(tmp_path, {}, "train.device=cuda")
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert errors[0].startswith("error: train.device=cuda, but CUDA is not usable: "), errors


def test_multi_gpu_yaml_on_this_cpu_machine_stops_every_process(tmp_path):
    """The real launcher: 2 processes from launch/multi_gpu.yaml, no GPU, no ACCELERATE_USE_CPU: one line, no run."""
    import shutil

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    res = subprocess.run([accelerate, "launch", "--config_file", str(ROOT / "launch" / "multi_gpu.yaml"),
                          "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "dist_seg.cli",
                          "train", "stego_toy", f"data.root={tmp_path / 'no-data'}",
                          f"train.output_dir={tmp_path / 'run'}", "tracking.enabled=false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode != 0, "the launch must fail"
    assert len(errors) == 1 and "WORLD_SIZE=2" in errors[0] and "ACCELERATE_USE_CPU=1" in errors[0], \
        res.stderr[-3000:]
    assert not (tmp_path / "run").exists()
