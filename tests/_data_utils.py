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


# ------------------------------------------------------------------------------------- damaged shards
def truncate_shard(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut a shard as an interrupted copy leaves it: only the first ``keep_fraction`` of its bytes."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])


def garbage_member(path: Path, position: int = 1, suffixes: tuple[str, ...] = (".jpg", ".png", ".feat.npy")) -> str:
    """Replace the image (or features) of the ``position``-th record of a shard by random bytes; return its key.

    The tar stays well formed (a valid header, same member name), so only that one record is damaged.
    """
    import io
    import tarfile

    path = Path(path)
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]
    keys = sorted({m.name.split(".", 1)[0] for m, _ in members})
    key = keys[position]
    buf = io.BytesIO()
    rng = np.random.default_rng(position)
    with tarfile.open(fileobj=buf, mode="w") as out:
        for member, data in members:
            base, ext = member.name.split(".", 1)
            if base == key and ("." + ext) in suffixes and not member.name.endswith(".label.png"):
                data = rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes()
            member.size = len(data) if data is not None else 0
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    path.write_bytes(buf.getvalue())
    return key
