"""Engine settings a GPU run depends on, checked on CPU: deterministic sampling, the process-group timeout,
DDP's ``find_unused_parameters`` per method, the refusal of Accelerate's DeepSpeed plugin, TF32 and the
backbone's precision (issue 19 C9-C12, issue 20 precision)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from dist_seg.config import ConfigError, RunConfig, from_yaml, merge


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_grid_sample_equals_torch_in_values_and_gradients(deterministic):
    from dist_seg.methods.base import grid_sample

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(3, 4, 4, 2, generator=gen, dtype=torch.float64) * 2.4 - 1.2  # some outside: border
    coords[0, 0, 0] = torch.tensor([1.0, -1.0], dtype=torch.float64)  # exact corners and grid points
    coords[0, 0, 1] = torch.tensor([0.2, 1.0 / 3.0], dtype=torch.float64)
    want = F.grid_sample(t, coords, mode="bilinear", padding_mode="border", align_corners=True)
    got = grid_sample(t, coords)
    assert got.shape == (3, 5, 4, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg="the matrix form must be grid_sample")
    weights = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (g_want,) = torch.autograd.grad((want * weights).sum(), t)
    (g_got,) = torch.autograd.grad((got * weights).sum(), t)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12, msg="gradients differ from grid_sample's")
    fn = got.grad_fn
    names = set()
    stack = [fn]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ in names:
            continue
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert not any("GridSampler" in n for n in names), f"deterministic mode must not backprop grid_sample: {names}"


def test_configure_precision_deterministic_sets_cublas_workspace(monkeypatch):
    from dist_seg.trainer import configure_precision

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        configure_precision(merge(RunConfig(), overrides=["train.deterministic=true"]), torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _accelerator_kwargs(monkeypatch, *overrides: str) -> dict:
    """The keyword arguments make_accelerator passes to Accelerate's handlers (read off the real objects)."""
    import accelerate

    from dist_seg import runtime

    seen = {}

    class Spy(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            seen["handlers"] = kwargs["kwargs_handlers"]
            seen["mixed_precision"] = kwargs["mixed_precision"]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Spy)
    acc = runtime.make_accelerator(merge(RunConfig(), overrides=list(overrides)))
    acc.end_training()
    return {type(h).__name__: h.to_kwargs() for h in seen["handlers"]}


def test_process_group_timeout_is_explicit(monkeypatch):
    kwargs = _accelerator_kwargs(monkeypatch)
    assert kwargs["InitProcessGroupKwargs"] == {"timeout": timedelta(minutes=60)}
    kwargs = _accelerator_kwargs(monkeypatch, "train.dist_timeout_min=5")
    assert kwargs["InitProcessGroupKwargs"] == {"timeout": timedelta(minutes=5)}
    kwargs = _accelerator_kwargs(monkeypatch, "train.init_timeout_min=7")
    assert kwargs["InitProcessGroupKwargs"] == {"timeout": timedelta(minutes=7)}
    with pytest.raises(ConfigError, match="dist_timeout_min"):
        merge(RunConfig(), overrides=["train.dist_timeout_min=0"])
    with pytest.raises(ConfigError, match="step_timeout_s"):
        merge(RunConfig(), overrides=["train.step_timeout_s=0"])
    # A config saved before the rename (a checkpoint's, a YAML file) still loads, into the new name.
    old = from_yaml(RunConfig, "train:\n  dist_timeout_min: 30\n")
    assert old.train.init_timeout_min == 30 and old.train.dist_timeout_min is None
    assert RunConfig().train.step_timeout_s <= 300, "the training-loop timeout is at most 5 minutes by default"


def test_accelerate_deepspeed_plugin_is_refused_with_the_working_route(monkeypatch):
    from dist_seg.runtime import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="train.deepspeed_config=launch/deepspeed_zero2.json"):
        make_accelerator(RunConfig())


