"""A model-selection score that needs no labels: cluster silhouette in the frozen backbone's feature space.

Sweeps on unlabelled data still have to rank trials. The head's code space cannot be used for that: every
trial learns its own code space, and a head that collapses its codes onto a few tight points looks "well
clustered" in its own space. The frozen backbone's feature space is the same for every trial, so the
silhouette of the *predicted* clusters measured there compares trials on one scale: it rewards
segmentations whose segments are coherent (similar backbone features inside a cluster) and distinct
(dissimilar features across clusters), which is what the methods' correlation losses distil from the
backbone. It is computed on a uniform subsample of held-out feature-grid pixels, with cosine distance
(the geometry the methods use, SPEC §3–4).

The score is *cluster-balanced* when the number of predicted clusters is known: each cluster contributes the
mean silhouette of its pixels and a cluster left empty contributes -1, so, like mIoU, every cluster counts
equally and a model that collapses onto a few clusters is penalised (the plain per-pixel silhouette rewards
such collapses: a two-way split of the backbone space often separates better than K fine segments).

``feature_silhouette`` scores one set of pixels; :class:`LabelFreeMeter` accumulates a bounded uniform
subsample over validation batches (and ranks) and scores it at the end (cluster-balanced).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dist_seg import distributed as D
from dist_seg.methods.base import to_device

DEGENERATE = -1.0


def feature_silhouette(features: torch.Tensor, clusters: torch.Tensor, *, num_clusters: Optional[int] = None,
                       max_samples: int = 4000, seed: int = 0) -> float:
    """Silhouette (cosine distance) of ``clusters`` measured in the space of ``features``.

    Args:
        features: ``[N, C]`` frozen-backbone features of N pixels.
        clusters: ``[N]`` predicted cluster index of each pixel.
        num_clusters: the number of clusters K' the model predicts. When given, the score is
            *cluster-balanced*: the mean over the K' clusters of the mean silhouette of each cluster's pixels,
            a cluster without (sampled) pixels counting -1. Like mIoU, which averages over classes, it weighs
            small clusters as much as large ones, and it penalises predictions that collapse onto a few
            clusters, which the plain silhouette rewards (two coarse clusters often separate better than
            K fine ones). When ``None``, the plain mean over pixels (scikit-learn's ``silhouette_score``).
        max_samples: score a uniform random subsample of at most this many pixels (the silhouette costs
            O(N²) distances).
        seed: seed of the subsample, so that every trial of a sweep is scored on the same pixels.

    Returns:
        A score in [-1, 1] (higher is better); ``-1.0`` when the silhouette is undefined because the
        (subsampled) pixels fall into a single cluster, or every pixel is its own cluster.

    Raises:
        ValueError: when the shapes do not describe N pixels, or a cluster index is not below ``num_clusters``.
    """
    from sklearn.metrics import silhouette_samples, silhouette_score

    if features.ndim != 2 or clusters.ndim != 1 or features.shape[0] != clusters.shape[0]:
        raise ValueError(f"expected features [N, C] and clusters [N], got {tuple(features.shape)} and "
                         f"{tuple(clusters.shape)}")
    if max_samples <= 1:
        raise ValueError(f"max_samples must be at least 2, got {max_samples}")
    x = features.detach().float().cpu().numpy()
    y = clusters.detach().cpu().numpy()
    if num_clusters is not None and y.size and (y.min() < 0 or y.max() >= num_clusters):
        raise ValueError(f"cluster indices must lie in [0, {num_clusters}), got [{y.min()}, {y.max()}]")
    if x.shape[0] > max_samples:
        pick = np.random.default_rng(seed).choice(x.shape[0], size=max_samples, replace=False)
        x, y = x[pick], y[pick]
    present = np.unique(y)
    # scikit-learn requires 2 <= #clusters <= N - 1; outside that range the silhouette is undefined.
    if present.size < 2 or present.size > x.shape[0] - 1:
        return DEGENERATE
    if num_clusters is None:
        return float(silhouette_score(x, y, metric="cosine"))
    per_pixel = silhouette_samples(x, y, metric="cosine")
    per_cluster = [per_pixel[y == k].mean() if k in present else DEGENERATE for k in range(num_clusters)]
    return float(np.mean(per_cluster))


def collect_for_label_free(features: torch.Tensor, cluster_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair every feature-grid pixel with its predicted cluster.

    Args:
        features: ``[B, C, h, w]`` frozen-backbone features of a validation batch.
        cluster_scores: ``[B, K, H, W]`` cluster scores (logits or cosine inner products) at any
            resolution; they are area-averaged onto the ``h × w`` feature grid before the argmax, so a
            prediction made at label resolution is scored on the grid the features live on.

    Returns:
        ``(pixels [B·h·w, C], clusters [B·h·w])``.
    """
    if features.ndim != 4 or cluster_scores.ndim != 4 or features.shape[0] != cluster_scores.shape[0]:
        raise ValueError(f"expected features [B, C, h, w] and scores [B, K, H, W], got {tuple(features.shape)} "
                         f"and {tuple(cluster_scores.shape)}")
    grid = features.shape[-2:]
    if cluster_scores.shape[-2:] != grid:
        cluster_scores = F.adaptive_avg_pool2d(cluster_scores.float(), grid)
    clusters = cluster_scores.argmax(1)
    pixels = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return pixels, clusters.reshape(-1)


class LabelFreeMeter:
    """Accumulates a uniform subsample of (feature, cluster) pixels over batches and ranks.

    Each pixel gets an independent uniform priority; the meter keeps the ``max_samples`` pixels of lowest
    priority (bottom-k sampling), which is a uniform sample without replacement of everything it was shown,
    in bounded memory. :meth:`compute` merges every rank's bottom-k the same way, so the score equals the one
    a single process would get from the same priorities.

    Args:
        max_samples: size of the scored subsample.
        seed: seeds the priorities (combined with the rank) and the silhouette's own subsample.
    """

    def __init__(self, *, max_samples: int = 4000, seed: int = 0) -> None:
        self.max_samples = int(max_samples)
        self.seed = int(seed)
        self._generator = D.seeded_generator(seed, "label_free", D.get_rank())
        self._num_clusters: Optional[int] = None
        self._features: Optional[torch.Tensor] = None
        self._clusters: Optional[torch.Tensor] = None
        self._priority: Optional[torch.Tensor] = None

    def _keep(self, features: torch.Tensor, clusters: torch.Tensor, priority: torch.Tensor) -> None:
        if priority.numel() > self.max_samples:
            # Priorities live on the host (a CPU generator, so the sample does not depend on the device);
            # the pixels stay where they were computed and only the kept rows are indexed there.
            priority, order = torch.topk(priority, self.max_samples, largest=False)
            order = to_device(order, features.device)
            features, clusters = features[order], clusters[order]
        self._features, self._clusters, self._priority = features, clusters, priority

    def update(self, features: torch.Tensor, cluster_scores: torch.Tensor) -> None:
        """Add a batch: ``features [B, C, h, w]`` and ``cluster_scores [B, K, H, W]`` (see
        :func:`collect_for_label_free`). The subsample is taken on the features' device; nothing is copied
        to the host before :meth:`compute`."""
        self._num_clusters = int(cluster_scores.shape[1])
        pixels, clusters = collect_for_label_free(features.detach(), cluster_scores.detach())
        pixels = pixels.float()
        priority = torch.rand(pixels.shape[0], generator=self._generator)
        if self._priority is not None:
            pixels = torch.cat([self._features, pixels])
            clusters = torch.cat([self._clusters, clusters])
            priority = torch.cat([self._priority, priority])
        self._keep(pixels, clusters, priority)

    def compute(self) -> float:
        """The cluster-balanced silhouette (see :func:`feature_silhouette`) of the kept pixels of all ranks,
        over the K' clusters the scores had. A collective: every rank must call it."""
        kept = (None, None) if self._features is None else (self._features.cpu(), self._clusters.cpu())
        parts = D.all_gather_object((*kept, self._priority, self._num_clusters))
        parts = [p for p in parts if p[0] is not None]
        if not parts:
            return DEGENERATE
        num_clusters = max(p[3] for p in parts)
        features = torch.cat([p[0] for p in parts])
        clusters = torch.cat([p[1] for p in parts])
        priority = torch.cat([p[2] for p in parts])
        if priority.numel() > self.max_samples:
            _, order = torch.topk(priority, self.max_samples, largest=False)
            features, clusters = features[order], clusters[order]
        return feature_silhouette(features, clusters, num_clusters=num_clusters, max_samples=self.max_samples,
                                  seed=self.seed)
