"""Segmentation metrics under the STEGO evaluation protocol (SPEC §6).

A confusion matrix is indexed ``[true class, predicted cluster]`` (scikit-learn's convention): ``K``
rows for the ground-truth classes and ``K'`` columns for the predicted clusters (``K' >= K`` when the
cluster probe has extra clusters). Pixels whose label is outside ``[0, K)`` (``-1``, ``255``) are not
counted. Matrices from several ranks are summed with :meth:`ConfusionMeter.all_reduce` *before*
matching, so every rank computes the same assignment.

Scores follow STEGO's ``UnsupervisedMetrics`` exactly (tested against an independent re-implementation):

* clusters are matched one-to-one to classes by the Hungarian algorithm, maximising the number of
  pixels on the matched diagonal; clusters left without a class form one "no class" prediction whose
  pixels count as wrong;
* ``IoU_c = tp / (tp + fp + fn)`` on the matched matrix, ``NaN`` when the class is neither present in
  the labels nor predicted (``tp + fp + fn = 0``); mIoU is the mean over the defined values;
* when ``K' > K`` and some pixels fall in unmatched clusters, STEGO's mean also includes the "no class"
  entry, whose IoU is 0 (it has no true pixels); we keep that so the numbers are comparable with the
  papers. It is reported separately as ``no_class_iou``;
* ``Acc`` is the matched correct pixels over all counted pixels (overall pixel accuracy).

One deliberate difference: STEGO's ``update`` also drops pixels *predicted* as a cluster ``>= K``, so
with ``extra_clusters > 0`` its extra clusters never reach the histogram. We count them (they are
predictions the model made); with ``K' == K``, as in every published STEGO configuration, the two
agree exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from dist_seg.distributed import all_reduce_sum

__all__ = ["ConfusionMeter", "apply_assignment", "cluster_balance", "cluster_scores", "linear_scores"]


class ConfusionMeter:
    """Accumulates a ``[K, K']`` confusion matrix of (true class, predicted cluster) pixel counts.

    Counting happens on ``device`` with :func:`torch.bincount`, so predictions made on a GPU never
    leave it until the (small) matrix is read.

    Args:
        num_classes: ``K``, the number of ground-truth classes; labels outside ``[0, K)`` are ignored.
        num_preds: ``K'``, the number of predicted ids (clusters); defaults to ``num_classes``.
        device: where the matrix lives (the device of the predictions, for speed).
    """

    def __init__(self, num_classes: int, num_preds: int | None = None, device: str | torch.device = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        num_preds = num_classes if num_preds is None else int(num_preds)
        if num_preds < 1:
            raise ValueError(f"num_preds must be >= 1, got {num_preds}")
        self.num_classes = int(num_classes)
        self.num_preds = num_preds
        self.device = torch.device(device)
        self.confusion = torch.zeros(self.num_classes, self.num_preds, dtype=torch.int64, device=self.device)

    def reset(self) -> None:
        """Set every count back to zero."""
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add the pixels of one batch.

        Args:
            pred: integer predictions of any shape, values in ``[0, K')``.
            target: integer labels of the same shape; values outside ``[0, K)`` are ignored.

        Raises:
            ValueError: on a shape mismatch or a prediction outside ``[0, K')`` among counted pixels.
        """
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}; "
                "upsample predictions to the label resolution before updating the meter"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("ConfusionMeter.update expects integer class ids; take argmax of scores first")
        pred = pred.reshape(-1).to(self.device, torch.int64)
        target = target.reshape(-1).to(self.device, torch.int64)
        keep = (target >= 0) & (target < self.num_classes)
        pred = pred[keep]
        target = target[keep]
        if pred.numel() == 0:
            return
        low, high = int(pred.min()), int(pred.max())
        if low < 0 or high >= self.num_preds:
            raise ValueError(
                f"predictions must lie in [0, {self.num_preds}) but span [{low}, {high}]; "
                f"build the meter with num_preds={max(high + 1, self.num_preds)} if the probe has more clusters"
            )
        counts = torch.bincount(target * self.num_preds + pred, minlength=self.num_classes * self.num_preds)
        self.confusion += counts.view(self.num_classes, self.num_preds)

    def all_reduce(self) -> torch.Tensor:
        """Sum the matrix over all ranks in place (identity on one process) and return it."""
        return all_reduce_sum(self.confusion)


def _as_numpy_confusion(confusion: Any) -> np.ndarray:
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    matrix = np.asarray(confusion, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"confusion must be 2-D [true class, predicted cluster], got shape {matrix.shape}")
    if (matrix < 0).any():
        raise ValueError("confusion counts must be non-negative")
    return matrix


def _scores(matched: np.ndarray, num_classes: int) -> dict[str, Any]:
    """IoU/accuracy of a matrix whose first ``K`` columns are the classes (column ``K``: "no class")."""
    tp = np.diag(matched[:, :num_classes]).astype(np.float64)
    true_total = matched.sum(axis=1)
    pred_total = matched[:, :num_classes].sum(axis=0)
    union = true_total + pred_total - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
    ious = list(iou)
    no_class_iou = math.nan
    if matched.shape[1] > num_classes and matched[:, num_classes].sum() > 0:
        # The "no class" prediction never matches a true pixel: IoU 0, kept in the mean as STEGO does.
        no_class_iou = 0.0
        ious.append(0.0)
    defined = [v for v in ious if not math.isnan(v)]
    total = matched.sum()
    return {
        "mIoU": 100.0 * float(np.mean(defined)) if defined else math.nan,
        "Acc": 100.0 * float(tp.sum() / total) if total > 0 else math.nan,
        # Percent, like mIoU and Acc: one unit per quantity everywhere (JSON reports, tables, MLflow).
        "per_class_iou": [100.0 * float(v) for v in iou],
        "no_class_iou": 100.0 * no_class_iou,
    }


