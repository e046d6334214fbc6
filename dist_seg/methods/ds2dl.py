"""DS²DL: dual-structure self-distilled learning (SPEC §4, paper 004).

One step on this rank's images ``f`` ``[b, C, h, w]``:

* ``x = head(f)`` ``[b, D, h, w]``; ``inner_l = <norm(x).detach(), norm(P_l)>``,
  ``inner_g = <norm(x), norm(P_g)>`` (global prototypes are an EMA buffer); label feature
  ``L = softmax(inner_g/τ)``.
* Affinity (Eq. 1–3): S×S points per image (coordinates drawn for the global batch), pairs within each
  image and with the image's derangement partner in the *global* batch (sampled codes gathered from all
  ranks with gradient, label features without), soft labels ``y = L_i·L_j``.
* Cluster structure: Sinkhorn codes from ``inner_g`` per image (Eq. 5), local-to-global prediction
  (Eq. 4), orthogonality of ``P_l`` (Eq. 6), self-labelling of ``inner_l`` by ``argmax inner_g`` (Eq. 7).

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
from dist_seg.methods.base import Batch, Method, StepContext, grid_sample, sample_coords

__all__ = ["DS2DLMethod"]

_OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}


def _cosine_logits(x_normed: torch.Tensor, prototypes_normed: torch.Tensor) -> torch.Tensor:
    """``<norm(x), norm(P)>``: ``[b, D, h, w]`` × ``[K, D]`` → ``[b, K, h, w]``."""
    return torch.einsum("bdhw,kd->bkhw", x_normed, prototypes_normed)


class DS2DLMethod(Method):
    """DS²DL head, local/global prototypes, learnable affinity bias and optional STEGO probes.

    Modules: ``head`` (:class:`DS2DLHead`), ``prototypes`` (:class:`Prototypes`), ``bias`` (the scalar
    ``b`` of the affinity loss, init 0), and when ``cfg.ds2dl.train_probes`` a ``cluster_probe`` and, with
    labels, a ``linear_probe``, both trained on ``x.detach()`` so no label reaches the head.
    """

    name = "ds2dl"
    # Pairs come from the batch itself (intra-image and a derangement of the global batch), never from the
    # KNN table: the trainer then neither builds a table nor fetches (or, online, encodes) partner images.
    needs_partners = False

    def __init__(self, cfg: RunConfig, *, feat_dim: int, num_classes: int, has_labels: bool) -> None:
        super().__init__(cfg, feat_dim=feat_dim, num_classes=num_classes, has_labels=has_labels)
        c = cfg.ds2dl
        if c.sinkhorn_eps <= 0 or c.tau <= 0:
            raise ValueError(f"ds2dl.sinkhorn_eps and ds2dl.tau must be positive, got {c.sinkhorn_eps} and {c.tau}")
        self.head = DS2DLHead(feat_dim, c.dim, dropout=c.dropout)
        self.prototypes = Prototypes(num_classes, c.dim, momentum=c.ema_momentum)
        self.bias = nn.Parameter(torch.zeros(()))
        self.cluster_probe: ClusterProbe | None = ClusterProbe(c.dim, num_classes) if c.train_probes else None
        self.linear_probe: LinearProbe | None = (
            LinearProbe(c.dim, num_classes) if c.train_probes and has_labels else None
        )

    # ------------------------------------------------------------------------------------ optimiser
    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam or RAdam (``cfg.ds2dl.optimizer``) with groups ``head`` (lr), ``prototypes`` (prototype_lr)
        and, when probes are trained, ``probes`` (probe_lr).

        The affinity bias ``b`` sits in the ``prototypes`` group: like the prototypes it is a parameter
        of the losses rather than of the feature map, and a single scalar that must travel across the
        cosine range [-1, 1] benefits from the larger prototype learning rate.
        """
        c = self.cfg.ds2dl
        groups = [
            {"name": "head", "params": list(self.head.parameters()), "lr": c.lr},
            {"name": "prototypes", "params": [self.prototypes.local, self.bias], "lr": c.prototype_lr},
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
        collapse).
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
        inner_l = _cosine_logits(xn.detach(), pl)  # self-labelling trains the prototypes only
        label_feat = torch.softmax(inner_g_const / c.tau, dim=1)

        loss_intra, loss_cross = self._affinity(x, label_feat, ctx)
        loss_affinity = c.intra_weight * loss_intra + c.cross_weight * loss_cross

        codes = sinkhorn(inner_g_const, c.sinkhorn_eps, c.sinkhorn_iters)
        loss_l2g = l2g_loss(codes, _cosine_logits(xn, pl), c.tau)
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
        terms["loss"] = total
        terms["bias"] = self.bias

        terms["prototypes_used"], terms["prototype_entropy"] = self._prototype_usage(inner_g_const)
        names = list(terms)
        # One device→host copy for all logs.
        values = torch.stack([t.detach().float().reshape(()) for t in terms.values()]).tolist()
        return total, dict(zip(names, values))

    def _affinity(
        self, x: torch.Tensor, label_feat: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Intra-image and cross-image affinity losses (each a mean over its pairs)."""
        c = self.cfg.ds2dl
        coords = sample_coords(ctx, c.feature_samples, "coords", x.device)
        xs = F.normalize(grid_sample(x, coords), dim=1, eps=1e-10).flatten(2)  # [b, D, S²]
        ls = grid_sample(label_feat, coords).flatten(2)  # [b, K, S²], rows are still distributions
        loss_intra = affinity_loss(
            torch.einsum("bdi,bdj->bij", xs, xs), torch.einsum("bki,bkj->bij", ls, ls), self.bias, c.r
        )
        if c.cross_weight == 0:
            return loss_intra, torch.zeros((), device=x.device, dtype=loss_intra.dtype)
        if ctx.global_batch < 2:
            raise ValueError(
                "DS²DL cross-image pairs need a global batch of at least 2 images; raise data.batch_size "
                "or set ds2dl.cross_weight=0"
            )
        all_xs = D.all_gather_with_grad(xs)
        all_ls = D.all_gather(ls)
        perm = D.derangement(ctx.global_batch, ctx.generator("cross"))
        partner = ctx.local(perm).to(x.device)
        loss_cross = affinity_loss(
            torch.einsum("bdi,bdj->bij", xs, all_xs[partner]),
            torch.einsum("bki,bkj->bij", ls, all_ls[partner]),
            self.bias,
            c.r,
        )
        return loss_intra, loss_cross

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
