"""DS2DLMethod: wiring against a plain transcription of SPEC §4, optimiser groups, EMA prototypes,
2-rank vs 1-rank equality (real gloo processes) and learning on a tiny clustered feature set."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from dist_seg import distributed as D
from dist_seg.config import DS2DLConfig, RunConfig
from dist_seg.heads.ds2dl import DS2DLHead, Prototypes
from dist_seg.methods import build_method
from dist_seg.methods.base import Batch, StepContext
from dist_seg.methods.ds2dl import DS2DLMethod
from tests.dist_utils import run_distributed

C, K, H, W = 12, 4, 6, 5


def make_cfg(**ds2dl) -> RunConfig:
    params = {"dim": 8, "feature_samples": 3, "dropout": 0.0}
    params.update(ds2dl)
    return RunConfig(method="ds2dl", num_classes=K, ds2dl=DS2DLConfig(**params))


def make_method(seed: int = 0, *, has_labels: bool = True, **ds2dl) -> DS2DLMethod:
    torch.manual_seed(seed)
    return DS2DLMethod(make_cfg(**ds2dl), feat_dim=C, num_classes=K, has_labels=has_labels)


def global_batch(n: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, C, H, W, generator=g)
    labels = torch.randint(0, K, (n, 2 * H, 2 * W), generator=g)
    return feats, labels


def ctx_for(rank: int, world: int, global_n: int, step: int = 3) -> StepContext:
    return StepContext(step=step, seed=11, rank=rank, world_size=world, local_batch=global_n // world)


# ------------------------------------------------------------------------------- transcription
def softplus(t):
    return torch.log(1 + torch.exp(t))


def reference_loss(m: DS2DLMethod, feats: torch.Tensor, ctx: StepContext, *,
                   detach_partner_label: bool = False) -> torch.Tensor:
    """SPEC §4 (revised; ``affinity_target=code``: the first reading) written out with plain ops on one
    process (no probes). ``detach_partner_label`` cuts the gradient through the cross-image partner's label
    features, as a gather without gradient would."""
    c = m.cfg.ds2dl
    tau, s = c.tau, c.feature_samples
    x = m.head(feats)
    b = x.shape[0]
    xn = x / x.norm(dim=1, keepdim=True)
    pl = m.prototypes.local / m.prototypes.local.norm(dim=1, keepdim=True)
    pg = m.prototypes.global_ / m.prototypes.global_.norm(dim=1, keepdim=True)
    inner_l = torch.einsum("bdhw,kd->bkhw", xn.detach(), pl)
    inner_g = torch.einsum("bdhw,kd->bkhw", xn, pg.detach())
    lab = torch.softmax(inner_g / tau, dim=1)
    # affinity: same coordinates / derangement as the method draws for this step
    coords = (torch.rand((b, s, s, 2), generator=ctx.generator("coords")) * 2 - 1)
    perm = D.derangement(b, ctx.generator("cross"))

    def sample(t):
        return F.grid_sample(t, coords, mode="bilinear", padding_mode="border", align_corners=True).flatten(2)

    backbone = c.affinity_target == "backbone"
    ls = sample(lab) if backbone else sample(lab).detach()
    if backbone:
        fs = sample(feats)
        fs = (fs / fs.norm(dim=1, keepdim=True)).detach()
    else:
        fs = sample(x)
        fs = fs / fs.norm(dim=1, keepdim=True)

    def similarity(fa, fb):
        sim = torch.einsum("bci,bcj->bij", fa, fb)
        if backbone and c.spatial_center:
            mean = sim.mean()
            sim = sim - sim.mean(dim=2, keepdim=True)
            sim = sim - sim.mean() + mean
        return sim

    def pair_loss(sim, la, lb):
        t = sim + m.bias
        y = torch.einsum("bki,bkj->bij", la, lb)
        return (y * softplus(-t / c.r) + (1 - y) * softplus(c.r * t)).mean()

    partner_ls = ls[perm].detach() if detach_partner_label else ls[perm]
    l_p = (c.intra_weight * pair_loss(similarity(fs, fs), ls, ls)
           + c.cross_weight * pair_loss(similarity(fs, fs[perm]), ls, partner_ls))
    # Sinkhorn per image over all pixels
    codes = []
    for i in range(b):
        q = torch.exp(inner_g[i].detach().reshape(K, -1).double() / c.sinkhorn_eps)
        n = q.shape[1]
        for _ in range(c.sinkhorn_iters):
            q = q / q.sum(1, keepdim=True) * n / K
            q = q / q.sum(0, keepdim=True)
        codes.append(q.float().reshape(K, *x.shape[2:]))
    codes = torch.stack(codes)
    l2g_code = xn if c.l2g_grad_to_code else xn.detach()
    q_l = torch.log_softmax(torch.einsum("bdhw,kd->bkhw", l2g_code, pl) / tau, dim=1)
    l_l2g = -(codes * q_l).sum(1).mean()
    l_orth = (pl @ pl.T - torch.eye(K)).abs().sum()
    pseudo = inner_g.detach().argmax(1)
    l_data = -torch.log_softmax(inner_l / tau, dim=1).gather(1, pseudo[:, None]).mean()
    return c.affinity_weight * l_p + c.l2g_weight * l_l2g + c.orth_weight * l_orth + c.self_label_weight * l_data


def _grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _train_a_little(m: DS2DLMethod, steps: int, n: int = 4) -> None:
    opt = m.build_optimizer()
    for step in range(steps):
        feats, labels = global_batch(n, seed=100 + step)
        loss, _ = m.training_loss(Batch(feats=feats, label=labels), ctx_for(0, 1, n, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step()


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", [
    {},
    {"spatial_center": False, "r": 1.0},
    {"affinity_target": "code"},
    {"l2g_grad_to_code": True},
], ids=["revised", "no-centring-bce", "first-reading", "l2g-grad"])
def test_loss_and_gradients_match_spec_transcription(variant):
    # Weights away from 1 so a swapped or missing weight shows; train a few steps so P_g != P_l and b moved.
    params = dict(r=2.1, intra_weight=0.7, cross_weight=1.3, affinity_weight=0.9, l2g_weight=1.1,
                  orth_weight=0.05, self_label_weight=0.8, ema_momentum=0.5, train_probes=False,
                  bias_lr=1e-2)
    m = make_method(**{**params, **variant})
    _train_a_little(m, 3)
    assert not torch.allclose(m.prototypes.local, m.prototypes.global_), "setup: prototypes should differ"
    assert m.bias.item() != m.cfg.ds2dl.bias_init, "setup: the affinity bias should have moved"
    feats, _ = global_batch(4)
    ctx = ctx_for(0, 1, 4, step=9)
    m.zero_grad()
    loss, logs = m.training_loss(Batch(feats=feats), ctx)
    loss.backward()
    got = _grads(m)
    m.zero_grad()
    want_loss = reference_loss(m, feats, ctx)
    want_loss.backward()
    want = _grads(m)
    assert torch.allclose(loss, want_loss, atol=1e-5), f"loss {loss.item()} vs transcription {want_loss.item()}"
    assert abs(logs["loss"] - loss.item()) < 1e-6, "logged total must be the returned loss"
    assert set(got) == set(want), f"parameters with gradients differ: {sorted(got)} vs {sorted(want)}"
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5), f"gradient of {name} differs from transcription"


def test_spatial_centring_and_backbone_target():
    """The revised affinity term reads the backbone: changing the features (not the code) changes the loss;
    with the code target it does not. Centring changes the similarity the bias is compared with."""
    feats, _ = global_batch(4)
    ctx = ctx_for(0, 1, 4)
    zero = {"l2g_weight": 0.0, "orth_weight": 0.0, "self_label_weight": 0.0, "train_probes": False}
    code = make_method().head(feats).detach()
    other = feats * torch.linspace(0.1, 3.0, C).view(1, C, 1, 1) + 0.5  # other cosine similarities
    for target, sees_backbone in (("backbone", True), ("code", False)):
        m = make_method(affinity_target=target, **zero)
        m.head = _FixedCode(code)  # the same code whatever the features: only the backbone side varies
        a = m.training_loss(Batch(feats=feats), ctx)[0]
        b = m.training_loss(Batch(feats=other), ctx)[0]
        changed = not torch.allclose(a, b, atol=1e-6)
        assert changed == sees_backbone, f"affinity_target={target}: backbone features seen = {changed}"
    centred = make_method(**zero).training_loss(Batch(feats=feats), ctx)[1]["loss_affinity"]
    plain = make_method(spatial_center=False, **zero).training_loss(Batch(feats=feats), ctx)[1]["loss_affinity"]
    assert abs(centred - plain) > 1e-4, "ds2dl.spatial_center must change the affinity similarity"


class _FixedCode(torch.nn.Module):
    """A head that returns the same code whatever the features (to vary the backbone side alone)."""

    def __init__(self, code: torch.Tensor) -> None:
        super().__init__()
        self.code = code
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.code * self.w


def test_gradient_routing_of_each_term():
    feats, _ = global_batch(4)
    ctx = ctx_for(0, 1, 4)
    zero = {"affinity_weight": 0.0, "l2g_weight": 0.0, "orth_weight": 0.0, "self_label_weight": 0.0,
            "train_probes": False}

    def grads_for(term, **extra):
        m = make_method(**{**zero, term: 1.0, **extra})
        m.training_loss(Batch(feats=feats), ctx)[0].backward()
        head = sum(float(p.grad.abs().sum()) for p in m.head.parameters() if p.grad is not None)
        local = m.prototypes.local.grad
        bias = m.bias.grad
        return head, (0.0 if local is None else float(local.abs().sum())), (0.0 if bias is None else float(bias.abs()))

    head, local, bias = grads_for("self_label_weight")
    assert head == 0.0 and local > 0, "self-labelling must train P_l only (x is detached)"
    head, local, bias = grads_for("l2g_weight")
    assert head == 0.0 and local > 0, "by default L2G sees the code detached and trains P_l only"
    head, local, bias = grads_for("l2g_weight", l2g_grad_to_code=True)
    assert head > 0 and local > 0, "ds2dl.l2g_grad_to_code=true: L2G trains both the head and P_l"
    for target in ("backbone", "code"):
        head, local, bias = grads_for("affinity_weight", affinity_target=target)
        assert head > 0 and local == 0.0 and bias > 0, f"{target}: the affinity loss trains the head and b, not P_l"
    head, local, bias = grads_for("orth_weight")
    assert head == 0.0 and local > 0, "orthogonality acts on P_l only"


def test_optimizer_groups():
    m = make_method(has_labels=True)
    opt = m.build_optimizer()
    c = m.cfg.ds2dl
    assert isinstance(opt, torch.optim.RAdam), "default ds2dl.optimizer is radam"
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"head", "prototypes", "bias", "probes"}, f"groups {sorted(groups)}"
    assert groups["head"]["lr"] == c.lr and groups["prototypes"]["lr"] == c.prototype_lr
    assert groups["probes"]["lr"] == c.probe_lr
    assert groups["bias"]["lr"] == c.bias_lr == 5e-4, "b has its own group at SPEC's 5e-4"
    assert [id(p) for p in groups["bias"]["params"]] == [id(m.bias)], "the bias group holds b alone"
    assert m.bias.item() == c.bias_init == -0.5, "b starts at SPEC's -0.5"
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in m.parameters()), "every parameter in exactly one group"
    assert not any(t is m.prototypes.global_ for t in m.parameters()), "global prototypes are not trained"

    plain = make_method(optimizer="adam", train_probes=False)
    opt = plain.build_optimizer()
    assert type(opt) is torch.optim.Adam, "ds2dl.optimizer=adam must give Adam"
    assert [g["name"] for g in opt.param_groups] == ["head", "prototypes", "bias"], "no probes group without probes"
    out = plain.predict(global_batch(2)[0])
    assert set(out) == {"code", "cluster"}, f"no probe outputs without probes, got {sorted(out)}"


def test_heads_and_prototypes():
    head = DS2DLHead(C, 16, dropout=0.1)
    assert isinstance(head.nonlinear[1], torch.nn.SiLU), "DS²DL head uses SiLU"
    assert head(torch.randn(2, C, 3, 3)).shape == (2, 16, 3, 3)
    protos = Prototypes(5, 16, momentum=0.9)
    assert torch.equal(protos.local.detach(), protos.global_), "local and global start identical"
    assert torch.allclose(protos.local.norm(dim=1), torch.ones(5)), "initial prototypes are L2-normalised"
    assert "global_" in protos.state_dict() and [n for n, _ in protos.named_parameters()] == ["local"]


def test_ema_matches_closed_form():
    alpha = 0.9
    m = make_method(ema_momentum=alpha, train_probes=False)
    start = m.prototypes.global_.clone()
    opt = m.build_optimizer()
    locals_ = []
    n_steps = 6
    for step in range(n_steps):
        feats, _ = global_batch(4, seed=step)
        loss, _ = m.training_loss(Batch(feats=feats), ctx_for(0, 1, 4, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step()
        locals_.append(m.prototypes.local.detach().clone())
    # g_n = α^n g_0 + Σ_{t=1..n} (1-α) α^{n-t} l_t
    want = alpha**n_steps * start + sum((1 - alpha) * alpha ** (n_steps - t) * p for t, p in enumerate(locals_, 1))
    assert not torch.allclose(locals_[-1], start), "setup: local prototypes must have moved"
    assert torch.allclose(m.prototypes.global_, want, atol=1e-6), "global prototypes are not the EMA of the local ones"


def test_logs_and_prediction():
    m = make_method(has_labels=True)
    feats, labels = global_batch(4)
    _, logs = m.training_loss(Batch(feats=feats, label=labels), ctx_for(0, 1, 4))
    expected = {"loss", "loss_affinity", "loss_affinity_intra", "loss_affinity_cross", "loss_l2g", "loss_orth",
                "loss_self_label", "loss_cluster", "loss_linear", "bias", "prototypes_used", "prototype_entropy"}
    assert expected <= set(logs), f"missing logs: {sorted(expected - set(logs))}"
    # Logs stay on the device as detached 0-dim tensors (the trainer reads them at logging steps only).
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad and math.isfinite(v)
               for v in logs.values()), f"logs must be finite detached scalars: {logs}"
    out = m.predict(feats)
    assert out["code"].shape == (4, 8, H, W) and out["cluster"].shape == (4, K, H, W)
    assert out["linear"].shape == (4, K, H, W) and out["cluster_probe"].shape == (4, K, H, W)
    up = m.classify(F.interpolate(out["code"], scale_factor=2, mode="bilinear"))
    assert up["cluster"].shape == (4, K, 2 * H, 2 * W), "classify must work on an upsampled code"
    hist = torch.bincount(out["cluster"].argmax(1).flatten(), minlength=K).float()
    p = hist / hist.sum()
    assert logs["prototypes_used"] == float((hist > 0).sum()), "prototypes_used must count clusters owning pixels"
    assert abs(logs["prototype_entropy"] - float(-(p[p > 0] * p[p > 0].log()).sum())) < 1e-5
    assert m.extra_logs() == {"ds2dl_bias": -0.5}, "the bias starts at ds2dl.bias_init and is reported"
    # a labelled batch without the linear probe's labels still trains (probe loss skipped)
    _, logs = m.training_loss(Batch(feats=feats), ctx_for(0, 1, 4))
    assert "loss_linear" not in logs


def test_clear_errors():
    m = make_method()
    with pytest.raises(ValueError, match="data.batch_size"):
        m.training_loss(Batch(feats=global_batch(1)[0]), ctx_for(0, 1, 1))
    with pytest.raises(ValueError, match="local_batch"):
        m.training_loss(Batch(feats=global_batch(3)[0]), ctx_for(0, 1, 4))
    # without cross pairs a single image is fine
    single = make_method(cross_weight=0.0)
    loss, logs = single.training_loss(Batch(feats=global_batch(1)[0]), ctx_for(0, 1, 1))
    assert math.isfinite(loss.item()) and logs["loss_affinity_cross"] == 0.0


def test_registered_under_its_name():
    m = build_method(make_cfg(), feat_dim=C, num_classes=K, has_labels=False)
    assert isinstance(m, DS2DLMethod) and m.name == "ds2dl"


# ------------------------------------------------------------------------------- two ranks
GLOBAL_N = 4


def _rank_worker(rank: int, world: int) -> dict:
    m = make_method(seed=0, has_labels=True)
    feats, labels = global_batch(GLOBAL_N)
    ctx = ctx_for(rank, world, GLOBAL_N)
    loss, logs = m.training_loss(Batch(feats=ctx.local(feats), label=ctx.local(labels)), ctx)
    loss.backward()
    return {"loss": loss.item(), "grads": _grads(m), "logs": logs}


def test_two_ranks_equal_one_rank():
    """Same global batch on 1 and 2 gloo ranks: same loss, same gradient of every parameter, including the
    cross-image term whose partner label features live on the other rank."""
    perm = D.derangement(GLOBAL_N, ctx_for(0, 1, GLOBAL_N).generator("cross"))
    rank_of = torch.arange(GLOBAL_N) // (GLOBAL_N // 2)
    assert bool((rank_of[perm] != rank_of).any()), "setup: some cross-image partner must be on the other rank"
    ranks = run_distributed(_rank_worker, 2)
    single = _rank_worker(0, 1)
    mean_loss = sum(r["loss"] for r in ranks) / 2
    assert abs(mean_loss - single["loss"]) < 1e-5, f"mean rank loss {mean_loss} vs 1-rank {single['loss']}"
    assert set(ranks[0]["grads"]) == set(single["grads"]) == set(ranks[1]["grads"])
    for name, want in single["grads"].items():
        got = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2
        assert torch.allclose(got, want, atol=1e-5), (
            f"rank-averaged gradient of {name} differs from 1 rank by {(got - want).abs().max().item():.2e}"
        )
    for key in ("prototypes_used", "prototype_entropy"):
        assert abs(ranks[0]["logs"][key] - single["logs"][key]) < 1e-5, f"{key} must be computed over the global batch"

    # The comparison above is sensitive to the partner's label gradient: without it (what a gather without
    # gradient gives) the head's gradient moves far beyond the tolerance.
    m = make_method(seed=0, has_labels=True)
    feats, _ = global_batch(GLOBAL_N)
    ctx = ctx_for(0, 1, GLOBAL_N)
    grads = []
    for detach in (False, True):
        m.zero_grad()
        reference_loss(m, feats, ctx, detach_partner_label=detach).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.head.parameters()]))
    head_single = torch.cat([single["grads"][f"head.{n}"].flatten() for n, _ in m.head.named_parameters()])
    assert torch.allclose(grads[0], head_single, atol=1e-5), "setup: the transcription must match the method"
    gap = (grads[0] - grads[1]).abs().max().item()
    assert gap > 1e-3, f"the partner label gradient changes the head gradient by only {gap:.1e}"


# ------------------------------------------------------------------------------- learning
def clustered_features(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of 8×8 patches in 2×2 blocks; each block draws one of K centres, plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, C, generator=g) * 2
    blocks = torch.randint(0, K, (n, 2, 2), generator=g)
    labels = blocks.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # [n, 8, 8]
    feats = centres[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(n, C, 8, 8, generator=g)
    return feats, labels


def test_loss_decreases_and_prototypes_stay_in_use():
    m = make_method(seed=1, dim=16, feature_samples=5, lr=1e-2, prototype_lr=1e-2, ema_momentum=0.9,
                    optimizer="adam", train_probes=False)
    feats, labels = clustered_features(32)
    opt = m.build_optimizer()
    history = []
    for step in range(50):
        idx = torch.arange(8) + 8 * (step % 4)
        loss, logs = m.training_loss(Batch(feats=feats[idx]), ctx_for(0, 1, 8, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step()
        history.append(logs)

    def mean(key, part):
        return sum(h[key] for h in part) / len(part)

    first, last = mean("loss", history[:5]), mean("loss", history[-5:])
    assert last < first - 0.5, f"loss must decrease over 50 steps: first {first:.3f}, last {last:.3f}"
    # the orthogonality term alone could make the total fall; the affinity structure must be learnt too
    aff_first, aff_last = mean("loss_affinity", history[:5]), mean("loss_affinity", history[-5:])
    assert aff_last < 0.95 * aff_first, f"affinity loss must fall by 5%: {aff_first:.3f} -> {aff_last:.3f}"
    with torch.no_grad():
        pred = m.predict(feats)["cluster"].argmax(1)
    used = pred.unique().numel()
    assert used >= K - 1, f"only {used} of {K} prototypes own pixels after training (collapse)"
    confusion = torch.zeros(K, K)
    confusion.index_put_((labels.flatten(), pred.flatten()), torch.ones(labels.numel()), accumulate=True)
    rows, cols = linear_sum_assignment(confusion.numpy(), maximize=True)
    acc = float(confusion[rows, cols].sum() / confusion.sum())
    majority = float(confusion.sum(1).max() / confusion.sum())
    assert acc > majority + 0.3, f"matched accuracy {acc:.2f} barely beats the majority class ({majority:.2f})"


def test_bf16_autocast_keeps_losses_in_fp32():
    m = make_method()
    feats, labels = global_batch(4)
    ref, _ = m.training_loss(Batch(feats=feats, label=labels), ctx_for(0, 1, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_loss(Batch(feats=feats, label=labels), ctx_for(0, 1, 4))
        cluster = m.predict(feats)["cluster"]
    assert loss.dtype == torch.float32 and cluster.dtype == torch.float32, "losses and cluster scores are fp32"
    assert abs(loss.item() - ref.item()) < 0.05, f"bf16 head changes the loss too much: {loss.item()} vs {ref.item()}"
