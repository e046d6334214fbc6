"""Figures for evaluation reports: confusion matrices and prediction overlays (PNG, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: evaluation runs on servers and in worker processes

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["colorize", "confusion_figure", "default_palette", "overlay_grid"]

_DPI = 100


def _to_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def default_palette(num_classes: int) -> np.ndarray:
    """Distinct colours for ``num_classes`` labels.

    The first 60 come from matplotlib's qualitative ``tab20``, ``tab20b`` and ``tab20c`` maps; beyond
    that, hues are spread evenly around the HSV circle.

    Returns:
        ``[num_classes, 3]`` uint8 RGB array.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    colours = [np.asarray(plt.get_cmap(name).colors)[:, :3] for name in ("tab20", "tab20b", "tab20c")]
    table = np.concatenate(colours, axis=0)
    if num_classes > len(table):
        hues = plt.get_cmap("hsv")(np.linspace(0.0, 1.0, num_classes - len(table), endpoint=False))[:, :3]
        table = np.concatenate([table, hues], axis=0)
    return (table[:num_classes] * 255).round().astype(np.uint8)


def colorize(label_map: Any, colors: Any | None = None) -> np.ndarray:
    """Turn a label map into an RGB image; negative labels (ignore, unmatched) become black.

    Args:
        label_map: ``[H, W]`` (or any shape) integer labels.
        colors: ``[K, 3]`` uint8 colours; :func:`default_palette` of ``max label + 1`` when omitted.

    Returns:
        uint8 array of shape ``label_map.shape + (3,)``.

    Raises:
        ValueError: a label has no colour (``label >= K``).
    """
    labels = _to_numpy(label_map).astype(np.int64)
    if colors is None:
        colors = default_palette(max(int(labels.max(initial=0)) + 1, 1))
    palette = _to_numpy(colors).astype(np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"colors must be [K, 3] RGB, got shape {palette.shape}")
    if labels.size and int(labels.max()) >= len(palette):
        raise ValueError(
            f"label {int(labels.max())} has no colour ({len(palette)} colours given); map clusters to "
            "classes first (dist_seg.eval.metrics.apply_assignment) or pass a longer palette"
        )
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    valid = labels >= 0
    out[valid] = palette[labels[valid]]
    return out


