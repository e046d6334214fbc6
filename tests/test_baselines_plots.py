"""Training-free baselines (SPEC §5) and evaluation figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.random_projection import GaussianRandomProjection

from dist_seg.eval.metrics import cluster_scores
from dist_seg.eval.plots import (
    colorize,
    confusion_figure,
    default_palette,
    overlay_grid,
)
from dist_seg.heads.baselines import (
    IdentityBaseline,
    PCABaseline,
    RandomProjectionBaseline,
    build_baseline,
)


def _features(seed: int = 0, batch: int = 3, channels: int = 24, size: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Anisotropic features so the principal directions are well separated.
    scale = torch.linspace(3.0, 0.1, channels).view(1, -1, 1, 1)
    return torch.randn(batch, channels, size, size, generator=gen) * scale + 0.5


def _pixels(features: torch.Tensor) -> np.ndarray:
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double().numpy()


# --- baselines --------------------------------------------------------------------------------------
def test_identity_returns_features():
    x = _features()
    module = build_baseline("raw", 24, 8)
    assert isinstance(module, IdentityBaseline) and module.out_dim == 24
    assert torch.equal(module(x), x)


def test_pca_equals_sklearn_transform_per_pixel():
    fit_x, test_x = _features(0), _features(1)
    module = build_baseline("pca", 24, 5, seed=3)
    assert isinstance(module, PCABaseline) and module.needs_fit
    with pytest.raises(RuntimeError, match="fit"):
        module(test_x)
    module.fit(fit_x)  # feature maps are flattened to one row per pixel
    reference = PCA(n_components=5, random_state=3).fit(_pixels(fit_x))
    expected = reference.transform(_pixels(test_x)).reshape(3, 7, 7, 5).transpose(0, 3, 1, 2)
    out = module(test_x)
    assert out.shape == (3, 5, 7, 7), f"PCA code shape {tuple(out.shape)}"
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4, err_msg="PCA code vs sklearn transform")

    # A fitted PCA survives a state_dict round trip into a freshly built, unfitted one.
    restored = build_baseline("pca", 24, 5)
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored(test_x), out), "restored PCA must give the same code"
    shapeless = PCABaseline(5)  # built without knowing the channel count
    shapeless.load_state_dict(module.state_dict())
    assert shapeless.fitted and torch.equal(shapeless(test_x), out), "PCA without in_dim must restore too"
    with pytest.raises(ValueError, match="channels"):
        build_baseline("pca", 16, 5).fit(fit_x)


def test_random_projection_is_seeded_and_equals_sklearn():
    x = _features(2)
    module = build_baseline("rp", 24, 6, seed=11)
    assert isinstance(module, RandomProjectionBaseline) and not module.needs_fit
    out = module(x)
    assert out.shape == (3, 6, 7, 7), f"random projection code shape {tuple(out.shape)}"
    reference = GaussianRandomProjection(n_components=6, random_state=11).fit(_pixels(x))
    expected = reference.transform(_pixels(x)).reshape(3, 7, 7, 6).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4, err_msg="RP code vs sklearn")
    assert torch.equal(build_baseline("rp", 24, 6, seed=11)(x), out), "same seed must give the same projection"
    assert not torch.allclose(build_baseline("rp", 24, 6, seed=12)(x), out), "another seed must differ"
    copy = RandomProjectionBaseline(24, 6, seed=0)
    copy.load_state_dict(module.state_dict())
    assert torch.equal(copy(x), out), "state_dict must carry the projection"


def test_unknown_baseline_names_the_choices():
    with pytest.raises(ValueError, match="raw, pca, rp"):
        build_baseline("lda", 24, 6)


# --- plots ------------------------------------------------------------------------------------------
def test_palette_and_colorize():
    palette = default_palette(70)
    assert palette.shape == (70, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 70, "default colours must be distinct"
    labels = np.array([[0, 1, -1], [2, -1, 1]])
    rgb = colorize(labels, palette[:3])
    np.testing.assert_array_equal(rgb[0, 0], palette[0])
    np.testing.assert_array_equal(rgb[1, 0], palette[2])
    np.testing.assert_array_equal(rgb[labels < 0], 0, err_msg="ignored pixels must be black")
    with pytest.raises(ValueError, match="apply_assignment"):
        colorize(np.array([[5]]), palette[:3])


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is not a PNG"
        return np.asarray(image.convert("RGB"))


def test_confusion_figure_writes_png(tmp_path):
    confusion = np.array([[10, 0, 0, 2], [0, 8, 0, 0], [0, 1, 6, 3]])
    scores = cluster_scores(confusion)
    path = confusion_figure(
        scores["matched_confusion"], ["sky", "road", "tree"], tmp_path / "figs" / "confusion.png", size_px=(500, 400)
    )
    assert path.exists() and path.stat().st_size > 1000
    pixels = _png(path)
    assert pixels.shape == (400, 500, 3), f"confusion PNG has size {pixels.shape}"
    assert pixels.std() > 10, "confusion figure looks blank"
    default = confusion_figure(np.eye(27, dtype=int) * 5, [f"c{i}" for i in range(27)], tmp_path / "big.png")
    assert _png(default).shape[0] >= 27 * 20, "default size must grow with the number of classes"
    with pytest.raises(ValueError, match="class names"):
        confusion_figure(confusion, ["sky", "road"], tmp_path / "bad.png")


@pytest.mark.parametrize("with_linear", [True, False])
def test_overlay_grid_writes_expected_size(tmp_path, with_linear):
    rng = np.random.default_rng(0)
    n, h, w, k = 2, 24, 32, 4
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    gt = rng.integers(-1, k, (n, h, w))
    cluster = rng.integers(0, k, (n, h, w))
    linear = torch.from_numpy(rng.integers(0, k, (n, h, w))) if with_linear else None
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)
    path = overlay_grid(images, gt, cluster, linear, palette, tmp_path / "overlay.png", cell_px=120)
    columns = 4 if with_linear else 3
    pixels = _png(path)
    assert pixels.shape == (n * 120, columns * 120, 3), f"grid PNG size {pixels.shape} for {columns} columns"
    # Label panels are drawn with the palette: pure palette colours must appear in the rendering.
    flat = pixels.reshape(-1, 3)
    for colour in palette:
        assert (np.abs(flat.astype(int) - colour).sum(1) == 0).sum() > 50, f"palette colour {colour} missing"
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        overlay_grid(images, gt[:, :-1], cluster, None, palette, tmp_path / "bad.png")


def test_reports_title_the_confusion_matrix_name_classes_and_add_a_colour_legend(tmp_path, monkeypatch):
    """save_reports: per-class IoU in percent under class names, a confusion figure titled with head, split and
    step (cells: counts), overlays with a legend strip below the grid."""
    from dist_seg.eval import evaluate as E
    from dist_seg.eval import plots

    confusion = np.array([[10, 0, 2], [0, 8, 0], [1, 0, 6]])
    rng = np.random.default_rng(0)
    result = {"split": "val", "cluster": cluster_scores(confusion), "linear": None, "label_free": None,
              "cluster_confusion": torch.from_numpy(confusion),
              "examples": {"image": list(rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)),
                           "label": list(rng.integers(0, 3, (2, 16, 16))),
                           "cluster": list(rng.integers(0, 3, (2, 16, 16))), "linear": []}}
    titles = []
    real = plots.confusion_figure
    monkeypatch.setattr(plots, "confusion_figure", lambda *a, **k: titles.append(k.get("title")) or real(*a, **k))
    paths = E.save_reports(result, tmp_path, class_names=["sky", "road", "tree"], name="final", step=120)
    assert titles and all(word in titles[0] for word in ("cluster head", "val split", "step 120")), titles
    rows = paths["per_class_iou"].read_text().splitlines()
    assert rows[0] == "class,cluster_IoU_percent" and rows[1].startswith("sky,")
    assert float(rows[2].split(",")[1]) == pytest.approx(result["cluster"]["per_class_iou"][1]) == 100.0
    grid = _png(paths["overlays"])
    assert grid.shape[0] > 2 * 256, "the class-colour legend is drawn below the grid"
    assert grid.shape[1] == 3 * 256
