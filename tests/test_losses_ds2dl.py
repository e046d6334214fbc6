"""DS²DL losses against plain transcriptions of SPEC §4 (values and gradients) and POT's Sinkhorn."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from dist_seg.losses.ds2dl import (
    affinity_loss,
    l2g_loss,
    orthogonality_loss,
    self_label_loss,
    sinkhorn,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ transcriptions
def ref_affinity(sim, target, bias, r):
    t = sim + bias
    q1 = torch.log(1 + torch.exp(-t / r))
    q2 = torch.log(1 + torch.exp(r * t))
    return (target * q1 + (1 - target) * q2).mean()


def ref_sinkhorn(m, eps, iters):
    """M is [K, N] for one image; returns Q [K, N] (float64, plain exp, no log domain)."""
    k, n = m.shape
    q = torch.exp(m.double() / eps)
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) * (n / k)
        assert torch.allclose(q.sum(dim=1), torch.full((k,), n / k, dtype=q.dtype)), "row step must give rows N/K"
        q = q / q.sum(dim=0, keepdim=True)
    return q


def ref_l2g(codes, logits, tau):
    p = torch.exp(logits / tau) / torch.exp(logits / tau).sum(dim=1, keepdim=True)
    return -(codes * torch.log(p)).sum(dim=1).mean()


def ref_orth(p):
    pn = p / p.norm(dim=1, keepdim=True)
    return (pn @ pn.T - torch.eye(p.shape[0], dtype=p.dtype)).abs().sum()


def ref_self_label(local, glob, tau):
    k = local.shape[1]
    onehot = F.one_hot(glob.argmax(dim=1), k).movedim(-1, 1).to(local.dtype)
    logp = torch.log(torch.exp(local / tau) / torch.exp(local / tau).sum(dim=1, keepdim=True))
    return -(onehot * logp).sum(dim=1).mean()


# ------------------------------------------------------------------------------------------ affinity
@pytest.mark.parametrize("r", [1.0, 2.1, 6.0])
@pytest.mark.parametrize("shape", [(2, 9, 9), (3, 4, 5, 4, 5), (7,)])
def test_affinity_loss_matches_transcription(r, shape):
    """Values and gradients into sim, target and bias: the function is pure (nothing detached inside)."""
    g = _gen(1)
    sim = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    target = torch.rand(shape, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    got = affinity_loss(sim, target, bias, r)
    got_grads = torch.autograd.grad(got, (sim, target, bias))
    want = ref_affinity(sim, target, bias, r)
    want_grads = torch.autograd.grad(want, (sim, target, bias))
    assert got.dim() == 0, "affinity_loss must return a scalar"
    assert torch.allclose(got, want, atol=1e-12), f"r={r}: {got.item()} vs {want.item()}"
    for name, a, b in zip(("sim", "target", "bias"), got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-12), f"r={r}: gradient w.r.t. {name} differs from the transcription"
    # SPEC §4: d/dy = softplus(−t/r) − softplus(r·t), per pair, divided by the number of pairs of the mean
    t = (sim + bias).detach()
    dy = (torch.log(1 + torch.exp(-t / r)) - torch.log(1 + torch.exp(r * t))) / sim.numel()
    assert torch.allclose(got_grads[1], dy, atol=1e-12), "gradient into the soft labels must be SPEC's closed form"


def test_affinity_loss_r1_is_bce_with_logits():
    g = _gen(2)
    sim = (torch.rand(4, 30, 30, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    target = torch.rand(4, 30, 30, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.tensor(-0.2, dtype=torch.float64, requires_grad=True)
    got = affinity_loss(sim, target, bias, 1.0)
    want = F.binary_cross_entropy_with_logits(sim + bias, target)
    assert torch.allclose(got, want, atol=1e-12), f"r=1 must be BCE with logits: {got.item()} vs {want.item()}"
    for a, b, name in zip(torch.autograd.grad(got, (sim, target, bias)),
                          torch.autograd.grad(want, (sim, target, bias)), ("sim", "target", "bias")):
        assert torch.allclose(a, b, atol=1e-12), f"r=1: gradient w.r.t. {name} differs from BCE with logits"


def test_affinity_loss_mining_direction():
    # Larger r must weigh a hard negative (high similarity, y=0) more and a hard positive (low similarity, y=1) less.
    hard_neg = affinity_loss(torch.tensor([0.5]), torch.tensor([0.0]), 0.0, 3.0)
    hard_neg_bce = affinity_loss(torch.tensor([0.5]), torch.tensor([0.0]), 0.0, 1.0)
    hard_pos = affinity_loss(torch.tensor([-0.5]), torch.tensor([1.0]), 0.0, 3.0)
    hard_pos_bce = affinity_loss(torch.tensor([-0.5]), torch.tensor([1.0]), 0.0, 1.0)
    assert hard_neg > hard_neg_bce and hard_pos < hard_pos_bce, (
        "r>1 must emphasise hard negatives, soften hard positives"
    )


# ------------------------------------------------------------------------------------------ sinkhorn
@pytest.mark.parametrize("iters", [1, 3, 7])
def test_sinkhorn_matches_transcription_and_marginals(iters):
    g = _gen(3)
    b, k, h, w = 3, 5, 6, 7
    scores = torch.rand(b, k, h, w, generator=g, dtype=torch.float64) * 2 - 1
    q = sinkhorn(scores, 0.1, iters)
    assert q.shape == scores.shape, f"sinkhorn must keep the shape, got {tuple(q.shape)}"
    for i in range(b):
        want = ref_sinkhorn(scores[i].reshape(k, -1), 0.1, iters).reshape(k, h, w)
        assert torch.allclose(q[i], want, atol=1e-10), f"image {i}, {iters} iterations: differs from transcription"
    # SPEC order is (rows, then columns): the returned Q ends on a column step, so columns sum exactly to 1
    assert torch.allclose(q.sum(dim=1), torch.ones(b, h, w, dtype=q.dtype), atol=1e-10), "columns must sum to 1"


def test_sinkhorn_rows_approach_n_over_k():
    g = _gen(4)
    k, n = 4, 50
    scores = torch.rand(2, k, n, generator=g) * 2 - 1
    errs = [(sinkhorn(scores, 0.1, it).sum(dim=2) - n / k).abs().max().item() for it in (1, 3, 30, 300)]
    assert errs[-1] < 1e-3 * n / k, f"rows must converge to N/K = {n / k}, errors {errs}"
    assert errs[0] > errs[-1], f"row marginal error must shrink with iterations: {errs}"


@pytest.mark.parametrize("eps", [0.1, 0.05])
def test_sinkhorn_converged_equals_pot(eps):
    g = _gen(5)
    k, n = 5, 40
    scores = torch.rand(1, k, n, generator=g, dtype=torch.float64) * 2 - 1
    q = sinkhorn(scores, eps, 2000)[0].numpy()
    m = scores[0].numpy()
    plan = ot.sinkhorn(np.full(k, 1 / k), np.full(n, 1 / n), -m, reg=eps, numItermax=100000, stopThr=1e-13)
    assert np.allclose(q, plan * n, atol=1e-8), f"eps={eps}: max diff {np.abs(q - plan * n).max()}"


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_sinkhorn_fp32_stable_for_small_eps_and_large_scores(scale):
    g = _gen(6)
    k, n = 6, 64
    scores = (torch.rand(2, k, n, generator=g) * 2 - 1) * scale
    q = sinkhorn(scores, 0.01, 3)
    assert q.dtype == torch.float32
    assert torch.isfinite(q).all(), f"scale {scale}: NaN/inf in Sinkhorn output"
    assert torch.allclose(q.sum(dim=1), torch.ones(2, n), atol=1e-5), f"scale {scale}: columns must sum to 1"
    # and the fp32 result agrees with POT's log-domain solver once converged (scale 1: a well-posed problem)
    if scale == 1.0:
        conv = sinkhorn(scores, 0.01, 3000)[0].double().numpy()
        plan = ot.sinkhorn(np.full(k, 1 / k), np.full(n, 1 / n), -scores[0].double().numpy(), reg=0.01,
                           method="sinkhorn_log", numItermax=100000, stopThr=1e-12)
        assert np.allclose(conv, plan * n, atol=1e-3), (
            f"fp32 converged Sinkhorn off POT by {np.abs(conv - plan * n).max()}"
        )


def test_sinkhorn_half_input_and_no_grad():
    scores = (torch.rand(1, 3, 10) * 2 - 1).half().requires_grad_()
    q = sinkhorn(scores, 0.05, 3)
    assert q.dtype == torch.float32 and not q.requires_grad, "codes are fp32 constants"


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one iteration"):
        sinkhorn(torch.zeros(1, 2, 3), 0.1, 0)
    with pytest.raises(ValueError, match="cluster dim second"):
        sinkhorn(torch.zeros(2, 3), 0.1, 3)


# ---------------------------------------------------------------------------- l2g / orth / self-label
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 4, 7)])
def test_l2g_loss_matches_transcription(shape):
    g = _gen(7)
    logits = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    codes = sinkhorn(torch.rand(shape, generator=g, dtype=torch.float64), 0.1, 3)
    got = l2g_loss(codes, logits, 0.1)
    got.backward()
    grad = logits.grad.clone()
    logits.grad = None
    want = ref_l2g(codes, logits, 0.1)
    want.backward()
    assert torch.allclose(got, want, atol=1e-10), f"{got.item()} vs {want.item()}"
    assert torch.allclose(grad, logits.grad, atol=1e-10), "l2g gradient w.r.t. local logits differs"


def test_orthogonality_loss_matches_transcription():
    g = _gen(8)
    p = torch.randn(6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    got = orthogonality_loss(p)
    got.backward()
    grad = p.grad.clone()
    p.grad = None
    want = ref_orth(p)
    want.backward()
    assert torch.allclose(got, want, atol=1e-10) and torch.allclose(grad, p.grad, atol=1e-10), "orth loss differs"
    ortho = torch.linalg.qr(torch.randn(16, 6, generator=g, dtype=torch.float64))[0].T * 3.0
    assert orthogonality_loss(ortho).item() < 1e-10, "scaled orthonormal prototypes must have zero loss"


@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 4, 7)])
def test_self_label_loss_matches_transcription(shape):
    g = _gen(9)
    local = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    glob = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    got = self_label_loss(local, glob, 0.1)
    got.backward()
    assert glob.grad is None, "the pseudo label must carry no gradient"
    grad = local.grad.clone()
    local.grad = None
    want = ref_self_label(local, glob, 0.1)
    want.backward()
    assert torch.allclose(got, want, atol=1e-10), f"{got.item()} vs {want.item()}"
    assert torch.allclose(grad, local.grad, atol=1e-10), "self-label gradient differs"