def confusion_figure(
    confusion: Any,
    class_names: Sequence[str],
    path: str | Path,
    *,
    pred_names: Sequence[str] | None = None,
    normalize: bool = True,
    title: str | None = None,
    size_px: tuple[int, int] | None = None,
    counts: bool = True,
) -> Path:
    """Save a heat map of a confusion matrix ``[true class, prediction]``.

    The colour is each row's share in percent (recall per class) when ``normalize``; with ``counts`` every
    cell also prints its pixel count (``12k``, ``3.4M``), so rare classes are not read from colour alone.

    Args:
        confusion: ``[K, K']`` counts (e.g. ``cluster_scores(...)["matched_confusion"]``).
        class_names: ``K`` names for the rows.
        path: output PNG path (parent folders are created).
        pred_names: ``K'`` column names; defaults to ``class_names``, plus ``"no class"`` for one extra
            column, or cluster indices otherwise.
        normalize: divide each row by its total (recall per class); empty rows stay 0.
        title: figure title (say which head, split and step: :func:`dist_seg.eval.evaluate.save_reports` does).
        size_px: ``(width, height)`` of the PNG in pixels; by default it grows with the number of classes.
        counts: write each cell's count in it.

    Returns:
        The written path.
    """
    matrix = _to_numpy(confusion).astype(np.float64)
    rows, cols = matrix.shape
    if len(class_names) != rows:
        raise ValueError(f"{len(class_names)} class names for a confusion matrix with {rows} rows")
    if pred_names is None:
        if cols == rows:
            pred_names = list(class_names)
        elif cols == rows + 1:
            pred_names = list(class_names) + ["no class"]
        else:
            pred_names = [str(j) for j in range(cols)]
    if len(pred_names) != cols:
        raise ValueError(f"{len(pred_names)} prediction names for a confusion matrix with {cols} columns")
    raw = matrix.copy()
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = 100.0 * np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)

    if size_px is None:
        side = max(400, 32 * max(rows, cols) + 250)
        size_px = (side + 150, side)
    fig, ax = plt.subplots(figsize=(size_px[0] / _DPI, size_px[1] / _DPI), dpi=_DPI)
    try:
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=100.0 if normalize else None, aspect="equal")
        ax.set_xticks(range(cols), labels=pred_names, rotation=90, fontsize=7)
        ax.set_yticks(range(rows), labels=list(class_names), fontsize=7)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth")
        if counts:
            # Small enough to fit a 32-px cell of a 27-class matrix; dark text on the bright end of viridis.
            size = 7 if max(rows, cols) <= 12 else 4
            top = matrix.max() if matrix.size else 0.0
            for i in range(rows):
                for j in range(cols):
                    if raw[i, j]:
                        ax.text(j, i, _count(raw[i, j]), ha="center", va="center", fontsize=size,
                                color="black" if matrix[i, j] > 0.6 * top else "white")
        if title:
            ax.set_title(title, fontsize=9)
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label("% of the true class's pixels (row)" if normalize else "pixels")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def _count(value: float) -> str:
    """A pixel count in at most four characters: ``87``, ``12k``, ``3.4M``."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            scaled = value / limit
            return f"{scaled:.1f}{suffix}" if scaled < 10 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def overlay_grid(
    images: Any,
    gt: Any,
    cluster_pred: Any,
    linear_pred: Any | None,
    colors: Any | None,
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    cell_px: int = 256,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Save a grid with one row per image: image | ground truth | cluster prediction | linear prediction.

    Labels of ``-1`` (ignored pixels, unmatched clusters) are drawn black. Cluster predictions should be
    mapped to classes first (:func:`dist_seg.eval.metrics.apply_assignment`) so colours match the
    ground truth.

    Args:
        images: ``[N, H, W, 3]`` uint8 RGB.
        gt: ``[N, H, W]`` integer labels.
        cluster_pred: ``[N, H, W]`` class ids from the cluster probe.
        linear_pred: ``[N, H, W]`` class ids from the linear probe, or ``None`` to omit that column.
        colors: ``[K, 3]`` uint8 palette; :func:`default_palette` when ``None``.
        path: output PNG path (parent folders are created).
        titles: column titles; default ``("image", "ground truth", "cluster", "linear")``.
        cell_px: side of each square cell in pixels; the PNG is ``columns * cell_px`` wide and
            ``N * cell_px`` high (plus a legend strip with ``class_names``).
        class_names: names of the classes: adds a legend of the class colours below the grid (black: ignored
            pixels and clusters matched to no class).
        title: a title above the legend (e.g. the split and step).

    Returns:
        The written path.
    """
    images_np = _to_numpy(images)
    if images_np.dtype != np.uint8 or images_np.ndim != 4 or images_np.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images_np.dtype} {images_np.shape}")
    panels = [_to_numpy(gt), _to_numpy(cluster_pred)]
    if linear_pred is not None:
        panels.append(_to_numpy(linear_pred))
    for panel in panels:
        if panel.shape != images_np.shape[:3]:
            raise ValueError(f"label maps must be [N, H, W] = {images_np.shape[:3]}, got {panel.shape}")
    if colors is None:
        top = max(int(p.max(initial=0)) for p in panels)
        colors = default_palette(top + 1)
    num_cols = 1 + len(panels)
    if titles is None:
        titles = ("image", "ground truth", "cluster", "linear")[:num_cols]
    if len(titles) != num_cols:
        raise ValueError(f"{len(titles)} titles for {num_cols} columns")

    num_rows = images_np.shape[0]
    legend_px = 0
    if class_names is not None:
        per_line = max(1, (num_cols * cell_px) // 110)
        legend_px = 24 * (-(-(len(class_names) + 1) // per_line)) + (22 if title else 8)
    height = num_rows * cell_px + legend_px
    fig, axes = plt.subplots(
        num_rows,
        num_cols,
        figsize=(num_cols * cell_px / _DPI, height / _DPI),
        dpi=_DPI,
        squeeze=False,
    )
    try:
        # Fixed margins (no tight bbox) keep the PNG exactly columns*cell_px by rows*cell_px (+ the legend).
        bottom = (legend_px + 0.01 * num_rows * cell_px) / height
        fig.subplots_adjust(left=0.01, right=0.99, bottom=bottom, top=1.0 - 0.12 * cell_px / height, wspace=0.04,
                            hspace=0.12)
        if class_names is not None:
            from matplotlib.patches import Patch

            palette = _to_numpy(colors).astype(np.float64) / 255.0
            handles = [Patch(facecolor=palette[i], edgecolor="grey", label=str(name))
                       for i, name in enumerate(class_names) if i < len(palette)]
            handles.append(Patch(facecolor="black", edgecolor="grey", label="ignored / no class"))
            fig.legend(handles=handles, loc="lower center", ncol=max(1, (num_cols * cell_px) // 110), fontsize=7,
                       frameon=False, title=title, title_fontsize=8, bbox_to_anchor=(0.5, 0.0))
        for row in range(num_rows):
            cells = [images_np[row]] + [colorize(panel[row], colors) for panel in panels]
            for col, cell in enumerate(cells):
                ax = axes[row, col]
                ax.imshow(cell, interpolation="nearest")
                ax.set_axis_off()
                if row == 0:
                    ax.set_title(titles[col], fontsize=9)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
