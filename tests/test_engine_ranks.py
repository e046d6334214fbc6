"""The trainer's DeepSpeed path on two gloo ranks: identical set-up on every rank, and bf16 weights that
validate and checkpoint their fp32 master copy (issue 19, review items A1 and A2).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
ZERO2_JSON = REPO / "launch" / "deepspeed_zero2.json"
WORLD = 2


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy_engine")
    # 8 training and 2 validation shards: each of the 2 ranks streams other shards, so a per-rank PCA fit would differ.
    generate_toy(root, num_train=32, num_val=8, samples_per_shard=4)
    return root


def _config(recipe: str, root: str, out: str, *extra: str):
    from dist_seg.config import merge
    from dist_seg.runtime import load_recipe

    return merge(load_recipe(str(REPO / "recipes" / f"{recipe}.py"))(), overrides=[
        f"data.root={root}", f"train.output_dir={out}", "data.batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=8", "tracking.enabled=false", "stego.feature_samples=4", "stego.neg_samples=2",
        "ds2dl.feature_samples=4", f"train.deepspeed_config={ZERO2_JSON}", *extra])


def _buffers_after_setup(rank: int, world: int, recipe: str, root: str, out: str, extra: tuple) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "1"
    from dist_seg.trainer import Trainer

    trainer = Trainer(_config(recipe, root, out, *extra))
    buffers = {name: b.detach().cpu().clone() for name, b in trainer.unwrapped.named_buffers()}
    engine = type(trainer.engine).__name__
    trainer.accelerator.end_training()
    return {"buffers": buffers, "engine": engine}


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra, expected", [
    ("ds2dl_toy", (), {"prototypes.global_"}),
    ("stego_toy", ("method=baseline", "baseline.kind=pca", "baseline.dim=8"),
     {"head.mean", "head.components", "head.is_fitted"}),
], ids=["ds2dl", "pca-baseline"])
def test_every_buffer_is_identical_on_all_ranks_under_deepspeed(toy_root, tmp_path, recipe, extra, expected):
    """DeepSpeed broadcasts parameters only: buffers (DS²DL's global prototypes, the PCA baseline's fit) must
    come out of set-up identical on every rank by themselves."""
    r0, r1 = run_distributed(_buffers_after_setup, WORLD, recipe, str(toy_root), str(tmp_path / "run"), extra)
    assert r0["engine"] == "DeepSpeedEngine", f"the run must take the DeepSpeed path, got {r0['engine']}"
    assert expected <= set(r0["buffers"]), f"buffers {sorted(r0['buffers'])} lack {expected - set(r0['buffers'])}"
    for name, value in r0["buffers"].items():
        assert torch.equal(value, r1["buffers"][name]), (
            f"{recipe} {extra}: buffer {name} differs between rank 0 and rank 1 after set-up "
            f"(max |diff| {(value.float() - r1['buffers'][name].float()).abs().max():.3g})")


def _bf16_run(rank: int, world: int, recipe: str, root: str, out: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "1"
    from deepspeed.utils import safe_get_full_fp32_param

    from dist_seg.trainer import Trainer, load_latest_checkpoint

    cfg = _config(recipe, root, out, "train.mixed_precision=bf16", "train.num_steps=2", "train.val_every=0",
                  "train.checkpoint_every=2", "stego.lr=1e-2", "ds2dl.lr=1e-2")
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()  # ends with the final validation, then the final checkpoint
        module = trainer.unwrapped
        weights = {n: p.dtype for n, p in module.named_parameters()}
        master = {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in module.named_parameters()}
        half = {n: p.detach().cpu().float().clone() for n, p in module.named_parameters()}
    finally:
        trainer.accelerator.end_training()
    state, _ = load_latest_checkpoint(cfg)
    return {"val": result["val"], "weights": weights, "master": master, "half": half,
            "saved": {k: v.cpu() for k, v in state["method"].items()}, "step": state["step"]}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["stego_toy", "ds2dl_toy"])
def test_deepspeed_bf16_validates_and_checkpoints_the_fp32_master(toy_root, tmp_path, recipe):
    """ZeRO-2 with bf16 weights (DeepSpeed's CPU accelerator runs bf16) through the trainer: the final
    validation runs, and step-N.pt holds float32 weights equal to DeepSpeed's master copy, not the bf16 ones."""
    runs = run_distributed(_bf16_run, WORLD, recipe, str(toy_root), str(tmp_path / "run"))
    r0 = runs[0]
    assert set(r0["weights"].values()) == {torch.bfloat16}, f"the run must hold bf16 weights, got {r0['weights']}"
    assert r0["step"] == 2
    assert r0["val"] and r0["val"]["cluster"] is not None, "the final validation must produce cluster scores"
    assert 0.0 <= r0["val"]["cluster"]["mIoU"] <= 100.0
    for key in ("mIoU", "Acc"):
        assert runs[1]["val"]["cluster"][key] == r0["val"]["cluster"][key], f"validation {key} differs between ranks"
    rounded_away = 0
    for name, master in r0["master"].items():
        saved = r0["saved"][name]
        assert saved.dtype == torch.float32, f"{name} saved as {saved.dtype}"
        assert torch.equal(saved, master), f"{name}: the checkpoint is not DeepSpeed's fp32 master copy"
        rounded_away += int(not torch.equal(saved, r0["half"][name]))
    assert rounded_away > 0, "the master copy never differs from the bf16 weights: the test proves nothing"
