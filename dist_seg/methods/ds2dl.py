"""DS²DL: dual-structure self-distilled learning (SPEC §4 as revised, paper 004).

One step on this rank's images ``f`` ``[b, C, h, w]``:

* ``x = head(f)`` ``[b, D, h, w]``; ``inner_l = <norm(x).detach(), norm(P_l)>``,
  ``inner_g = <norm(x), norm(P_g)>`` (global prototypes are an EMA buffer); label feature
  ``L = softmax(inner_g/τ)`` *with gradient* into ``x``.
* Affinity (Eq. 1–3): S×S points per image (coordinates drawn for the global batch); the backbone features
  and ``L`` are sampled at the same points. Pair similarity ``S_ij = <norm(f_i), norm(f_j)>`` (no gradient),
  spatially centred with the mean ``m`` taken over the global batch; ``t = S + b``; soft labels
  ``y = L_i·L_j`` with gradient. Pairs within each image and with the image's derangement partner in the
  *global* batch (the partner's sampled features gathered without gradient, its sampled ``L`` with
  gradient, so the partner's head is trained on the rank that owns it).
  ``affinity_target=code`` keeps the first reading (similarity of the sampled code, labels detached).
* Cluster structure: Sinkhorn codes from ``inner_g`` per image (Eq. 5), local-to-global prediction on the
  detached code (Eq. 4), orthogonality of ``P_l`` (Eq. 6), self-labelling of ``inner_l`` by
  ``argmax inner_g`` (Eq. 7).

Every term is a mean over this rank's images (or, for the orthogonality term, identical on every rank),
so DDP's gradient averaging gives the gradient of the loss of the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_seg import distributed as D
from dist_seg.config import RunConfig
from dist_seg.heads.ds2dl import DS2DLHead, Prototypes
from dist_seg.heads.probes import ClusterProbe, LinearProbe
from dist_seg.losses.ds2dl import (
    affinity_loss,
    l2g_loss,
    orthogonality_loss,
    self_label_loss,
    sinkhorn,
)
from dist_seg.methods.base import Batch, Method, StepContext, grid_sample, sample_coords, to_device

__all__ = ["DS2DLMethod"]

_OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}


def _cosine_logits(x_normed: torch.Tensor, prototypes_normed: torch.Tensor) -> torch.Tensor:
    """``<norm(x), norm(P)>``: ``[b, D, h, w]`` × ``[K, D]`` → ``[b, K, h, w]``."""
    return torch.einsum("bdhw,kd->bkhw", x_normed, prototypes_normed)


class DS2DLMethod(Method):
    """DS²DL head, local/global prototypes, learnable affinity bias and optional STEGO probes.

    Modules: ``head`` (:class:`DS2DLHead`), ``prototypes`` (:class:`Prototypes`), ``bias`` (the scalar
    ``b`` of the affinity loss, init ``ds2dl.bias_init``), and when ``cfg.ds2dl.train_probes`` a
    ``cluster_probe`` and, with labels, a ``linear_probe``, both trained on ``x.detach()`` so no label
    reaches the head.
    """

    name = "ds2dl"
    # Every parameter is in every step's graph (head, P_l through L2G/self-labelling/orthogonality, b through the
    # intra-image affinity term, the probes), also when a loss weight is 0 (a zero product keeps the graph).
    find_unused_parameters = False
    # Pairs come from the batch itself (intra-image and a derangement of the global batch), never from the
    # KNN table: the trainer then neither builds a table nor fetches (or, online, encodes) partner images.
    needs_partners = False

    def __init__(self, cfg: RunConfig, *, feat_dim: int, num_classes: int, has_labels: bool) -> None:
        super().__init__(cfg, feat_dim=feat_dim, num_classes=num_classes, has_labels=has_labels)
        c = cfg.ds2dl
        if c.affinity_target not in ("backbone", "code"):
            raise ValueError(f"ds2dl.affinity_target must be 'backbone' or 'code', got {c.affinity_target!r}")
        if c.sinkhorn_eps <= 0 or c.tau <= 0:
            raise ValueError(f"ds2dl.sinkhorn_eps and ds2dl.tau must be positive, got {c.sinkhorn_eps} and {c.tau}")
        self.head = DS2DLHead(feat_dim, c.dim, dropout=c.dropout)
        self.prototypes = Prototypes(num_classes, c.dim, momentum=c.ema_momentum)
        # Shape [1], not a 0-dim scalar: DeepSpeed 0.19 broadcasts parameters as byte views, which a 0-dim
        # tensor cannot give (ZeRO set-up failed on 2 ranks). Old 0-dim checkpoints load (see below).
        self.bias = nn.Parameter(torch.full((1,), float(c.bias_init)))
        self.cluster_probe: ClusterProbe | None = ClusterProbe(c.dim, num_classes) if c.train_probes else None
        self.linear_probe: LinearProbe | None = (
            LinearProbe(c.dim, num_classes) if c.train_probes and has_labels else None
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "bias"
        if key in state_dict and state_dict[key].dim() == 0:  # checkpoints written before b had shape [1]
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------------ optimiser
    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam or RAdam (``cfg.ds2dl.optimizer``) with groups ``head`` (lr), ``prototypes`` (prototype_lr),
        ``bias`` (bias_lr) and, when probes are trained, ``probes`` (probe_lr).

        The affinity bias ``b`` has its own group (SPEC §4): it decides which backbone similarities attract,
        and at the prototypes' rate it runs away downward and the partition dissolves.
        """
        c = self.cfg.ds2dl
        groups = [
            {"name": "head", "params": list(self.head.parameters()), "lr": c.lr},
            {"name": "prototypes", "params": [self.prototypes.local], "lr": c.prototype_lr},
            {"name": "bias", "params": [self.bias], "lr": c.bias_lr},
        ]
        probe_params = [p for m in (self.cluster_probe, self.linear_probe) if m is not None for p in m.parameters()]
        if probe_params:
            groups.append({"name": "probes", "params": probe_params, "lr": c.probe_lr})
        return _OPTIMIZERS[c.optimizer](groups, lr=c.lr)

    # ------------------------------------------------------------------------------------ training
    def training_loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Total DS²DL loss of this rank's images and scalar logs (SPEC §4).

        Logs: ``loss`` and each term's unweighted value (``loss_affinity``, ``loss_affinity_intra``,
        ``loss_affinity_cross``, ``loss_l2g``, ``loss_orth``, ``loss_self_label``, and the probe losses
        ``loss_cluster`` / ``loss_linear``), the affinity ``bias``, and prototype usage over the global
        batch under ``argmax inner_g``: ``prototypes_used`` (how many own at least one pixel) and
        ``prototype_entropy`` (entropy of the assignment histogram in nats; ``log K`` when balanced, 0 at
        collapse); all as detached fp32 0-dim tensors.
        """
        if batch.feats.dim() != 4 or batch.feats.shape[0] != ctx.local_batch:
            raise ValueError(
                f"batch.feats must be [b, C, h, w] with b = local_batch = {ctx.local_batch}, "
                f"got {tuple(batch.feats.shape)}"
            )
        x = self.head(batch.feats)
        # The head may run under autocast; cosine logits divided by τ = 0.1, the Sinkhorn codes and the
        # K²-term sums are cheap, so they run in fp32 to keep bf16 rounding out of the targets.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._losses(x.float(), batch, ctx)

    def _losses(self, x: torch.Tensor, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.ds2dl
        xn = F.normalize(x, dim=1, eps=1e-10)
        # .float(): parameters may be held in bf16 (DeepSpeed); the losses still run in fp32
        pl = self.prototypes.normalized_local().float()
        pg = self.prototypes.normalized_global().float()
        inner_g = _cosine_logits(xn, pg)
        inner_g_const = inner_g.detach()
        inner_l = _cosine_logits(xn.detach(), pl)  # self-labelling (and by default L2G) train the prototypes only
        # SPEC §4: the label features carry gradient into x (through inner_g) in the revised reading; the
        # first reading ("code") used them as constant pair labels.
        label_feat = torch.softmax((inner_g if c.affinity_target == "backbone" else inner_g_const) / c.tau, dim=1)

        loss_intra, loss_cross = self._affinity(batch.feats, x, label_feat, ctx)
        loss_affinity = c.intra_weight * loss_intra + c.cross_weight * loss_cross

        codes = sinkhorn(inner_g_const, c.sinkhorn_eps, c.sinkhorn_iters)
        loss_l2g = l2g_loss(codes, _cosine_logits(xn, pl) if c.l2g_grad_to_code else inner_l, c.tau)
        loss_orth = orthogonality_loss(self.prototypes.local.float())
        loss_self = self_label_loss(inner_l, inner_g_const, c.tau)

        total = (
            c.affinity_weight * loss_affinity
            + c.l2g_weight * loss_l2g
            + c.orth_weight * loss_orth
            + c.self_label_weight * loss_self
        )
        terms = {
            "loss_affinity": loss_affinity,
            "loss_affinity_intra": loss_intra,
            "loss_affinity_cross": loss_cross,
            "loss_l2g": loss_l2g,
            "loss_orth": loss_orth,
            "loss_self_label": loss_self,
        }
        code = x.detach()
        if self.cluster_probe is not None:
            terms["loss_cluster"] = self.cluster_probe.loss(code.to(self.cluster_probe.clusters.dtype))
            total = total + terms["loss_cluster"]
        if self.linear_probe is not None and batch.label is not None:
            terms["loss_linear"] = self.linear_probe.loss(code.to(self.linear_probe.conv.weight.dtype), batch.label)
            total = total + terms["loss_linear"]
        elif self.linear_probe is not None:  # keeps the probe in the graph (find_unused_parameters=False)
            total = total + sum(p.sum() for p in self.linear_probe.parameters()) * 0.0
        terms["loss"] = total
        terms["bias"] = self.bias

        terms["prototypes_used"], terms["prototype_entropy"] = self._prototype_usage(inner_g_const)
        # Logs stay on the device: the trainer reads them at logging steps only.
        return total, {k: t.detach().float().reshape(()) for k, t in terms.items()}

    def _affinity(
        self, feats: torch.Tensor, x: torch.Tensor, label_feat: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Intra-image and cross-image affinity losses (each a mean over its pairs).

        ``feats`` are the backbone features, ``x`` the code and ``label_feat`` ``L`` (with or without
        gradient, as the caller decided), all of this rank's images.
        """
        c = self.cfg.ds2dl
        coords = sample_coords(ctx, c.feature_samples, "coords", x.device)
        ls = grid_sample(label_feat, coords).flatten(2)  # [b, K, S²], columns are still distributions
        if c.affinity_target == "backbone":
            with torch.no_grad():
                sim_src = F.normalize(grid_sample(feats.float(), coords), dim=1, eps=1e-10).flatten(2)  # [b, C, S²]
        else:
            sim_src = F.normalize(grid_sample(x, coords), dim=1, eps=1e-10).flatten(2)  # [b, D, S²], with grad
        use_cross = c.cross_weight != 0
        if use_cross and ctx.global_batch < 2:
            raise ValueError(
                "DS²DL cross-image pairs need a global batch of at least 2 images; raise data.batch_size "
                "or set ds2dl.cross_weight=0"
            )
        if use_cross:
            perm = D.derangement(ctx.global_batch, ctx.generator("cross"))
            partner = to_device(ctx.local(perm), x.device)
            # The partner's label features are trained through this rank's loss too, so they are gathered
            # with gradient; the backbone side is a constant (the code side, in the first reading, is not).
            gather_sim = D.all_gather if c.affinity_target == "backbone" else D.all_gather_with_grad
            gather_lab = D.all_gather_with_grad if c.affinity_target == "backbone" else D.all_gather
            sim_partner = gather_sim(sim_src)[partner]
            ls_partner = gather_lab(ls)[partner]

        sim_intra = torch.einsum("bci,bcj->bij", sim_src, sim_src)
        sim_cross = torch.einsum("bci,bcj->bij", sim_src, sim_partner) if use_cross else None
        if c.affinity_target == "backbone" and c.spatial_center:
            sim_intra, sim_cross = self._spatial_center(sim_src, sim_partner if use_cross else None,
                                                        sim_intra, sim_cross, ctx)
        loss_intra = affinity_loss(sim_intra, torch.einsum("bki,bkj->bij", ls, ls), self.bias, c.r)
        if not use_cross:
            return loss_intra, torch.zeros((), device=x.device, dtype=loss_intra.dtype)
        loss_cross = affinity_loss(sim_cross, torch.einsum("bki,bkj->bij", ls, ls_partner), self.bias, c.r)
        return loss_intra, loss_cross

    @staticmethod
    @torch.no_grad()
    def _spatial_center(
        fa: torch.Tensor, fb: torch.Tensor | None, sim_intra: torch.Tensor, sim_cross: torch.Tensor | None,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """STEGO's ``pointwise`` centring of each pair tensor ``[b, S², S²]`` (SPEC §4).

        ``m = S.mean()`` is the mean over the *global* batch, so the loss does not depend on how the batch
        is split over ranks (as for STEGO, docs/decisions.md). The mean of all dot products of two point
        sets is the dot product of their means, so each image's share costs ``O(C·S²)``; the intra and cross
        sums travel in one all-reduce. Rows are then centred over the partner's points (``mean_j``), the
        remaining (rounding-level) mean is removed and ``m`` restored.
        """
        sums = [(fa.mean(-1) * fa.mean(-1)).sum(1).sum().reshape(1)]
        if fb is not None:
            sums.append((fa.mean(-1) * fb.mean(-1)).sum(1).sum().reshape(1))
        means = D.all_reduce_sum(torch.cat(sums)) / ctx.global_batch

        def center(sim: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            sim = sim - sim.mean(dim=2, keepdim=True)
            return sim - sim.mean() + m

        return center(sim_intra, means[0]), (center(sim_cross, means[1]) if sim_cross is not None else None)

    @torch.no_grad()
    def _prototype_usage(self, inner_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototypes owning ≥ 1 pixel of the global batch, and the entropy of the assignment histogram.

        Returned as 0-dim tensors so the caller copies them to the host together with the other logs.
        """
        k = self.prototypes.num_prototypes
        counts = torch.bincount(inner_g.argmax(dim=1).flatten(), minlength=k).float()
        counts = D.all_reduce_sum(counts)
        p = counts / counts.sum().clamp_min(1.0)
        return (counts > 0).sum().float(), -torch.special.xlogy(p, p).sum()

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA of the global prototypes after each optimiser step."""
        self.prototypes.ema_update()

    # ---------------------------------------------------------------------------------- prediction
    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """The head's code ``x`` ``[b, D, h, w]`` of features ``[b, C, h, w]``."""
        return self.head(feats)

    def classify(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions for a (possibly upsampled or flip-averaged) code ``[b, D, H, W]``.

        Returns ``{"cluster": inner_g}`` (cosine inner products with the global prototypes, fp32) plus
        ``"linear"`` (linear-probe logits) and ``"cluster_probe"`` (STEGO cluster-probe inner products)
        when those probes exist. ``argmax_k inner_g`` is the DS²DL prediction and
        ``log_softmax(2·inner_g)`` its CRF unary.
        """
        with torch.autocast(device_type=code.device.type, enabled=False):
            xn = F.normalize(code.float(), dim=1, eps=1e-10)
            out = {"cluster": _cosine_logits(xn, self.prototypes.normalized_global().float())}
        if self.linear_probe is not None:
            out["linear"] = self.linear_probe(code)
        if self.cluster_probe is not None:
            out["cluster_probe"] = self.cluster_probe.inner(code)
        return out

    def extra_logs(self) -> dict[str, float]:
        return {"ds2dl_bias": float(self.bias.detach().item())}
