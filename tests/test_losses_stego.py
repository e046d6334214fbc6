"""STEGO correlation term against a loop-by-loop transcription of SPEC §3."""

import itertools

import pytest
import torch

from dist_seg.losses.stego import (
    correlation_term,
    feature_correlation,
    mean_feature_correlation,
    norm,
    stacked_correlation_term,
)

FLAGS = list(itertools.product([False, True], repeat=3))  # spatial_center, zero_clamp, stabilize


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-10)


def reference_term(fa, fb, ca, cb, shift, spatial_center, zero_clamp, stabilize):
    """SPEC §3 written out element by element (slow, obviously correct)."""
    B, _, S, _ = fa.shape
    points = list(itertools.product(range(S), range(S)))
    with torch.no_grad():
        F = torch.zeros(B, S, S, S, S, dtype=fa.dtype)
        for n, (h, w), (i, j) in itertools.product(range(B), points, points):
            F[n, h, w, i, j] = torch.dot(_unit(fa[n, :, h, w]), _unit(fb[n, :, i, j]))
        if spatial_center:
            m = F.mean()
            for n, (h, w) in itertools.product(range(B), points):
                F[n, h, w] = F[n, h, w] - F[n, h, w].mean()
            F = F - F.mean() + m
    losses, corrs = [], []
    for n, (h, w), (i, j) in itertools.product(range(B), points, points):
        c = torch.dot(_unit(ca[n, :, h, w]), _unit(cb[n, :, i, j]))
        clamped = c
        if zero_clamp:
            clamped = torch.clamp(clamped, min=0.0)
        if stabilize:
            clamped = torch.clamp(clamped, max=0.8)
        losses.append(-clamped * (F[n, h, w, i, j] - shift))
        corrs.append(c)
    return torch.stack(losses).view(B, S, S, S, S), torch.stack(corrs).view(B, S, S, S, S)


def _inputs(seed, B=2, C=5, D=3, S=3, n=None):
    g = torch.Generator().manual_seed(seed)
    lead = () if n is None else (n,)
    fa = torch.randn(B, C, S, S, generator=g, dtype=torch.float64)
    fb = torch.randn(*lead, B, C, S, S, generator=g, dtype=torch.float64)
    ca = torch.randn(B, D, S, S, generator=g, dtype=torch.float64)
    cb = torch.randn(*lead, B, D, S, S, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (fa, fb, ca, cb)]


@pytest.mark.parametrize("spatial_center,zero_clamp,stabilize", FLAGS)
@pytest.mark.parametrize("self_pair", [False, True])
def test_correlation_term_matches_reference(spatial_center, zero_clamp, stabilize, self_pair):
    fa, fb, ca, cb = _inputs(1)
    if self_pair:
        fb, cb = fa, ca
    shift = 0.23
    L, Cs = correlation_term(fa, fb, ca, cb, shift, spatial_center=spatial_center, zero_clamp=zero_clamp,
                             stabilize=stabilize)
    L_ref, Cs_ref = reference_term(fa, fb, ca, cb, shift, spatial_center, zero_clamp, stabilize)
    assert L.shape == (2, 3, 3, 3, 3) and Cs.shape == L.shape, f"unexpected shapes {L.shape}, {Cs.shape}"
    torch.testing.assert_close(L, L_ref, msg="correlation_term values differ from SPEC §3")
    torch.testing.assert_close(Cs, Cs_ref, msg="code correlation differs from SPEC §3")
    assert (Cs_ref < 0).any() and (Cs_ref > 0.8).any(), "test inputs must exercise both clamps"

    weights = torch.randn(L.shape, generator=torch.Generator().manual_seed(9), dtype=L.dtype)
    inputs = (ca,) if self_pair else (ca, cb)
    grads = torch.autograd.grad((L * weights).sum(), inputs)
    grads_ref = torch.autograd.grad((L_ref * weights).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, msg="gradient wrt the codes differs from SPEC §3")
    feat_grads = torch.autograd.grad(L.sum(), (fa,) if self_pair else (fa, fb), allow_unused=True)
    assert all(g is None for g in feat_grads), "the feature correlation F must carry no gradient"


def test_spatial_center_rows_have_the_restored_mean():
    fa, fb, _, _ = _inputs(2)
    raw = feature_correlation(fa, fb, spatial_center=False)
    centred = feature_correlation(fa, fb, spatial_center=True)
    row_means = centred.mean(dim=(3, 4))
    torch.testing.assert_close(row_means, torch.full_like(row_means, raw.mean().item()),
                               msg="each anchor point's centred correlations must average to the global mean m")
    assert not centred.requires_grad and not raw.requires_grad, "F must be computed without gradient"


