"""MaskDistill's training stages (SPEC §8.5–8.6): distil (+ CRF round), linear protocol, scoring; 2 ranks; resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_seg.config import RunConfig, merge
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_objects(tmp_path_factory) -> Path:
    """toy_objects scenes; their ground truth stands in for pseudo-labels (0 = background, 1..K)."""
    from dist_seg.data.toy_objects import generate_toy_objects

    root = tmp_path_factory.mktemp("toy_objects")
    generate_toy_objects(root, num_classes=2, num_train=8, num_val=4, size=48, samples_per_shard=2)
    return root


def stage_cfg(root: Path, out: Path, student: str = "head", *extra: str) -> RunConfig:
    return merge(RunConfig(), overrides=[
        "method=maskdistill", f"data.root={root}", f"train.output_dir={out}", "data.res=48", "data.eval_res=48",
        "data.num_workers=0", "data.shuffle_buffer=4", "backbone.name=toy", "tracking.enabled=false",
        "train.val_every=0", "train.checkpoint_every=1", "train.keep_last=10", "eval.num_overlays=0",
        "data.max_val_samples=2", "maskdistill.distil.init=random", f"maskdistill.distil.student={student}",
        "maskdistill.distil.size=33", "maskdistill.distil.batch_size=4", "maskdistill.distil.epochs=1",
        "maskdistill.distil.linear_epochs=1", "maskdistill.distil.linear_batch_size=4", *extra])


def test_distil_crf_round_linear_and_scores(toy_objects, tmp_path):
    from dist_seg.data.shards import IndexedShards
    from dist_seg.eval.maskdistill import score_student
    from dist_seg.pipeline import _backbone_for, distil_config, distil_stage, linear_stage, load_student

    cfg = stage_cfg(toy_objects, tmp_path / "run", "head", "maskdistill.distil.crf_rounds=1",
                    f"maskdistill.work_dir={tmp_path / 'work'}")
    assert distil_config(cfg, data_root=toy_objects).train.num_steps == 2, "1 epoch of 8 images at batch 4"
    student = distil_stage(cfg, data_root=toy_objects)
    assert student == tmp_path / "run" / "distil-crf1" / "checkpoints" / "step-00000002.pt"
    assert (tmp_path / "run" / "distil" / "checkpoints" / "step-00000002.pt").is_file(), "round 0 trained first"
    relabelled = IndexedShards(tmp_path / "work" / "pseudo_crf1", "train", res=48)
    labels = torch.stack([relabelled[i]["label"] for i in range(len(relabelled))])
    assert len(relabelled) == 8 and labels.min() >= 0 and labels.max() <= 2, "CRF labels are classes 0..K"
    mtime = student.stat().st_mtime
    assert distil_stage(cfg, data_root=toy_objects) == student and student.stat().st_mtime == mtime, \
        "a finished stage is skipped"

    linear = linear_stage(cfg, student)
    assert linear == tmp_path / "run" / "linear" / "checkpoints" / "step-00000002.pt"
    lin_model, stu_model = load_student(linear, "cpu"), load_student(student, "cpu")
    assert torch.equal(lin_model.head.linear.weight, stu_model.head.linear.weight), "the head stays frozen"
    assert not torch.equal(lin_model.classifier.weight, stu_model.classifier.weight)
    scores = score_student(lin_model, toy_objects, "val", backbone=_backbone_for(cfg, "cpu"), eval_res=48)
    assert scores["num_images"] == 4 and len(scores["cluster"]["per_class_iou"]) == 3
    assert scores["linear"] is not None and 0 <= scores["linear"]["mIoU"] <= 100


def test_score_label_maps_hungarian_over_all_classes(toy_objects):
    from dist_seg.eval.maskdistill import full_resolution_records, score_label_maps

    truth = {r["index"]: r["label"].numpy() for r in full_resolution_records(toy_objects, "train", per_rank=False)}
    # Classes permuted (0→2, 1→0, 2→1): the Hungarian matching over all 3 classes undoes it exactly.
    permuted = {i: np.array([2, 0, 1], dtype=np.uint8)[np.clip(t, 0, 2)] for i, t in truth.items()}
    scores = score_label_maps(permuted, toy_objects, "train", num_classes=3)
    assert scores["mIoU"] == pytest.approx(100.0) and scores["num_images"] == 8 and scores["missing"] == 0
    first = min(truth)
    scores = score_label_maps({i: m for i, m in permuted.items() if i != first}, toy_objects, "train", num_classes=3)
    assert scores["missing"] == 1 and scores["mIoU"] < 100, "an image without a map counts as all background"


def _two_rank_stages(rank: int, world: int, root: str, out: str, student: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "1"
    from dist_seg.pipeline import distil_stage, linear_stage, load_student
    from dist_seg.trainer import make_accelerator

    cfg = stage_cfg(Path(root), Path(out), student)
    accelerator = make_accelerator(cfg)  # one for both stages, as the all-stages command does
    ckpt = distil_stage(cfg, data_root=root, accelerator=accelerator)
    linear = linear_stage(cfg, ckpt, accelerator=accelerator)
    accelerator.end_training()
    state = torch.load(linear, map_location="cpu", weights_only=True)
    model = load_student(ckpt, "cpu")
    return {"world": state["meta"]["world_size"], "step": state["step"],
            "student": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("student", ["head", pytest.param("deeplab", marks=pytest.mark.slow)])
def test_training_stages_on_two_ranks(toy_objects, tmp_path, student):
    out = run_distributed(_two_rank_stages, 2, str(toy_objects), str(tmp_path / student), student)
    assert [o["world"] for o in out] == [2, 2] and [o["step"] for o in out] == [2, 2]
    for key, value in out[0]["student"].items():
        assert torch.equal(value, out[1]["student"][key]), f"ranks disagree on {key}"


_RUNNER = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.test_pipeline_maskdistill import stage_cfg
from dist_seg.pipeline import distil_stage
cfg = stage_cfg(Path({root!r}), Path({out!r}), {student!r}, "maskdistill.distil.epochs=3")
distil_stage(cfg, data_root={root!r})
"""


