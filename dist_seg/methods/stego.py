"""STEGO (Hamilton et al. 2022) as a :class:`~dist_seg.methods.base.Method` (SPEC §2–§3).

Per step and rank (``b`` local anchors of a global batch of ``G``):

* codes of the anchors and of their KNN partners come from the head;
* anchors are sampled at ``coords1``; the KNN partner and every negative at ``coords2``;
* the self term pairs each anchor with itself (both at ``coords1``), the KNN term with its partner;
* negatives: the anchors' features and codes sampled at ``coords2`` are gathered from all ranks (codes
  with gradient, so a negative's code is trained on the rank that owns it) and indexed by ``neg_samples``
  derangements of the global batch; all negatives are evaluated in one stacked einsum. The negative of
  anchor i is image π(i) at π(i)'s own ``coords2`` (the reference samples it at i's; with i.i.d.
  coordinates the distribution is the same, and only sampled points need to cross ranks).

With spatial centring, the mean ``m`` of each term's feature correlation is taken over the global batch
(one small all-reduce), so the loss does not depend on how the batch is split over ranks: the mean of the
per-rank losses equals the single-process loss on the whole batch, and DDP's averaged gradients equal its
gradients.

Without a KNN table (``batch.partner_feats is None``) the KNN term is skipped, with a one-time warning, as if
``pos_inter_weight`` were 0.
"""

from __future__ import annotations

import warnings

import torch

from dist_seg import distributed as D
from dist_seg.config import RunConfig
from dist_seg.heads.probes import ClusterProbe, LinearProbe
from dist_seg.heads.stego import StegoHead
from dist_seg.losses.stego import (
    correlation_term,
    mean_feature_correlation,
    norm,
    stacked_correlation_term,
)
from dist_seg.methods.base import Batch, Method, StepContext, grid_sample, sample_coords, to_device

__all__ = ["StegoMethod"]