@pytest.mark.parametrize("spatial_center", [False, True])
def test_stacked_negatives_equal_loop_over_derangements(spatial_center):
    n = 4
    fa, fbs, ca, cbs = _inputs(3, B=3, n=n)
    kw = {"spatial_center": spatial_center, "zero_clamp": True, "stabilize": False}
    L, Cs = stacked_correlation_term(fa, fbs, ca, cbs, 0.5, **kw)
    assert L.shape == (n, 3, 3, 3, 3, 3), f"stacked shape {L.shape}"
    loop = [correlation_term(fa, fbs[k], ca, cbs[k], 0.5, **kw) for k in range(n)]
    torch.testing.assert_close(L, torch.stack([term for term, _ in loop]), msg="stacked L differs from the loop")
    torch.testing.assert_close(Cs, torch.stack([c for _, c in loop]), msg="stacked Cs differs from the loop")
    g = torch.autograd.grad(L.mean(), (ca, cbs))
    g_loop = torch.autograd.grad(torch.stack([term.mean() for term, _ in loop]).mean(), (ca, cbs))
    for a, b in zip(g, g_loop):
        torch.testing.assert_close(a, b, msg="stacked gradients differ from the loop")


def test_mean_feature_correlation_and_split_invariance():
    fa, fb, ca, cb = _inputs(4, B=4)
    raw = feature_correlation(fa, fb, spatial_center=False)
    torch.testing.assert_close(mean_feature_correlation(fa, fb), raw.mean(dim=(1, 2, 3, 4)),
                               msg="per-row mean of F computed from point means is wrong")
    kw = {"spatial_center": True, "zero_clamp": False}
    whole, _ = correlation_term(fa, fb, ca, cb, 0.1, **kw)
    m = mean_feature_correlation(fa, fb).mean()
    halves = [correlation_term(fa[s], fb[s], ca[s], cb[s], 0.1, feature_mean=m, **kw)[0]
              for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(torch.cat(halves), whole,
                               msg="with the batch's feature_mean, halves of a batch must give the whole-batch term")
    plain_halves = torch.cat([correlation_term(fa[s], fb[s], ca[s], cb[s], 0.1, **kw)[0]
                              for s in (slice(0, 2), slice(2, 4))])
    assert not torch.allclose(plain_halves, whole), "the default m must be the mean over the call's own rows"


def test_norm_and_bad_feature_mean():
    t = torch.zeros(1, 3, 2, 2)
    assert torch.isfinite(norm(t)).all(), "norm of a zero vector must not be NaN (eps 1e-10)"
    fa, fb, ca, cb = _inputs(5, n=2)
    with pytest.raises(ValueError, match="feature_mean"):
        stacked_correlation_term(fa, fb, ca, cb, 0.0, spatial_center=True, zero_clamp=True,
                                 feature_mean=torch.zeros(3))


def test_target_correlation_stays_float32_under_bf16_autocast():
    """The no-grad target F is computed in float32 even under bf16 autocast (review C8); only the code side
    follows autocast. F is bit-identical to the float32 computation, and L uses it unrounded."""
    from dist_seg.losses.stego import feature_correlation

    gen = torch.Generator().manual_seed(3)
    fa, fb = torch.randn(2, 16, 5, 5, generator=gen), torch.randn(2, 16, 5, 5, generator=gen)
    ca, cb = torch.randn(2, 8, 5, 5, generator=gen), torch.randn(2, 8, 5, 5, generator=gen)
    want = feature_correlation(fa, fb, spatial_center=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = feature_correlation(fa, fb, spatial_center=True)
        loss, cd = correlation_term(fa, fb, ca, cb, 0.2, spatial_center=True, zero_clamp=True)
        means = mean_feature_correlation(fa, fb)
        code_side = torch.einsum("nchw,ncij->nhwij", ca, cb)
    assert code_side.dtype == torch.bfloat16, "setup: autocast must lower einsums to bf16 on this machine"
    assert got.dtype == torch.float32 and torch.equal(got, want), "F must be the float32 volume under autocast"
    assert means.dtype == torch.float32
    assert loss.dtype == torch.float32, f"L = -clamp(Cs)·(F - b) must carry the float32 F, got {loss.dtype}"
    assert torch.equal(loss, -cd.clamp(min=0).float() * (want - 0.2)), "L must use F unrounded"