def _distil_process(root: Path, out: Path, student: str) -> subprocess.Popen:
    code = _RUNNER.format(repo=str(REPO), root=str(root), out=str(out), student=student)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
@pytest.mark.parametrize("student", ["deeplab"])
def test_distil_stage_resumes_after_kill_with_identical_weights(toy_objects, tmp_path, student):
    ref = _distil_process(toy_objects, tmp_path / "ref", student)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]
    killed = tmp_path / "killed"
    proc = _distil_process(toy_objects, killed, student)
    ckpts = killed / "distil" / "checkpoints"
    start = time.time()
    while not (ckpts / "step-00000002.pt").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - start < 600
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (ckpts / "step-00000006.pt").exists(), "the kill came too late to test resume"
    resumed = _distil_process(toy_objects, killed, student)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    a = torch.load(tmp_path / "ref" / "distil" / "checkpoints" / "step-00000006.pt", weights_only=True)
    b = torch.load(ckpts / "step-00000006.pt", weights_only=True)
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), f"{key} differs after kill and resume"


TINY_TOY = ["data.res=48", "data.eval_res=48", "data.batch_size=4", "maskdistill.mine.short_side=48",
            "maskdistill.detect.num_steps=2", "maskdistill.detect.batch_size=2", "maskdistill.detect.min_sizes=[48]",
            "maskdistill.detect.test_min_size=48", "maskdistill.detect.max_size=96",
            "maskdistill.detect.detections_per_img=5", "maskdistill.distil.student=head",
            "maskdistill.distil.epochs=1", "maskdistill.distil.linear_epochs=1", "maskdistill.distil.batch_size=4",
            "maskdistill.distil.linear_batch_size=4", "tracking.enabled=false", "train.checkpoint_every=1"]


@pytest.mark.slow
def test_toy_recipe_runs_every_stage_from_the_cli(tmp_path, capsys):
    """`dist-seg maskdistill maskdistill_toy` on 1 process: masks → name → detect → pseudo → distil → linear →
    eval, the results table printed and saved; a second run skips every stage and reproduces the table."""
    from dist_seg import cli
    from dist_seg.data.toy_objects import generate_toy_objects
    from dist_seg.pipeline import RESULTS_NAME

    root, out = tmp_path / "data", tmp_path / "run"
    generate_toy_objects(root, num_classes=3, num_train=8, num_val=4, size=48, samples_per_shard=2)
    args = ["maskdistill", "maskdistill_toy", f"data.root={root}", f"train.output_dir={out}", *TINY_TOY]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| initial masks + K-means | train |" in printed and "| student (head) | val |" in printed
    import json

    result = json.loads((out / RESULTS_NAME).read_text())
    assert [r["product"] for r in result["rows"]] == ["initial masks + K-means", "Mask R-CNN pseudo-labels",
                                                      "reference: all background", "reference: all background",
                                                      "student (head)", "student (head)"]
    assert result["num_classes"] == 4 and all(0 <= r["cluster_mIoU"] <= 100 for r in result["rows"])
    assert result["rows"][-1]["linear_mIoU"] is not None
    # Table 3 (toy_objects has instance ground truth): the mined masks and the candidates, three settings each.
    assert [r["product"] for r in result["instances"]] == ["masks (maskdistill)", "Mask R-CNN candidates (†)"]
    assert all(0 <= r[s]["AP50"] <= 100 for r in result["instances"]
               for s in ("agnostic_multi", "semantic_single", "semantic_multi"))
    assert "Mask AP (COCOeval segm, %) on train (8 images" in printed
    for stage in ("detect", "distil", "linear"):
        assert (out / stage / "checkpoints" / "step-00000002.pt").is_file(), f"{stage} did not finish"
    mtimes = {p: p.stat().st_mtime for p in out.rglob("step-*.pt")}
    assert cli.main(args) == 0
    assert {p: p.stat().st_mtime for p in out.rglob("step-*.pt")} == mtimes, "finished stages are skipped"
    assert json.loads((out / RESULTS_NAME).read_text())["rows"] == result["rows"]


@pytest.mark.slow
def test_toy_recipe_runs_every_stage_on_two_cpu_ranks(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 recipes/maskdistill_toy.py` (gloo): every stage,
    the training stages (detect, distil, linear) under DDP on both ranks, one results table."""
    import json

    from dist_seg.data.toy_objects import generate_toy_objects
    from dist_seg.pipeline import RESULTS_NAME

    root, out = tmp_path / "data", tmp_path / "run"
    generate_toy_objects(root, num_classes=3, num_train=8, num_val=4, size=48, samples_per_shard=2)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           str(REPO / "recipes" / "maskdistill_toy.py"), f"data.root={root}", f"train.output_dir={out}", *TINY_TOY]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dist-seg maskdistill: wrote") == 1, "one process reports"
    for stage in ("detect", "distil", "linear"):
        state = torch.load(out / stage / "checkpoints" / "step-00000002.pt", map_location="cpu", weights_only=False)
        assert state["meta"]["world_size"] == 2, f"{stage} did not train on 2 ranks"
    assert len(json.loads((out / RESULTS_NAME).read_text())["rows"]) == 6
