"""MaskDistill students (SPEC §8.5) through the real torchvision DeepLab-v3 R50 and the trainer, at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dist_seg.config import ConfigError, RunConfig, merge
from dist_seg.methods.base import Batch, StepContext
from dist_seg.methods.maskdistill import FROZEN_STAGES, MaskDistillMethod, use_sync_bn
from tests.dist_utils import run_distributed


@pytest.fixture(scope="module")
def pseudo_root(tmp_path_factory) -> Path:
    """A toy dataset standing in for pseudo-label shards (labels 0..K, 0 = background)."""
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("pseudo")
    generate_toy(root, num_classes=3, num_train=8, num_val=4, size=40, samples_per_shard=2)
    return root


def cfg_for(root: Path, out: Path, *extra: str) -> RunConfig:
    return merge(RunConfig(), overrides=[
        "method=maskdistill", f"data.root={root}", f"train.output_dir={out}", "data.res=33", "data.eval_res=33",
        "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "maskdistill.distil.init=random",
        "maskdistill.distil.size=33", "backbone.name=toy", "train.log_every=1", "tracking.enabled=false",
        "train.val_every=0", "eval.num_overlays=0", *extra])


def _ctx(step: int = 0, b: int = 2) -> StepContext:
    return StepContext(step=step, seed=0, rank=0, world_size=1, local_batch=b)


def test_deeplab_forward_backward_frozen_stages(pseudo_root, tmp_path):
    cfg = cfg_for(pseudo_root, tmp_path)
    method = MaskDistillMethod(cfg, feat_dim=3, num_classes=3, has_labels=True)
    # Output stride 8 (layer3/layer4 dilated, as SPEC §8.5 asks).
    with torch.no_grad():
        feats = method.model.backbone(torch.zeros(1, 3, 40, 40))["out"]
    assert feats.shape[-2:] == (5, 5), f"output stride must be 8, got feature grid {tuple(feats.shape[-2:])}"
    method.train()
    for stage in FROZEN_STAGES:
        module = getattr(method.model.backbone, stage)
        assert all(not p.requires_grad for p in module.parameters()), f"{stage} must be frozen"
        assert all(not m.training for m in module.modules()), f"{stage} BatchNorm must stay in eval mode"
    assert method.model.backbone.layer3.training and method.model.classifier.training
    before = {k: v.clone() for k, v in method.model.backbone.bn1.state_dict().items()}
    images = torch.randn(2, 3, 33, 33)
    label = torch.randint(-1, 3, (2, 33, 33))
    loss, logs = method.training_loss(Batch(images=images, label=label), _ctx())
    loss.backward()
    assert torch.isfinite(loss) and "loss_ohem" in logs
    assert method.model.backbone.layer1[0].conv1.weight.grad is None
    assert method.model.backbone.layer3[0].conv1.weight.grad is not None
    assert all(torch.equal(v, method.model.backbone.bn1.state_dict()[k]) for k, v in before.items()), \
        "frozen BatchNorm statistics must not move"
    method.eval()
    with torch.no_grad():
        out = method.classify(method.encode(torch.randn(1, 3, 20, 28)))["cluster"]
    assert out.shape == (1, 3, 20, 28), "encode returns K+1 logits at the input size"


def test_augment_is_deterministic_and_labels_stay_valid(pseudo_root, tmp_path):
    cfg = cfg_for(pseudo_root, tmp_path, "maskdistill.distil.size=24")
    method = MaskDistillMethod(cfg, feat_dim=3, num_classes=3, has_labels=True)
    images = torch.randn(2, 3, 33, 33)
    label = torch.randint(-1, 3, (2, 33, 33))
    a = method.augment(images, label, _ctx(5))
    b = method.augment(images, label, _ctx(5))
    c = method.augment(images, label, _ctx(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "augmentation is a function of (seed, step)"
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (2, 3, 24, 24) and a[1].shape == (2, 24, 24)
    assert set(a[1].unique().tolist()) <= {0, 1, 2, 255}, "nearest labels: no new ids; border = 0, ignore = 255"
    # The same rows drawn for a global batch of 4 and taken by rank 1 of 2.
    ctx1 = StepContext(step=5, seed=0, rank=1, world_size=2, local_batch=2)
    full = method.augment(torch.cat([images, images]), torch.cat([label, label]),
                          StepContext(step=5, seed=0, rank=0, world_size=1, local_batch=4))
    part = method.augment(images, label, ctx1)
    assert torch.equal(full[0][2:], part[0]), "each rank takes its slice of the global batch's augmentation"


def test_ssl_init_without_weights_names_the_fix(pseudo_root, tmp_path):
    cfg = cfg_for(pseudo_root, tmp_path, "maskdistill.distil.init=ssl")
    with pytest.raises(ConfigError, match="maskdistill.distil.weights=PATH.*init=random"):
        MaskDistillMethod(cfg, feat_dim=3, num_classes=3, has_labels=True)


def test_lr_schedule_and_sync_bn_choice(pseudo_root, tmp_path):
    cfg = cfg_for(pseudo_root, tmp_path, "maskdistill.distil.steps_per_epoch=10", "maskdistill.distil.student=head")
    method = MaskDistillMethod(cfg, feat_dim=8, num_classes=3, has_labels=True)
    base = cfg.maskdistill.distil.head_lr
    assert method.lr_at(0) == base and method.lr_at(409) == base and method.lr_at(410) == pytest.approx(base * 0.1)
    assert use_sync_bn("auto", world_size=2, cuda=True)
    assert not use_sync_bn("auto", world_size=2, cuda=False), "no SyncBN kernel on CPU"
    assert not use_sync_bn("auto", world_size=1, cuda=True) and not use_sync_bn("off", world_size=4, cuda=True)


def _sync_bn_on_cpu(rank: int, world: int) -> str:
    bn = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)))
    try:
        bn(torch.randn(2, 2, 3, 3))
        return "ran"
    except ValueError as err:
        return str(err)


def test_sync_bn_has_no_cpu_kernel_under_gloo():
    """Why ``sync_bn=auto`` keeps plain BatchNorm on CPU ranks: torch refuses SyncBN training on CPU."""
    out = run_distributed(_sync_bn_on_cpu, 2)
    assert all("expected input tensor to be on GPU" in o for o in out), out


def test_linear_protocol_reinitialises_only_the_last_conv(pseudo_root, tmp_path):
    cfg = cfg_for(pseudo_root, tmp_path, "maskdistill.distil.student=head")
    student = MaskDistillMethod(cfg, feat_dim=8, num_classes=3, has_labels=True)
    path = tmp_path / "student.pt"
    torch.save({"step": 1, "method": student.state_dict(), "meta": {"method": "maskdistill"}}, path)
    linear = MaskDistillMethod(merge(cfg, overrides=[f"maskdistill.distil.linear_from={path}"]),
                               feat_dim=8, num_classes=3, has_labels=True)
    assert torch.equal(linear.head.linear.weight, student.head.linear.weight)
    assert not torch.equal(linear.classifier.weight, student.classifier.weight)
    assert torch.count_nonzero(linear.classifier.bias) == 0 and linear.classifier.weight.std() < 0.05
    assert [n for n, p in linear.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    linear.train()
    assert not any(m.training for m in linear.modules()), "the linear protocol freezes dropout/BN too"
    out = linear.classify(linear.encode(torch.randn(1, 8, 4, 4)))
    assert set(out) == {"cluster", "linear"}
    with pytest.raises(ConfigError, match="no such checkpoint"):
        MaskDistillMethod(merge(cfg, overrides=[f"maskdistill.distil.linear_from={tmp_path / 'no.pt'}"]),
                          feat_dim=8, num_classes=3, has_labels=True)


@pytest.mark.parametrize("student", ["deeplab", "head"])
def test_student_trains_through_the_trainer(pseudo_root, tmp_path, student):
    from dist_seg.trainer import load_latest_checkpoint, train

    sizes = ["data.res=32", "data.eval_res=32"] if student == "head" else []  # the toy backbone's patch is 8
    cfg = cfg_for(pseudo_root, tmp_path / student, f"maskdistill.distil.student={student}", "train.num_steps=2", *sizes,
                  "train.checkpoint_every=1", "train.val_every=0", "data.max_val_samples=2")
    result = train(cfg)
    assert result["step"] == 2
    val = result["val"]
    assert val["cluster"] is not None and len(val["cluster"]["assignment"]) == 3, "Hungarian over K+1 classes"
    state, _ = load_latest_checkpoint(cfg)
    assert state["step"] == 2 and state["meta"]["method"] == "maskdistill"