class StegoMethod(Method):
    """STEGO head trained with the contrastive correlation loss, plus cluster and linear probes.

    Args:
        cfg: the run config; reads ``cfg.stego``.
        feat_dim: backbone channels C.
        num_classes: K, clusters of the cluster probe and classes of the linear probe.
        has_labels: build the linear probe (trained on labelled batches only).
    """

    name = "stego"
    # Every parameter is in every step's graph: head, cluster probe, and the linear probe (a zero term on an
    # unlabelled batch, probe_losses).
    find_unused_parameters = False

    def __init__(self, cfg: RunConfig, *, feat_dim: int, num_classes: int, has_labels: bool) -> None:
        super().__init__(cfg, feat_dim=feat_dim, num_classes=num_classes, has_labels=has_labels)
        sc = cfg.stego
        if sc.neg_samples < 0:
            raise ValueError(f"stego.neg_samples must be >= 0, got {sc.neg_samples}")
        self.head = StegoHead(feat_dim, sc.dim, projection_type=sc.projection_type, dropout=sc.dropout)
        self.cluster_probe = ClusterProbe(sc.dim, num_classes)
        self.linear_probe: LinearProbe | None = LinearProbe(sc.dim, num_classes) if has_labels else None
        self._warned_no_partner = False

    # ------------------------------------------------------------------------------------ optimiser
    def probe_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.cluster_probe.parameters())
        if self.linear_probe is not None:
            params += list(self.linear_probe.parameters())
        return params

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam with groups ``head`` (lr ``stego.lr``) and ``probes`` (lr ``stego.probe_lr``)."""
        sc = self.cfg.stego
        return torch.optim.Adam(
            [
                {"name": "head", "params": list(self.head.parameters()), "lr": sc.lr},
                {"name": "probes", "params": self.probe_parameters(), "lr": sc.probe_lr},
            ]
        )

    # ------------------------------------------------------------------------------------- training
    def correlation_loss(
        self, batch: Batch, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """The weighted correlation loss alone (no probes).

        Returns:
            ``(loss, terms, code)``: the scalar loss, its per-term means and mean code correlations as
            0-dim tensors (``loss_self``, ``cd_self``, ...; absent terms are left out), and the anchors'
            code ``[b, D, h, w]``.
        """
        sc = self.cfg.stego
        feats = batch.feats
        if feats.dim() != 4:
            raise ValueError(f"batch.feats must be [b, C, h, w], got {tuple(feats.shape)}")
        if feats.shape[0] != ctx.local_batch:
            raise ValueError(
                f"batch has {feats.shape[0]} rows but the step context says local_batch={ctx.local_batch}"
            )
        device = feats.device
        num_samples = sc.feature_samples
        use_knn = batch.partner_feats is not None and sc.pos_inter_weight != 0
        if batch.partner_feats is None and sc.pos_inter_weight != 0 and not self._warned_no_partner:
            warnings.warn(
                "STEGO batch has no KNN partner features (no knn table?): the KNN term is skipped "
                "(as if stego.pos_inter_weight=0). Build one with `dist-seg knn` and set data.knn_table.",
                stacklevel=2,
            )
            self._warned_no_partner = True
        use_neg = sc.neg_samples > 0 and sc.neg_inter_weight != 0
        if use_neg and ctx.global_batch < 2:
            raise ValueError(
                "STEGO negatives need a global batch of at least 2 images: raise data.batch_size "
                "or set stego.neg_samples=0"
            )

        coords1 = sample_coords(ctx, num_samples, "coords1", device)
        coords2 = sample_coords(ctx, num_samples, "coords2", device)
        partner = batch.partner_feats
        if use_knn and partner.shape != feats.shape:
            raise ValueError(f"batch.partner_feats {tuple(partner.shape)} must match batch.feats {tuple(feats.shape)}")
        code = self.head(feats)
        code_knn = self.head(partner) if use_knn else None

        # Every sampled tensor is L2-normalised once here: the anchors enter all three terms and the
        # feature means, the negatives are rows of one gathered tensor. The feature side never needs a
        # gradient (the target F is a constant).
        with torch.no_grad():
            f1 = norm(grid_sample(feats, coords1))
            fk = norm(grid_sample(partner, coords2)) if use_knn else None
            f2 = norm(grid_sample(feats, coords2)) if use_neg else None
        c1 = norm(grid_sample(code, coords1))
        if use_knn:
            ck = norm(grid_sample(code_knn, coords2))
        if use_neg:
            # Gathering the sampled (not full-grid) tensors keeps the traffic at O(G·C·S²) per step.
            f2_all = D.all_gather(f2)
            c2_all = D.all_gather_with_grad(norm(grid_sample(code, coords2)))
            perms = to_device(torch.stack(
                [ctx.local(D.derangement(ctx.global_batch, ctx.generator("neg", n))) for n in range(sc.neg_samples)]
            ), device)
            fneg, cneg = f2_all[perms], c2_all[perms]  # [n, b, ., S, S]

        means: dict[str, torch.Tensor | None] = {"self": None, "knn": None, "rand": None}
        if sc.pointwise:
            means = self._global_feature_means(f1, fk, fneg if use_neg else None, ctx)

        kw = {"spatial_center": sc.pointwise, "zero_clamp": sc.zero_clamp, "stabilize": sc.stabilize,
              "normalized": True}
        terms: dict[str, torch.Tensor] = {}
        l_self, cd_self = correlation_term(f1, f1, c1, c1, sc.pos_intra_shift, feature_mean=means["self"], **kw)
        loss = sc.pos_intra_weight * l_self.mean()
        terms["loss_self"], terms["cd_self"] = l_self.mean(), cd_self.mean()
        if use_knn:
            l_knn, cd_knn = correlation_term(f1, fk, c1, ck, sc.pos_inter_shift, feature_mean=means["knn"], **kw)
            loss = loss + sc.pos_inter_weight * l_knn.mean()
            terms["loss_knn"], terms["cd_knn"] = l_knn.mean(), cd_knn.mean()
        if use_neg:
            # All derangements share the anchors and have equal size: mean over n of the means = one mean.
            l_rand, cd_rand = stacked_correlation_term(
                f1, fneg, c1, cneg, sc.neg_inter_shift, feature_mean=means["rand"], **kw
            )
            loss = loss + sc.neg_inter_weight * l_rand.mean()
            terms["loss_rand"], terms["cd_rand"] = l_rand.mean(), cd_rand.mean()
        return loss, terms, code

    @staticmethod
    def _global_feature_means(
        f1: torch.Tensor, fk: torch.Tensor | None, fneg: torch.Tensor | None, ctx: StepContext
    ) -> dict[str, torch.Tensor | None]:
        """Each term's raw feature-correlation mean over the global batch, in one all-reduce.

        The sampled features are already L2-normalised.
        """
        sums = [mean_feature_correlation(f1, f1, normalized=True).sum().reshape(1)]
        if fk is not None:
            sums.append(mean_feature_correlation(f1, fk, normalized=True).sum().reshape(1))
        if fneg is not None:
            sums.append(mean_feature_correlation(f1.unsqueeze(0), fneg, normalized=True).sum(dim=1))
        total = D.all_reduce_sum(torch.cat(sums)) / ctx.global_batch
        out: dict[str, torch.Tensor | None] = {"self": total[0], "knn": None, "rand": None}
        if fk is not None:
            out["knn"] = total[1]
        if fneg is not None:
            out["rand"] = total[-fneg.shape[0] :]
        return out

    def probe_losses(self, code: torch.Tensor, label: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Cluster (and, given labels, linear) probe losses on ``code.detach()``."""
        detached = code.detach()
        losses = {"loss_cluster": self.cluster_probe.loss(detached)}
        if self.linear_probe is not None and label is not None:
            losses["loss_linear"] = self.linear_probe.loss(detached, label)
        elif self.linear_probe is not None:
            # DDP (find_unused_parameters=False) needs every parameter in the graph: a zero term keeps the
            # linear probe there on an unlabelled batch without changing the loss.
            losses["loss_linear_unused"] = sum(p.sum() for p in self.linear_probe.parameters()) * 0.0
        return losses

    def training_loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Correlation loss plus probe losses (probes see only the detached code).

        Logs: ``loss_stego`` (the weighted correlation loss), ``loss_self``/``loss_knn``/``loss_rand`` (unweighted
        term means), ``cd_self``/``cd_knn``/``cd_rand`` (mean code correlations), ``loss_cluster`` and
        ``loss_linear``, as detached 0-dim tensors; terms that were not computed are absent.
        """
        loss, terms, code = self.correlation_loss(batch, ctx)
        probes = self.probe_losses(code, batch.label)
        total = loss + sum(probes.values())
        logged = {"loss_stego": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        logged.update({k: v.detach() for k, v in probes.items() if not k.endswith("_unused")})
        # Logs stay on the device: the trainer reads them at logging steps only.
        return total, logged

    # ----------------------------------------------------------------------------------- prediction
    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """The head's code ``[b, D, h, w]`` of features ``[b, C, h, w]``."""
        return self.head(feats)

    def classify(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"cluster": cosine inner products [b, K, H, W], "linear": logits (if a linear probe exists)}``."""
        out = {"cluster": self.cluster_probe.inner(code)}
        if self.linear_probe is not None:
            out["linear"] = self.linear_probe(code)
        return out
