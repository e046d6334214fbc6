"""Tiny shard datasets for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_seg.data.manifest import update_split
from dist_seg.data.shards import Sample, write_split


def random_samples(num: int, *, seed: int = 0, num_classes: int = 4, labelled: bool = True,
                   sizes: tuple[tuple[int, int], ...] = ((20, 28), (24, 24), (28, 20))) -> list[Sample]:
    """Random images of a few shapes (H, W) with random labels (some pixels 255 = ignore)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        h, w = sizes[i % len(sizes)]
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        label = None
        if labelled:
            label = rng.integers(0, num_classes, size=(h, w)).astype(np.uint8)
            label[rng.random((h, w)) < 0.1] = 255
        out.append(Sample(image=image, label=label, source=f"sample-{i}"))
    return out


def make_dataset(root: Path, *, num: int = 37, per_shard: int = 5, split: str = "train", seed: int = 0,
                 labelled: bool = True, image_format: str = "png") -> list[Sample]:
    """Write ``num`` random samples as ``split`` of a dataset folder with a manifest; return the samples."""
    samples = random_samples(num, seed=seed, labelled=labelled)
    info = write_split(samples, root, split, samples_per_shard=per_shard, image_format=image_format)
    update_split(root, split, info, name="unit", num_classes=4 if labelled else None,
                 class_names=None, colors=None)
    return samples


def collect(loader, limit: int | None = None) -> list[dict]:
    """Batches of a loader as a list (at most ``limit``)."""
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) >= limit:
            break
    return out