def cluster_balance(confusion: Any) -> dict[str, float]:
    """How evenly the predicted clusters share the counted pixels: a collapse measure.

    Computed from the column sums of the ``[K, K']`` confusion matrix (the predicted-cluster histogram
    ``p``): ``cluster_entropy`` = ``−Σ p log p / log K'``, the assignment entropy normalised by its maximum
    (1 = every cluster owns the same share, 0 = one cluster owns every pixel; in nats it is this times
    ``log K'``); ``cluster_min_share`` = the smallest cluster's share of the pixels, in percent (100/K' when
    balanced, 0 when a cluster owns nothing); ``clusters_used`` = clusters owning at least one pixel. A run
    can touch all K' clusters and still be collapsed; the entropy and the smallest share show it. For
    reference ``class_entropy`` is the same entropy of the label histogram (row sums) normalised by
    ``log K``: what a perfect clustering would reach.

    Args:
        confusion: ``[K, K']`` counts indexed [true class, predicted cluster].

    Returns:
        ``{"cluster_entropy", "cluster_min_share", "clusters_used", "class_entropy"}`` (NaN for an empty
        matrix).
    """
    matrix = _as_numpy_confusion(confusion)

    def entropy(counts: np.ndarray) -> float:
        total = counts.sum()
        if total <= 0 or counts.size < 2:
            return math.nan if total <= 0 else 0.0
        p = counts[counts > 0] / total
        return float(-(p * np.log(p)).sum() / math.log(counts.size))

    cols = matrix.sum(axis=0)
    total = cols.sum()
    return {
        "cluster_entropy": entropy(cols),
        "cluster_min_share": 100.0 * float(cols.min() / total) if total > 0 else math.nan,
        "clusters_used": int((cols > 0).sum()),
        "class_entropy": entropy(matrix.sum(axis=1)),
    }


def cluster_scores(confusion: Any) -> dict[str, Any]:
    """Unsupervised scores: Hungarian matching of clusters to classes, then IoU and accuracy.

    Args:
        confusion: ``[K, K']`` counts indexed [true class, predicted cluster] (tensor or array),
            already summed over ranks. ``K' > K`` (extra clusters) and ``K' < K`` are allowed.

    Returns:
        A dict with ``"mIoU"`` and ``"Acc"`` in percent (0–100); ``"per_class_iou"``: ``K`` floats
        in percent (0–100), ``NaN`` where undefined; ``"no_class_iou"``: 0.0 when pixels fell in unmatched
        clusters, else ``NaN`` (see the module docstring); ``"assignment"``: for each of the ``K'``
        clusters the class it is matched to, ``-1`` when unmatched; ``"matched_confusion"``: a
        ``[K, K]`` int64 array whose column ``j`` sums the cluster(s) matched to class ``j``, with
        one more column holding the unmatched clusters ("no class") when ``K' > K``; and the collapse
        measures of :func:`cluster_balance` (``"cluster_entropy"``, ``"cluster_min_share"``,
        ``"clusters_used"``, ``"class_entropy"``).
    """
    matrix = _as_numpy_confusion(confusion)
    num_classes, num_preds = matrix.shape
    classes, clusters = linear_sum_assignment(matrix, maximize=True)
    assignment = np.full(num_preds, -1, dtype=np.int64)
    assignment[clusters] = classes
    width = num_classes + (1 if num_preds > num_classes else 0)
    matched = np.zeros((num_classes, width), dtype=np.float64)
    matched[:, classes] = matrix[:, clusters]
    unmatched = assignment < 0
    if unmatched.any():
        matched[:, num_classes] = matrix[:, unmatched].sum(axis=1)
    out = _scores(matched, num_classes)
    out["assignment"] = assignment.tolist()
    out["matched_confusion"] = matched.astype(np.int64)
    out.update(cluster_balance(matrix))
    return out


def linear_scores(confusion: Any) -> dict[str, Any]:
    """Supervised (linear probe) scores: prediction ``j`` is class ``j``, no matching.

    Args:
        confusion: square ``[K, K]`` counts indexed [true class, predicted class].

    Returns:
        The same keys as :func:`cluster_scores`, with the identity assignment.
    """
    matrix = _as_numpy_confusion(confusion)
    num_classes, num_preds = matrix.shape
    if num_preds != num_classes:
        raise ValueError(
            f"linear_scores needs a square confusion matrix (a probe with one output per class), got "
            f"{matrix.shape}; use cluster_scores for clusterings"
        )
    out = _scores(matrix, num_classes)
    out["assignment"] = list(range(num_classes))
    out["matched_confusion"] = matrix.astype(np.int64)
    return out


def apply_assignment(cluster_pred: torch.Tensor | np.ndarray, assignment) -> torch.Tensor | np.ndarray:
    """Map cluster ids to their matched class ids (``-1`` for unmatched clusters), e.g. for plots.

    Args:
        cluster_pred: integer cluster ids, any shape (tensor or array).
        assignment: the ``"assignment"`` list of :func:`cluster_scores`.

    Returns:
        Class ids of the same shape and type as ``cluster_pred``.
    """
    if isinstance(cluster_pred, torch.Tensor):
        lookup = torch.as_tensor(assignment, dtype=torch.int64, device=cluster_pred.device)
        return lookup[cluster_pred.long()]
    return np.asarray(assignment, dtype=np.int64)[np.asarray(cluster_pred)]
