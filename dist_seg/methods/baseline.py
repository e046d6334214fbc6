"""Backbone-feature baselines as a method (SPEC §5, paper 002).

The "head" is fixed: raw features, PCA to D dims, or a Gaussian random projection to D dims. Only the
cluster probe (and, with labels, the linear probe) is trained, exactly as on a learned head's code, so
baselines and methods are scored by the same loop.
"""

from __future__ import annotations

import torch

from dist_seg.config import RunConfig
from dist_seg.heads.baselines import build_baseline
from dist_seg.heads.probes import ClusterProbe, LinearProbe
from dist_seg.methods.base import Batch, Method, StepContext


class BaselineMethod(Method):
    name = "baseline"
    # Only the probes train, and both are in every step's loss (the linear one whenever labels exist).
    find_unused_parameters = False
    needs_partners = False

    def __init__(self, cfg: RunConfig, *, feat_dim: int, num_classes: int, has_labels: bool) -> None:
        super().__init__(cfg, feat_dim=feat_dim, num_classes=num_classes, has_labels=has_labels)
        b = cfg.baseline
        self.kind = b.kind
        self.fit_samples = b.fit_samples
        self.head = build_baseline(b.kind, feat_dim, b.dim, cfg.train.seed)
        self.dim = self.head.out_dim or feat_dim
        self.cluster_probe = ClusterProbe(self.dim, num_classes)
        self.linear_probe = LinearProbe(self.dim, num_classes) if has_labels else None
        self.needs_fit = self.head.needs_fit  # only PCA needs training features before the probes start

    def fit(self, features: torch.Tensor) -> None:
        """Fit PCA on ``[N, C]`` training feature vectors."""
        self.head.fit(features)

    def build_optimizer(self) -> torch.optim.Optimizer:
        groups = [
            {"params": list(self.cluster_probe.parameters()), "lr": self.cfg.baseline.probe_lr, "name": "cluster_probe"}
        ]
        if self.linear_probe is not None:
            groups.append({"params": list(self.linear_probe.parameters()), "lr": self.cfg.baseline.probe_lr,
                           "name": "linear_probe"})
        return torch.optim.Adam(groups)

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def classify(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"cluster": self.cluster_probe.inner(code)}
        if self.linear_probe is not None:
            out["linear"] = self.linear_probe(code)
        return out

    def training_loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        code = self.encode(batch.feats).detach()
        loss_cluster = self.cluster_probe.loss(code)
        logs = {"loss_cluster": loss_cluster.detach()}
        loss = loss_cluster
        if self.linear_probe is not None and batch.label is not None:
            loss_linear = self.linear_probe.loss(code, batch.label)
            loss = loss + loss_linear
            logs["loss_linear"] = loss_linear.detach()
        elif self.linear_probe is not None:  # keeps the probe in the graph (find_unused_parameters=False)
            loss = loss + sum(p.sum() for p in self.linear_probe.parameters()) * 0.0
        return loss, logs
