"""Confusion matrices and STEGO-protocol scores (SPEC §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import confusion_matrix

from dist_seg.eval.metrics import (
    ConfusionMeter,
    apply_assignment,
    cluster_balance,
    cluster_scores,
    linear_scores,
)
from tests.dist_utils import run_distributed


# --------------------------------------------------------------------------------------------------
# Oracle: STEGO's UnsupervisedMetrics (src/utils.py) restated independently, step by step.
#   * its histogram is [predicted cluster, true class] with n_classes + extra_clusters rows;
#   * its update keeps pixels with 0 <= label < n AND 0 <= pred < n (so extra clusters are dropped);
#   * with extra_clusters == 0 the rows are reordered so row c is the cluster matched to class c;
#   * with extra clusters, a second Hungarian run on the transpose picks one cluster per class, all
#     clusters missing from the first run's rows are summed into an extra "no class" row, and a zero
#     column is appended;
#   * tp = diagonal, the two off-diagonal sums, IoU = tp / (tp + both), mIoU = mean of non-NaN IoU
#     (all K or K + 1 entries), accuracy = sum(tp) / sum(histogram).
# --------------------------------------------------------------------------------------------------
class StegoMetricsOracle:
    def __init__(self, n_classes: int, extra_clusters: int, hungarian: bool, stego_update_mask: bool = True):
        self.n = n_classes
        self.extra = extra_clusters
        self.hungarian = hungarian
        self.stego_update_mask = stego_update_mask
        self.stats = np.zeros((n_classes + extra_clusters, n_classes), dtype=np.int64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        p = preds.reshape(-1).numpy()
        t = target.reshape(-1).numpy()
        upper = self.n if self.stego_update_mask else self.n + self.extra
        ok = (t >= 0) & (t < self.n) & (p >= 0) & (p < upper)
        np.add.at(self.stats, (p[ok], t[ok]), 1)  # unbuffered per-pixel counting, no bincount

    def compute(self) -> dict:
        stats = self.stats.astype(np.float64)
        total_clusters = self.n + self.extra
        if self.hungarian:
            first_rows, first_cols = linear_sum_assignment(stats, maximize=True)
            if self.extra == 0:
                histogram = stats[np.argsort(first_cols), :]
            else:
                _, cluster_per_class = linear_sum_assignment(stats.T, maximize=True)
                histogram = stats[cluster_per_class, :]
                leftover = sorted(set(range(total_clusters)) - set(first_rows.tolist()))
                histogram = np.vstack([histogram, stats[leftover, :].sum(axis=0, keepdims=True)])
                histogram = np.hstack([histogram, np.zeros((self.n + 1, 1))])
        else:
            histogram = stats
        tp = np.diag(histogram)
        off_a = histogram.sum(axis=0) - tp
        off_b = histogram.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = tp / (tp + off_a + off_b)
        return {
            "mIoU": 100.0 * iou[~np.isnan(iou)].mean(),
            "Acc": 100.0 * tp.sum() / histogram.sum(),
            "iou": iou,
        }


def _noisy_clustering(seed: int, num_classes: int, num_clusters: int, shape=(4, 37, 29), absent=()):
    """Labels with ignore pixels, and predictions that mostly follow a hidden class→cluster map."""
    gen = torch.Generator().manual_seed(seed)
    present = torch.tensor([c for c in range(num_classes) if c not in absent])
    target = present[torch.randint(len(present), shape, generator=gen)]
    ignore = torch.rand(shape, generator=gen) < 0.1
    target = torch.where(ignore, torch.where(torch.rand(shape, generator=gen) < 0.5, -1, 255), target)
    hidden = torch.randperm(num_clusters, generator=gen)[:num_classes]
    follow = torch.rand(shape, generator=gen) < 0.55
    noise = torch.randint(num_clusters, shape, generator=gen)
    pred = torch.where(follow, hidden[target.clamp(0, num_classes - 1)], noise)
    return pred, target


# --- hand-made matrices with known answers ---------------------------------------------------------
def test_permuted_perfect_clustering_scores_100():
    num_classes = 5
    perm = torch.tensor([3, 0, 4, 1, 2])  # class c is always predicted as cluster perm[c]
    target = torch.randint(num_classes, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    meter = ConfusionMeter(num_classes)
    meter.update(perm[target], target)
    scores = cluster_scores(meter.confusion)
    assert scores["mIoU"] == pytest.approx(100.0), f"perfect clustering up to renaming must give mIoU 100: {scores}"
    assert scores["Acc"] == pytest.approx(100.0), f"perfect clustering up to renaming must give Acc 100: {scores}"
    assert apply_assignment(perm, scores["assignment"]).tolist() == list(range(num_classes)), (
        f"assignment {scores['assignment']} must undo the permutation {perm.tolist()}"
    )
    lin = linear_scores(meter.confusion)
    assert lin["Acc"] == pytest.approx(0.0), "linear scores must not match: a derangement gets no pixel right"


def test_extra_clusters_are_no_class_and_counted_wrong():
    confusion = np.array(
        [
            [10, 0, 0, 2, 0],
            [0, 8, 0, 0, 0],
            [0, 1, 6, 0, 3],
        ]
    )
    scores = cluster_scores(confusion)
    assert scores["assignment"] == [0, 1, 2, -1, -1], f"wrong matching {scores['assignment']}"
    expected_iou = [10 / 12, 8 / 9, 6 / 10]
    np.testing.assert_allclose(scores["per_class_iou"], 100 * np.array(expected_iou),
                               err_msg="per-class IoU after matching, in percent like mIoU")
    assert scores["no_class_iou"] == 0.0, "pixels in unmatched clusters give the 'no class' entry IoU 0"
    assert scores["mIoU"] == pytest.approx(100 * (sum(expected_iou) + 0.0) / 4), "STEGO averages K+1 entries"
    assert scores["Acc"] == pytest.approx(100 * 24 / 30), "unmatched-cluster pixels count as wrong"
    np.testing.assert_array_equal(
        scores["matched_confusion"], [[10, 0, 0, 2], [0, 8, 0, 0], [0, 1, 6, 3]], err_msg="matched confusion"
    )

    # The best cluster for a class may be an extra one; the displaced low-index cluster is unmatched.
    shifted = cluster_scores(np.array([[1, 0, 9], [0, 5, 0]]))
    assert shifted["assignment"] == [-1, 1, 0], f"cluster 2 should take class 0: {shifted['assignment']}"
    assert shifted["Acc"] == pytest.approx(100 * 14 / 15)
    np.testing.assert_allclose(shifted["per_class_iou"], [90.0, 100.0])

    # Extra clusters that stay empty add no "no class" entry.
    empty_extra = cluster_scores(np.array([[4, 0, 0], [0, 6, 0]]))
    assert math.isnan(empty_extra["no_class_iou"]) and empty_extra["mIoU"] == pytest.approx(100.0)


def test_absent_class_has_undefined_iou_excluded_from_miou():
    # Class 2 never occurs and its matched cluster is never predicted: IoU undefined, left out.
    scores = cluster_scores(np.array([[6, 0, 0], [0, 4, 0], [0, 0, 0]]))
    assert math.isnan(scores["per_class_iou"][2]), f"absent class must have NaN IoU: {scores['per_class_iou']}"
    assert scores["mIoU"] == pytest.approx(100.0), "mIoU must average only the defined IoUs"

    # Class 2 absent but its matched cluster predicted elsewhere: IoU is defined and 0 (STEGO too).
    scores = cluster_scores(np.array([[5, 0, 1], [0, 5, 0], [0, 0, 0]]))
    np.testing.assert_allclose(scores["per_class_iou"], [500 / 6, 100.0, 0.0])
    assert scores["mIoU"] == pytest.approx(100 * (5 / 6 + 1.0) / 3)


def test_ignore_labels_are_not_counted():
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(4, (3, 20, 20), generator=gen)
    pred = torch.randint(4, (3, 20, 20), generator=gen)
    noisy = target.clone()
    noisy[:, :5] = -1
    noisy[:, -5:] = 255
    meter = ConfusionMeter(4)
    meter.update(pred, noisy)
    valid = (noisy >= 0) & (noisy < 4)
    reference = ConfusionMeter(4)
    reference.update(pred[valid], target[valid])
    assert int(meter.confusion.sum()) == int(valid.sum()), "only labels in [0, K) are counted"
    assert torch.equal(meter.confusion, reference.confusion), "ignored pixels changed the counts"


def test_confusion_convention_matches_sklearn():
    num_classes, num_clusters = 4, 6
    pred, target = _noisy_clustering(3, num_classes, num_clusters)
    meter = ConfusionMeter(num_classes, num_clusters)
    meter.update(pred, target)
    meter.update(pred[:1], target[:1])  # accumulates across calls
    valid = (target >= 0) & (target < num_classes)
    y_true = torch.cat([target[valid], target[:1][valid[:1]]]).numpy()
    y_pred = torch.cat([pred[valid], pred[:1][valid[:1]]]).numpy()
    expected = confusion_matrix(y_true, y_pred, labels=range(num_clusters))[:num_classes]
    np.testing.assert_array_equal(meter.confusion.numpy(), expected, err_msg="confusion must be [true, pred]")
    meter.reset()
    assert int(meter.confusion.sum()) == 0


def test_update_rejects_bad_predictions():
    meter = ConfusionMeter(3)
    with pytest.raises(ValueError, match="num_preds=5"):
        meter.update(torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        meter.update(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="argmax"):
        meter.update(torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="square"):
        linear_scores(np.ones((3, 4)))


# --- equality with the STEGO oracle ----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("num_classes", [3, 7, 27])
def test_cluster_scores_equal_stego_without_extra_clusters(seed, num_classes):
    absent = (num_classes - 1,) if seed == 3 else ()
    pred, target = _noisy_clustering(seed, num_classes, num_classes, shape=(3, 41, 43), absent=absent)
    meter = ConfusionMeter(num_classes)
    oracle = StegoMetricsOracle(num_classes, 0, hungarian=True)
    for i in range(pred.shape[0]):  # several updates, as over a validation loader
        meter.update(pred[i], target[i])
        oracle.update(pred[i], target[i])
    ours, ref = cluster_scores(meter.confusion), oracle.compute()
    assert ours["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9), f"mIoU {ours['mIoU']} vs STEGO {ref['mIoU']}"
    assert ours["Acc"] == pytest.approx(ref["Acc"], abs=1e-9), f"Acc {ours['Acc']} vs STEGO {ref['Acc']}"
    np.testing.assert_allclose(ours["per_class_iou"], 100 * np.asarray(ref["iou"]), err_msg="per-class IoU vs STEGO")

    lin_oracle = StegoMetricsOracle(num_classes, 0, hungarian=False)
    lin_oracle.update(pred, target)
    lin, lin_ref = linear_scores(meter.confusion), lin_oracle.compute()
    assert lin["mIoU"] == pytest.approx(lin_ref["mIoU"], abs=1e-9) and lin["Acc"] == pytest.approx(lin_ref["Acc"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_classes,extra", [(3, 2), (6, 3), (27, 5)])
def test_cluster_scores_equal_stego_with_extra_clusters(seed, num_classes, extra):
    num_clusters = num_classes + extra
    pred, target = _noisy_clustering(100 + seed, num_classes, num_clusters, shape=(2, 48, 40))

    # (a) STEGO end to end: its update drops pixels predicted as a cluster >= K. Feed our meter the
    # same pixels and the two must agree on everything.
    kept = pred < num_classes
    meter = ConfusionMeter(num_classes, num_clusters)
    meter.update(pred[kept], target[kept])
    oracle = StegoMetricsOracle(num_classes, extra, hungarian=True)
    oracle.update(pred, target)
    ours, ref = cluster_scores(meter.confusion), oracle.compute()
    assert ours["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9), f"mIoU {ours['mIoU']} vs STEGO {ref['mIoU']}"
    assert ours["Acc"] == pytest.approx(ref["Acc"], abs=1e-9)

    # (b) All pixels counted (our meter): STEGO's compute on the full histogram agrees, including the
    # "no class" entry.
    meter = ConfusionMeter(num_classes, num_clusters)
    meter.update(pred, target)
    oracle = StegoMetricsOracle(num_classes, extra, hungarian=True, stego_update_mask=False)
    oracle.update(pred, target)
    ours, ref = cluster_scores(meter.confusion), oracle.compute()
    assert (np.asarray(ours["assignment"]) < 0).sum() == extra, "exactly K'-K clusters stay unmatched"
    assert ours["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9), f"mIoU {ours['mIoU']} vs STEGO {ref['mIoU']}"
    assert ours["Acc"] == pytest.approx(ref["Acc"], abs=1e-9), f"Acc {ours['Acc']} vs STEGO {ref['Acc']}"
    np.testing.assert_allclose(ours["per_class_iou"] + [ours["no_class_iou"]], 100 * np.asarray(ref["iou"]),
                               err_msg="IoU vs STEGO")
    assert ours["matched_confusion"].sum() == meter.confusion.sum(), "matching must keep every pixel"


# --- two ranks -------------------------------------------------------------------------------------
def _rank_data(rank: int):
    return _noisy_clustering(50 + rank, 5, 7, shape=(2, 16, 16))


def _all_reduce_worker(rank, world):
    pred, target = _rank_data(rank)
    meter = ConfusionMeter(5, 7)
    meter.update(pred, target)
    local = meter.confusion.clone()
    meter.all_reduce()
    return {"local": local, "reduced": meter.confusion.clone(), "scores": cluster_scores(meter.confusion)}


def test_two_rank_all_reduce_sums_confusions():
    results = run_distributed(_all_reduce_worker, 2)
    expected = ConfusionMeter(5, 7)
    for rank in range(2):
        expected.update(*_rank_data(rank))
    for rank, result in enumerate(results):
        assert not torch.equal(result["local"], expected.confusion), "test data must differ between ranks"
        assert torch.equal(result["reduced"], expected.confusion), f"rank {rank} did not get the summed confusion"
        assert result["scores"]["mIoU"] == pytest.approx(cluster_scores(expected.confusion)["mIoU"])


def test_cluster_balance_measures_collapse_beyond_clusters_used():
    """Entropy of the predicted-cluster histogram (normalised by log K') and the smallest cluster's share."""
    balanced = np.array([[10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]])
    out = cluster_balance(balanced)
    assert out["cluster_entropy"] == pytest.approx(1.0) and out["cluster_min_share"] == pytest.approx(25.0)
    assert out["clusters_used"] == 4 and out["class_entropy"] == pytest.approx(1.0)
    # every cluster owns a pixel, but one owns almost all: "clusters used" cannot tell, the entropy can
    collapsed = np.array([[37, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    out = cluster_balance(collapsed)
    p = np.array([37, 1, 1, 1]) / 40
    assert out["clusters_used"] == 4
    assert out["cluster_entropy"] == pytest.approx(float(-(p * np.log(p)).sum() / np.log(4)))
    assert out["cluster_entropy"] < 0.3 and out["cluster_min_share"] == pytest.approx(2.5)
    # a cluster with no pixel: share 0; one cluster owns everything: entropy 0
    assert cluster_balance(np.array([[5, 0], [3, 0]]))["cluster_min_share"] == 0.0
    assert cluster_balance(np.array([[5, 0], [3, 0]]))["cluster_entropy"] == 0.0
    # the measures travel with the cluster scores (report JSON) and the flat tracking summary (MLflow)
    from dist_seg.eval.evaluate import summary

    scores = cluster_scores(torch.tensor(collapsed))
    assert scores["cluster_entropy"] == pytest.approx(out["cluster_entropy"]) and scores["cluster_min_share"] == 2.5
    flat = summary({"cluster": scores, "linear": None}, prefix="val/")
    assert flat["val/cluster_entropy"] == pytest.approx(cluster_balance(collapsed)["cluster_entropy"])
    assert flat["val/cluster_min_share"] == pytest.approx(2.5)
