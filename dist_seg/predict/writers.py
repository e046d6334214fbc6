"""What ``dist-seg predict`` writes, atomically: label PNGs, optional colour overlays and class-area CSVs.

Every file is written to a temporary name beside its target and renamed into place, and the label map is
renamed last, so an existing label PNG means the image is complete: a re-run after an interruption skips
it and redoes an image whose outputs are partial (a temporary file or an overlay without its label map).

Layout under ``OUT``: ``labels/<key>.png`` (uint8, or uint16 when ids exceed 255), ``overlays/<key>.png``
(the image blended half-and-half with the label colours), ``areas/<key>.csv`` (``label,pixels,fraction``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

# Rows blended at once for an overlay: bounds its float buffer for huge images.
OVERLAY_ROWS = 512


class Writer:
    """Writes one image's outputs under ``out``.

    Args:
        out: the output folder.
        overlays: also write colour overlays.
        areas: also write per-image class-area CSVs.
        palette: ``[N, 3]`` uint8 colours indexed by written id (overlays).
    """

    def __init__(self, out: str | Path, *, overlays: bool = False, areas: bool = False,
                 palette: Optional[np.ndarray] = None) -> None:
        self.out = Path(out)
        self.overlays = overlays
        self.areas = areas
        self.palette = palette

    def label_path(self, key: str) -> Path:
        return self.out / "labels" / f"{key}.png"

    def paths(self, key: str) -> list[Path]:
        paths = [self.label_path(key)]
        if self.overlays:
            paths.append(self.out / "overlays" / f"{key}.png")
        if self.areas:
            paths.append(self.out / "areas" / f"{key}.csv")
        return paths

    def complete(self, key: str) -> bool:
        """Whether every output of ``key`` exists (each was renamed into place whole)."""
        return all(p.is_file() for p in self.paths(key))

    @staticmethod
    def _atomic(path: Path, write) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, key: str, labels: np.ndarray, image: Optional[np.ndarray] = None) -> None:
        """Write ``labels`` (uint8/uint16 ``[H, W]``) and, when asked, the overlay of ``image`` and the areas."""
        if self.overlays:
            overlay = self.overlay(image, labels)
            self._atomic(self.out / "overlays" / f"{key}.png", lambda p: Image.fromarray(overlay).save(p, format="PNG"))
        if self.areas:
            ids, counts = np.unique(labels, return_counts=True)
            text = "label,pixels,fraction\n" + "".join(
                f"{i},{c},{c / labels.size:.6f}\n" for i, c in zip(ids.tolist(), counts.tolist()))
            self._atomic(self.out / "areas" / f"{key}.csv", lambda p: p.write_text(text))
        self._atomic(self.label_path(key), lambda p: Image.fromarray(labels).save(p, format="PNG"))

    def overlay(self, image: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The image blended half-and-half with its label colours, a band of rows at a time."""
        palette = self.palette
        if palette is None or len(palette) <= int(labels.max(initial=0)):
            from dist_seg.eval.plots import default_palette

            extra = default_palette(int(labels.max(initial=0)) + 1)
            palette = extra if palette is None else np.concatenate([palette, extra[len(palette):]])
        out = np.empty_like(image)
        for start in range(0, image.shape[0], OVERLAY_ROWS):
            rows = slice(start, start + OVERLAY_ROWS)
            out[rows] = (0.5 * image[rows] + 0.5 * palette[labels[rows]]).astype(np.uint8)
        return out

    def clean_partials(self) -> int:
        """Remove temporary files a killed run left behind; return how many."""
        count = 0
        for sub in ("labels", "overlays", "areas"):
            folder = self.out / sub
            if folder.is_dir():
                for tmp in folder.rglob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
                    count += 1
        return count


def read_labels(path: str | Path) -> np.ndarray:
    """A written label map as uint8/uint16 ``[H, W]``."""
    with Image.open(path) as im:
        arr = np.array(im)
    return arr.astype(np.uint16) if arr.dtype not in (np.uint8, np.uint16) else arr
