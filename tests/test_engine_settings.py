"""Engine settings a GPU run depends on, checked on CPU: deterministic sampling, the process-group timeout,
DDP's ``find_unused_parameters`` per method, the refusal of Accelerate's DeepSpeed plugin, TF32 and the
backbone's precision (issue 19 C9-C12, issue 20 precision)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from dist_seg.config import ConfigError, RunConfig, merge


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
    with pytest.raises(ConfigError, match="dist_timeout_min"):
        merge(RunConfig(), overrides=["train.dist_timeout_min=0"])


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
    if expected or method == "maskdistill":
        return
    from dist_seg.methods.base import Batch, StepContext

    ctx = StepContext(step=0, seed=0, rank=0, world_size=1, local_batch=2)
    feats = torch.randn(2, 16, 6, 6)
    for label in (torch.randint(0, 3, (2, 24, 24)), None):
        m.zero_grad(set_to_none=True)
        loss, _ = m(Batch(feats=feats, partner_feats=torch.randn(2, 16, 6, 6), label=label), ctx)
        loss.backward()
        unused = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"{method} (labels={label is not None}): parameters outside the graph {unused}"


def test_maskrcnn_keeps_ddp_search_for_unused_parameters():
    from dist_seg.methods import method_class

    # torchvision's detection heads are not all reached by every image's loss; DDP must keep looking.
    assert method_class("maskrcnn").find_unused_parameters is True
