"""The label-free selection score: silhouette of predicted clusters in the frozen backbone's space."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from dist_seg.eval.label_free import LabelFreeMeter, collect_for_label_free, feature_silhouette
from tests.dist_utils import run_distributed


def reference_silhouette(x: np.ndarray, y: np.ndarray) -> float:
    """Rousseeuw's definition written out, with cosine distance (independent of sklearn)."""
    d = cdist(x, x, metric="cosine")
    scores = []
    for i in range(len(x)):
        same = (y == y[i])
        if same.sum() == 1:
            scores.append(0.0)
            continue
        a = d[i, same].sum() / (same.sum() - 1)
        b = min(d[i, y == c].mean() for c in np.unique(y) if c != y[i])
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def blobs(n_per: int, k: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(k * n_per, dim, generator=g)
    y = torch.arange(k).repeat_interleave(n_per)
    return x, y


def test_matches_the_definition_with_cosine_distance():
    x, y = blobs(12, 3, spread=0.5)
    got = feature_silhouette(x, y)
    want = reference_silhouette(x.numpy(), y.numpy())
    assert got == pytest.approx(want, abs=1e-5), f"silhouette {got} != definition {want}"


def test_balanced_score_averages_clusters_and_counts_empty_ones_as_minus_one():
    x, y = blobs(10, 3, spread=0.5)
    y = torch.cat([y[:25], torch.full((5,), 1)])  # unequal cluster sizes: 10, 15, 5
    d_ref = cdist(x.numpy(), x.numpy(), metric="cosine")
    per_pixel = []
    for i in range(len(x)):
        same = (y == y[i]).numpy()
        a = d_ref[i, same].sum() / (same.sum() - 1)
        b = min(d_ref[i, (y == c).numpy()].mean() for c in y.unique().tolist() if c != y[i])
        per_pixel.append((b - a) / max(a, b))
    per_pixel = np.array(per_pixel)
    per_cluster = [per_pixel[(y == k).numpy()].mean() for k in range(3)]
    got = feature_silhouette(x, y, num_clusters=3)
    assert got == pytest.approx(np.mean(per_cluster), abs=1e-5), "mean over clusters of their mean silhouette"
    assert feature_silhouette(x, y, num_clusters=5) == pytest.approx((sum(per_cluster) - 2) / 5, abs=1e-5), \
        "two clusters that received no pixel must count -1 each"
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        feature_silhouette(x, y, num_clusters=2)


def test_balanced_score_penalises_collapse_that_the_plain_silhouette_rewards():
    # 4 true segments forming 2 well separated pairs: merging each pair separates better per pixel
    g = torch.Generator().manual_seed(0)
    poles = F.normalize(torch.randn(2, 16, generator=g), dim=1)
    centres = poles.repeat_interleave(2, 0) + 0.1 * torch.randn(4, 16, generator=g)
    x = centres.repeat_interleave(60, 0) + 0.08 * torch.randn(240, 16, generator=g)
    truth = torch.arange(4).repeat_interleave(60)
    collapsed = truth // 2
    assert feature_silhouette(x, collapsed) > feature_silhouette(x, truth), "premise: plain silhouette prefers collapse"
    assert feature_silhouette(x, truth, num_clusters=4) > feature_silhouette(x, collapsed, num_clusters=4), \
        "the balanced score must prefer using the model's 4 clusters"


def test_is_invariant_to_feature_scale_because_distance_is_cosine():
    x, y = blobs(20, 3, spread=0.3)
    scale = torch.rand(x.shape[0], 1) * 10 + 0.1
    assert feature_silhouette(x * scale, y) == pytest.approx(feature_silhouette(x, y), abs=1e-5)


def test_ranks_true_clusters_above_shuffled_and_corrupted_ones():
    x, y = blobs(50, 4, spread=0.08)
    g = torch.Generator().manual_seed(1)
    truth = feature_silhouette(x, y)
    corrupted = y.clone()
    flip = torch.rand(len(y), generator=g) < 0.3
    corrupted[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
    shuffled = y[torch.randperm(len(y), generator=g)]
    s_corrupt, s_shuffled = feature_silhouette(x, corrupted), feature_silhouette(x, shuffled)
    assert truth > 0.7, f"well separated clusters should score high, got {truth}"
    assert truth > s_corrupt > s_shuffled, f"expected truth {truth} > 30% corrupted {s_corrupt} > shuffled {s_shuffled}"
    assert abs(s_shuffled) < 0.1, f"random assignments should score near 0, got {s_shuffled}"


def test_degenerate_assignments_score_minus_one():
    x, _ = blobs(10, 2)
    assert feature_silhouette(x, torch.zeros(len(x), dtype=torch.long)) == -1.0, "one cluster must give -1"
    assert feature_silhouette(x, torch.arange(len(x))) == -1.0, "one pixel per cluster must give -1"


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"features \[N, C\]"):
        feature_silhouette(torch.randn(10, 4), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_samples"):
        feature_silhouette(torch.randn(10, 4), torch.zeros(10, dtype=torch.long), max_samples=1)


def test_subsample_is_seeded_and_bounded():
    x, y = blobs(400, 3, spread=0.4)
    a = feature_silhouette(x, y, max_samples=300, seed=3)
    b = feature_silhouette(x, y, max_samples=300, seed=3)
    c = feature_silhouette(x, y, max_samples=300, seed=4)
    full = feature_silhouette(x, y, max_samples=len(x))
    assert a == b, "the same seed must score the same pixels"
    assert a != c, "another seed should draw another subsample"
    assert a == pytest.approx(full, abs=0.05), f"a 300-pixel subsample ({a}) should estimate the full score ({full})"


def test_collect_pools_label_resolution_scores_onto_the_feature_grid():
    feats = torch.randn(2, 6, 4, 4)
    clusters = torch.randint(0, 3, (2, 4, 4))
    # scores at 8x upsampled resolution: each 8x8 block votes for its grid cell's cluster
    scores = F.one_hot(clusters, 3).permute(0, 3, 1, 2).float().repeat_interleave(8, 2).repeat_interleave(8, 3)
    pixels, got = collect_for_label_free(feats, scores)
    assert pixels.shape == (32, 6) and got.shape == (32,)
    assert torch.equal(got, clusters.reshape(-1)), "pooled prediction must match each grid cell's cluster"
    assert torch.equal(pixels[5], feats[0, :, 1, 1]), "pixel order must be (batch, row, column)"
    same_res, got2 = collect_for_label_free(feats, scores[:, :, ::8, ::8])
    assert torch.equal(got2, got)


def test_meter_keeps_a_bounded_uniform_sample_and_scores_it():
    x, y = blobs(100, 3, spread=0.3)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    feats = x.reshape(30, 5, 2, 16).permute(0, 3, 1, 2)  # 30 batches of 1 image, 5x2 grid
    scores = F.one_hot(y, 3).reshape(30, 5, 2, 3).permute(0, 3, 1, 2).float()

    small = LabelFreeMeter(max_samples=1000)
    for i in range(30):
        small.update(feats[i:i + 1], scores[i:i + 1])
    assert small._priority.numel() == 300
    assert small.compute() == pytest.approx(feature_silhouette(x, y, num_clusters=3), abs=1e-6), \
        "with room for every pixel the meter must score all of them, over the 3 clusters of the scores"

    meter = LabelFreeMeter(max_samples=90, seed=1)
    for i in range(30):
        meter.update(feats[i:i + 1], scores[i:i + 1])
    assert meter._priority.numel() == 90, "the meter must keep exactly max_samples pixels"
    kept = {tuple(r.tolist()) for r in meter._features}
    per_third = [sum(tuple(r.tolist()) in kept for r in x[j * 100:(j + 1) * 100]) for j in range(3)]
    assert all(15 <= n <= 45 for n in per_third), f"early and late batches must be kept alike, got {per_third}"


def _meter_on_rank(rank, world, x, y):
    meter = LabelFreeMeter(max_samples=10_000)
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    xs, ys = x[part], y[part]
    meter.update(xs.T.reshape(1, -1, 1, len(xs)), F.one_hot(ys, 3).T.reshape(1, 3, 1, len(ys)).float())
    return meter.compute()


def test_meter_combines_ranks():
    x, y = blobs(40, 3, spread=0.6)
    results = run_distributed(_meter_on_rank, 2, x, y)
    want = feature_silhouette(x, y, num_clusters=3)
    assert results[0] == results[1], f"every rank must get the same score, got {results}"
    assert results[0] == pytest.approx(want, abs=1e-6), "2 ranks must score the union of their pixels"


def test_on_toy_scenes_ground_truth_beats_corrupted_predictions(tmp_path):
    from dist_seg.backbones import load_backbone
    from dist_seg.data.shards import make_loader
    from dist_seg.data.toy import generate_toy

    generate_toy(tmp_path / "toy", num_train=0, num_val=16, num_classes=5)
    loader, _ = make_loader(tmp_path / "toy", "val", batch_size=16, res=64, num_workers=0, shuffle=False,
                            infinite=False)
    batch = next(iter(loader))
    backbone = load_backbone("toy")
    with torch.no_grad():
        feats = backbone.patch_features(batch["image"])
    truth = F.one_hot(batch["label"].clamp(min=0).long(), 5).permute(0, 3, 1, 2).float()
    g = torch.Generator().manual_seed(0)
    noisy = truth.clone()
    flip = torch.rand(noisy.shape[0], 1, *noisy.shape[2:], generator=g) < 0.5
    noise = F.one_hot(torch.randint(0, 5, flip.shape[:1] + flip.shape[2:], generator=g), 5).permute(0, 3, 1, 2).float()
    # corrupt whole 8x8 patches so the corruption survives pooling onto the feature grid
    flip = flip.float()[..., ::8, ::8].repeat_interleave(8, 2).repeat_interleave(8, 3).bool()
    noise = noise[..., ::8, ::8].repeat_interleave(8, 2).repeat_interleave(8, 3)
    noisy = torch.where(flip, noise, truth)
    s_truth = feature_silhouette(*collect_for_label_free(feats, truth))
    s_noisy = feature_silhouette(*collect_for_label_free(feats, noisy))
    assert s_truth > s_noisy, f"true segments ({s_truth}) must score above half-corrupted ones ({s_noisy})"