@pytest.mark.parametrize("method, extra, expected", [
    ("stego", (), False),
    ("ds2dl", (), False),
    ("baseline", (), False),
    ("maskdistill", ("maskdistill.distil.student=head",), False),
    ("maskdistill", ("maskdistill.distil.student=deeplab", "maskdistill.distil.init=random"), True),
])
def test_find_unused_parameters_per_method(tmp_path, method, extra, expected):
    """False exactly where one step's loss reaches every trainable parameter (checked here, with and without
    labels for the probes), True where it may not."""
    from dist_seg.data.toy import generate_toy
    from dist_seg.methods import build_method

    generate_toy(tmp_path, num_train=4, num_val=2, samples_per_shard=4)
    cfg = merge(RunConfig(), overrides=[f"method={method}", f"data.root={tmp_path}", *extra])
    m = build_method(cfg, feat_dim=16, num_classes=3, has_labels=True)
    assert m.find_unused_parameters is expected, f"{method} {extra}: find_unused_parameters={m.find_unused_parameters}"
    if expected:
        return
    from dist_seg.methods.base import Batch, StepContext

    ctx = StepContext(step=0, seed=0, rank=0, world_size=1, local_batch=2)
    feats = torch.randn(2, 16, 6, 6)
    # MaskDistill always trains on (pseudo-)labels; the probes of the others must also work without them.
    for label in (torch.randint(0, 3, (2, 24, 24)),) + (() if method == "maskdistill" else (None,)):
        m.zero_grad(set_to_none=True)
        loss, _ = m(Batch(feats=feats, partner_feats=torch.randn(2, 16, 6, 6), label=label), ctx)
        loss.backward()
        unused = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"{method} (labels={label is not None}): parameters outside the graph {unused}"


def test_maskrcnn_keeps_ddp_search_for_unused_parameters():
    from dist_seg.methods import method_class

    # torchvision's detection heads are not all reached by every image's loss; DDP must keep looking.
    assert method_class("maskrcnn").find_unused_parameters is True


def test_backbone_dtype_auto_follows_precision_and_the_device():
    from dist_seg.backbones import backbone_dtype

    assert backbone_dtype("fp32", "bf16") is None, "fp32 forces full precision"
    assert backbone_dtype("bf16") is torch.bfloat16 and backbone_dtype("fp16") is torch.float16
    assert backbone_dtype("auto", "fp16") is torch.float16, "auto follows train.mixed_precision when it is set"
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert backbone_dtype("auto", "no") is (torch.bfloat16 if gpu_bf16 else None)
    assert RunConfig().backbone.dtype == "auto"
    with pytest.raises(ConfigError, match="backbone.dtype"):
        merge(RunConfig(), overrides=["backbone.dtype=int8"])


def test_tf32_for_the_head_never_for_the_exact_knn():
    from dist_seg.knn import _full_precision_matmul
    from dist_seg.trainer import configure_precision

    before = torch.get_float32_matmul_precision()
    try:
        # The CUDA branch only sets flags, so it can be checked without a GPU.
        configure_precision(RunConfig(), torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        with _full_precision_matmul():
            assert not torch.backends.cuda.matmul.allow_tf32, "the exact KNN search must run in full float32"
        assert torch.backends.cuda.matmul.allow_tf32, "TF32 comes back after the KNN block"
        configure_precision(merge(RunConfig(), overrides=["train.allow_tf32=false"]), torch.device("cuda"))
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("method", ["stego", "ds2dl"])
def test_losses_stay_float32_with_bf16_weights_under_the_trainers_autocast(method):
    """DeepSpeed's bf16 route keeps the trainer's autocast (a DDP-type Accelerator): with the weights cast to
    bf16, as DeepSpeed does, the probes' cross-entropy and the method's loss come out in float32."""
    from dist_seg.methods import build_method
    from dist_seg.methods.base import Batch, StepContext

    cfg = merge(RunConfig(), overrides=[f"method={method}", "stego.dim=8", "ds2dl.dim=8", "stego.feature_samples=4",
                                        "ds2dl.feature_samples=4", "stego.neg_samples=2"])
    m = build_method(cfg, feat_dim=16, num_classes=3, has_labels=True)
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16)
    ctx = StepContext(step=0, seed=0, rank=0, world_size=1, local_batch=2)
    gen = torch.Generator().manual_seed(0)
    batch = Batch(feats=torch.randn(2, 16, 6, 6, generator=gen).bfloat16(),
                  partner_feats=torch.randn(2, 16, 6, 6, generator=gen).bfloat16(),
                  label=torch.randint(0, 3, (2, 24, 24), generator=gen))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = m.training_loss(batch, ctx)
        if method == "stego":
            code = m.encode(batch.feats)
            probes = m.probe_losses(code, batch.label)
            assert {k: v.dtype for k, v in probes.items()} == {"loss_cluster": torch.float32,
                                                               "loss_linear": torch.float32}
    assert loss.dtype == torch.float32, f"{method}: the loss is {loss.dtype} under bf16 weights"
    assert torch.isfinite(loss)
