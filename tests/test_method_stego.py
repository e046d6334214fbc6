"""STEGO head, probes and method: wiring, gradient isolation, training and 2-rank equivalence."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dist_seg import distributed as D
from dist_seg.config import RunConfig, StegoConfig
from dist_seg.heads.probes import ClusterProbe, LinearProbe, upsample_bilinear
from dist_seg.heads.stego import StegoHead
from dist_seg.losses.stego import correlation_term
from dist_seg.methods import build_method, method_class
from dist_seg.methods.base import Batch, StepContext, grid_sample, sample_coords
from dist_seg.methods.stego import StegoMethod
from tests.dist_utils import run_distributed

C, H = 8, 6


def _cfg(**stego) -> RunConfig:
    base = {"dim": 5, "feature_samples": 4, "neg_samples": 3, "dropout": 0.0}
    base.update(stego)
    return RunConfig(method="stego", stego=StegoConfig(**base))


def _method(cfg=None, *, has_labels=True, seed=0, num_classes=3) -> StegoMethod:
    torch.manual_seed(seed)
    return StegoMethod(cfg or _cfg(), feat_dim=C, num_classes=num_classes, has_labels=has_labels)


def _data(batch, seed=0, label_low=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, C, H, H, generator=g)
    partner = feats + 0.3 * torch.randn(batch, C, H, H, generator=g)
    label = torch.randint(label_low, 3, (batch, 2 * H, 2 * H), generator=g)
    return feats, partner, label


def _ctx(batch, step=0, seed=7, rank=0, world=1):
    return StepContext(step=step, seed=seed, rank=rank, world_size=world, local_batch=batch)


# ----------------------------------------------------------------------------------------------- head
def test_head_formula_and_linear_variant():
    torch.manual_seed(0)
    f = torch.randn(2, C, 3, 3)
    head = StegoHead(C, 4, dropout=0.0)
    w1, w2, w3 = head.linear, head.nonlinear[0], head.nonlinear[2]
    expected = w1(f) + w3(torch.relu(w2(f)))
    torch.testing.assert_close(head(f), expected, msg="nonlinear head must be W1 f + W3 relu(W2 f)")
    silu = StegoHead(C, 4, dropout=0.0, activation="silu")
    torch.testing.assert_close(silu(f), silu.linear(f) + silu.nonlinear[2](F.silu(silu.nonlinear[0](f))),
                               msg="activation parameter must switch to SiLU")
    lin = StegoHead(C, 4, projection_type="linear", dropout=0.0)
    assert lin.nonlinear is None and sum(p.numel() for p in lin.parameters()) == C * 4 + 4, "linear keeps only W1"
    torch.testing.assert_close(lin(f), lin.linear(f), msg="linear head must be W1 f")
    with pytest.raises(ValueError, match="activation"):
        StegoHead(C, 4, activation="tanh")


def test_head_dropout_drops_whole_channels():
    head = StegoHead(C, 4, projection_type="linear", dropout=0.5).train()
    dropped = head.dropout(torch.ones(4, C, 5, 5))
    per_channel = dropped.flatten(2)
    assert ((per_channel == 0).all(-1) | (per_channel == 2.0).all(-1)).all(), "Dropout2d must zero whole channels"
    assert (per_channel == 0).any(), "with p=0.5 some channel must be dropped"


# --------------------------------------------------------------------------------------------- probes
def test_cluster_probe_loss_on_hand_made_example():
    probe = ClusterProbe(2, 2)
    with torch.no_grad():
        probe.clusters.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))  # unit centres e1, e2 after norm
    # Three pixels: (3,4) -> cos (0.6, 0.8); (-1,0) -> (-1, 0); (1,1) -> (0.7071, 0.7071).
    code = torch.tensor([[3.0, -1.0, 1.0], [4.0, 0.0, 1.0]]).view(1, 2, 1, 3)
    expected = -(0.8 + 0.0 + math.sqrt(0.5)) / 3
    loss = probe.loss(code)
    assert abs(loss.item() - expected) < 1e-6, f"cluster loss {loss.item()} != {expected}"
    assert probe.predict(code).tolist() == [[[1, 1, 0]]], "prediction must be argmax of the inner products"
    torch.testing.assert_close(probe.log_probs(code).exp().sum(1), torch.ones(1, 1, 3), msg="log_probs must normalise")
    loss.backward()
    assert probe.clusters.grad is not None and probe.clusters.grad.abs().sum() > 0, "centres must get gradient"


def test_linear_probe_ignores_invalid_labels_and_upsamples():
    torch.manual_seed(0)
    probe = LinearProbe(4, 3)
    code = torch.randn(2, 4, 3, 3)
    label = torch.randint(0, 3, (2, 6, 6))
    label[0, :2] = -1
    label[1, 4:] = 255
    logits = F.interpolate(probe(code), size=(6, 6), mode="bilinear", align_corners=False)
    valid = (label >= 0) & (label < 3)
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], label[valid])
    torch.testing.assert_close(probe.loss(code, label), expected, msg="linear loss must average over valid pixels")
    relabelled = label.clone()
    relabelled[~valid] = -1
    torch.testing.assert_close(probe.loss(code, relabelled), expected, msg="-1 and 255 must both be ignored")


@pytest.mark.parametrize(
    "size_in,size_out", [((3, 3), (6, 6)), ((28, 20), (224, 161)), ((7, 9), (4, 5)), ((5, 5), (5, 5))]
)
def test_separable_upsampling_equals_torch_bilinear(size_in, size_out):
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, *size_in, dtype=torch.float64, generator=gen, requires_grad=True)
    want = F.interpolate(t, size=size_out, mode="bilinear", align_corners=False)
    got = upsample_bilinear(t, size_out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    (g_want,) = torch.autograd.grad(want, t, upstream)
    (g_got,) = torch.autograd.grad(got, t, upstream)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def test_linear_probe_trains_after_an_inference_mode_call_of_the_same_size():
    probe = LinearProbe(4, 3)
    code, label = torch.randn(2, 4, 5, 7), torch.randint(0, 3, (2, 13, 11))
    with torch.inference_mode():
        probe.loss(code, label)  # caches the interpolation matrices for this size
    probe.loss(code, label).backward()
    assert probe.conv.weight.grad is not None and probe.conv.weight.grad.abs().sum() > 0


def test_linear_probe_all_ignored_is_zero_not_nan():
    probe = LinearProbe(4, 3)
    loss = probe.loss(torch.randn(2, 4, 3, 3), torch.full((2, 6, 6), -1))
    assert torch.isfinite(loss) and loss.item() == 0.0, f"all-ignored batch must give loss 0, got {loss}"
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and (p.grad == 0).all() for p in probe.parameters()), "grads must be 0"


# --------------------------------------------------------------------------------------------- method
def test_build_method_and_optimizer_groups():
    cfg = _cfg(lr=1e-3, probe_lr=2e-2)
    method = build_method(cfg, feat_dim=C, num_classes=3, has_labels=True)
    assert isinstance(method, StegoMethod) and method_class("stego") is StegoMethod
    with pytest.raises(ValueError, match="unknown method"):
        method_class("nope")
    opt = method.build_optimizer()
    assert isinstance(opt, torch.optim.Adam), "STEGO uses Adam"
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"head", "probes"}, f"groups {set(groups)}"
    assert groups["head"]["lr"] == 1e-3 and groups["probes"]["lr"] == 2e-2, "group learning rates from config"
    head_ids = {id(p) for p in method.head.parameters()}
    probe_ids = {id(p) for p in method.cluster_probe.parameters()} | {id(p) for p in method.linear_probe.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head_ids, "head group must hold exactly the head"
    assert {id(p) for p in groups["probes"]["params"]} == probe_ids, "probe group must hold both probes"


def reference_stego_loss(method, batch, ctx):
    """The correlation loss written from SPEC §3 for a single process, one derangement at a time."""
    sc = method.cfg.stego
    S = sc.feature_samples
    kw = {"spatial_center": sc.pointwise, "zero_clamp": sc.zero_clamp, "stabilize": sc.stabilize}
    code = method.head(batch.feats)
    coords1 = sample_coords(ctx, S, "coords1", "cpu")
    coords2 = sample_coords(ctx, S, "coords2", "cpu")
    f1, c1 = grid_sample(batch.feats, coords1), grid_sample(code, coords1)
    l_self = correlation_term(f1, f1, c1, c1, sc.pos_intra_shift, **kw)[0].mean()
    pcode = method.head(batch.partner_feats)
    l_knn = correlation_term(f1, grid_sample(batch.partner_feats, coords2), c1, grid_sample(pcode, coords2),
                             sc.pos_inter_shift, **kw)[0].mean()
    l_rand = []
    for n in range(sc.neg_samples):
        perm = D.derangement(ctx.global_batch, ctx.generator("neg", n))
        # Negative of anchor i: image perm[i], sampled at its own coords2.
        fneg = grid_sample(batch.feats[perm], coords2[perm])
        cneg = grid_sample(code[perm], coords2[perm])
        l_rand.append(correlation_term(f1, fneg, c1, cneg, sc.neg_inter_shift, **kw)[0].mean())
    return sc.pos_intra_weight * l_self + sc.pos_inter_weight * l_knn + sc.neg_inter_weight * torch.stack(l_rand).mean()


@pytest.mark.parametrize("pointwise", [True, False])
def test_correlation_loss_matches_loop_reference(pointwise):
    method = _method(_cfg(pointwise=pointwise, stabilize=True))
    feats, partner, label = _data(4)
    batch, ctx = Batch(feats=feats, partner_feats=partner, label=label), _ctx(4, step=5)
    loss, logs = method.training_loss(batch, ctx)
    ref = reference_stego_loss(method, batch, ctx)
    assert abs(logs["loss_stego"] - ref.item()) < 1e-5, f"method {logs['loss_stego']} != reference {ref.item()}"
    g = torch.autograd.grad(method.correlation_loss(batch, ctx)[0], list(method.head.parameters()))
    g_ref = torch.autograd.grad(ref, list(method.head.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, msg="head gradients differ from the loop reference")
    expected_total = logs["loss_stego"] + logs["loss_cluster"] + logs["loss_linear"]
    assert abs(loss.item() - expected_total) < 1e-5, "total must be correlation loss + probe losses"


def test_probes_only_get_their_own_gradient_and_labels_never_reach_head():
    method = _method()
    feats, partner, label = _data(4)
    ctx = _ctx(4, step=2)
    batch = Batch(feats=feats, partner_feats=partner, label=label)

    method.zero_grad()
    loss, _logs = method.training_loss(batch, ctx)
    loss.backward()
    head_total = [p.grad.clone() for p in method.head.parameters()]
    probe_total = [p.grad.clone() for p in method.probe_parameters()]
    assert all(g.abs().sum() > 0 for g in head_total), "every head parameter must get a gradient"
    assert all(g.abs().sum() > 0 for g in probe_total), "every probe parameter must get a gradient"

    method.zero_grad(set_to_none=True)
    corr, _, code = method.correlation_loss(batch, ctx)
    corr.backward()
    for a, b in zip(head_total, [p.grad for p in method.head.parameters()]):
        torch.testing.assert_close(a, b, msg="adding probe losses must not change the head gradient")
    assert all(p.grad is None for p in method.probe_parameters()), "correlation loss must not touch the probes"

    method.zero_grad(set_to_none=True)
    sum(method.probe_losses(code.detach(), label).values()).backward()
    for a, b in zip(probe_total, [p.grad for p in method.probe_parameters()]):
        torch.testing.assert_close(a, b, msg="probe gradients must come only from the probe losses")

    method.zero_grad(set_to_none=True)
    other = Batch(feats=feats, partner_feats=partner, label=torch.flip(label, dims=(0,)))
    method.training_loss(other, ctx)[0].backward()
    for a, b in zip(head_total, [p.grad for p in method.head.parameters()]):
        torch.testing.assert_close(a, b, msg="labels must never influence the head")


def _structured_features(batch, seed=0):
    # Four latent classes; each image is a 2x2 arrangement of class regions plus noise.
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, C, generator=g)
    cls = torch.randint(0, 4, (batch, 2, 2), generator=g)
    grid = cls.repeat_interleave(H // 2, 1).repeat_interleave(H // 2, 2)
    feats = protos[grid].permute(0, 3, 1, 2) + 0.2 * torch.randn(batch, C, H, H, generator=g)
    order = torch.roll(torch.arange(batch), 1)
    return feats, feats[order] + 0.1 * torch.randn(batch, C, H, H, generator=g)


def test_loss_decreases_with_adam():
    cfg = _cfg(lr=5e-3, feature_samples=5, pos_intra_weight=1.0, pos_inter_weight=0.5, neg_inter_weight=1.0,
               neg_inter_shift=0.5, pos_intra_shift=0.1, pos_inter_shift=0.1)
    method = _method(cfg, has_labels=False)
    feats, partner = _structured_features(8)
    batch = Batch(feats=feats, partner_feats=partner)
    probe = _ctx(8, step=10_000)
    with torch.no_grad():
        before = method.correlation_loss(batch, probe)[0].item()
        cluster_before = method.cluster_probe.loss(method.head(feats)).item()
    opt = method.build_optimizer()
    for step in range(30):
        opt.zero_grad()
        loss, _ = method.training_loss(batch, _ctx(8, step=step))
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = method.correlation_loss(batch, probe)[0].item()
        cluster_after = method.cluster_probe.loss(method.head(feats)).item()
    assert after < before - 0.02, f"correlation loss did not decrease: {before:.4f} -> {after:.4f}"
    assert cluster_after < cluster_before, f"cluster loss did not decrease: {cluster_before:.4f} -> {cluster_after:.4f}"


def test_missing_partner_skips_knn_with_one_warning():
    method = _method(has_labels=False)
    feats, _, _ = _data(4)
    batch, ctx = Batch(feats=feats), _ctx(4)
    with pytest.warns(UserWarning, match="KNN term is skipped"):
        _, logs = method.training_loss(batch, ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.training_loss(batch, ctx)
    labelled = _method()
    loss, unlabelled_logs = labelled.training_loss(Batch(feats=feats, partner_feats=feats), ctx)
    loss.backward()
    assert "loss_linear" not in unlabelled_logs, "no linear loss without labels"
    assert all(p.grad is not None for p in labelled.parameters()), "every parameter must be in the graph (DDP)"
    sc = method.cfg.stego
    assert "loss_knn" not in logs and "loss_linear" not in logs, f"skipped terms must not be logged: {sorted(logs)}"
    expected = sc.pos_intra_weight * logs["loss_self"] + sc.neg_inter_weight * logs["loss_rand"]
    assert abs(logs["loss_stego"] - expected) < 1e-6, "without partners the loss is self + rand only"


def test_predict_and_errors():
    method = _method(has_labels=False).eval()
    out = method.predict(torch.randn(2, C, H, H))
    assert set(out) == {"code", "cluster"}, f"no linear output without labels, got {set(out)}"
    assert out["code"].shape == (2, 5, H, H) and out["cluster"].shape == (2, 3, H, H)
    labelled = _method().eval()
    feats = torch.randn(2, C, H, H)
    out = labelled.predict(feats)
    assert set(out) == {"code", "cluster", "linear"} and out["linear"].shape == (2, 3, H, H)
    torch.testing.assert_close(out["cluster"], labelled.cluster_probe.inner(labelled.head(feats)),
                               msg="cluster scores must be the probe's inner products of the head's code")
    big = labelled.classify(F.interpolate(labelled.encode(feats), size=(20, 20), mode="bilinear"))
    assert big["cluster"].shape == (2, 3, 20, 20) and big["linear"].shape == (2, 3, 20, 20), "classify any size"
    one, three = torch.randn(1, C, H, H), torch.randn(3, C, H, H)
    with pytest.raises(ValueError, match="batch_size"):
        method.training_loss(Batch(feats=one, partner_feats=one), _ctx(1))
    with pytest.raises(ValueError, match="local_batch"):
        method.training_loss(Batch(feats=three, partner_feats=three), _ctx(2))
    with pytest.raises(ValueError, match="partner_feats"):
        method.training_loss(Batch(feats=three, partner_feats=three[:, :, :2]), _ctx(3))


# ------------------------------------------------------------------------------------------- 2 ranks
GLOBAL = 4
DIST_CONFIGS = [{"pointwise": True}, {"pointwise": False, "stabilize": True}]


def _run_step(cfg_kwargs, rank, world):
    method = _method(_cfg(**cfg_kwargs))
    feats, partner, label = _data(GLOBAL, seed=3)
    local = GLOBAL // world
    rows = slice(rank * local, (rank + 1) * local)
    batch = Batch(feats=feats[rows], partner_feats=partner[rows], label=label[rows])
    loss, logs = method.training_loss(batch, _ctx(local, step=11, rank=rank, world=world))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in method.named_parameters()}
    return loss.detach(), logs, grads


def _two_rank_worker(rank, world):
    out = []
    for cfg_kwargs in DIST_CONFIGS:
        loss, logs, grads = _run_step(cfg_kwargs, rank, world)
        for g in grads.values():  # what DDP does: average gradients over ranks
            D.all_reduce_sum(g)
            g /= world
        out.append((loss, logs, grads))
    return out


def test_two_ranks_match_one_rank():
    results = run_distributed(_two_rank_worker, 2)
    for k, cfg_kwargs in enumerate(DIST_CONFIGS):
        loss1, logs1, grads1 = _run_step(cfg_kwargs, 0, 1)
        mean_loss = (results[0][k][0] + results[1][k][0]) / 2
        assert abs(mean_loss.item() - loss1.item()) < 1e-5, f"{cfg_kwargs}: mean rank loss {mean_loss} != {loss1}"
        for key in logs1:
            mean_log = (results[0][k][1][key] + results[1][k][1][key]) / 2
            assert abs(mean_log - logs1[key]) < 1e-5, f"{cfg_kwargs}: log {key} {mean_log} != {logs1[key]}"
        for name, g1 in grads1.items():
            for r in range(2):
                torch.testing.assert_close(results[r][k][2][name], g1, atol=1e-5, rtol=1e-4,
                                           msg=f"{cfg_kwargs}: DDP-averaged grad of {name} differs on rank {r}")
