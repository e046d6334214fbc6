"""Procedural toy scenes with exact label maps, deterministic from a seed.

Each class ``k`` has its own appearance model:

* a mean colour drawn from a narrow band around mid-grey, so class colours overlap (colour alone does
  not solve the task);
* a texture: oriented stripes or a rotated checkerboard with a class-specific frequency, orientation
  and amplitude;
* a class-specific pixel noise level.

Regions are irregular: each image draws one smooth random field per class (Gaussian-filtered noise),
warps the fields with a smooth random displacement and labels every pixel with the arg-max class, so
boundaries are curved and region sizes vary. Every image contains at least two classes, and image
``i`` always contains class ``i mod K`` so every class occurs in every split of at least K images.

Randomness comes from ``numpy.random.default_rng`` seeded with ``[seed, split, i]`` per image, so the
same seed gives the same pixels (and, shards being written with a fixed mtime, the same shard bytes)
on any machine.
"""

from __future__ import annotations

import argparse
import colorsys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage

from dist_seg.data.generated import add_generator_arguments, generator_kwargs, write_generated
from dist_seg.data.manifest import (
    DatasetManifest,
    PathLike,
    update_split,
)
from dist_seg.data.shards import Sample, write_split

_SPLIT_CODES = {"train": 1, "val": 2}


def palette(num_classes: int) -> list[list[int]]:
    """Distinct display colours (evenly spaced hues), one RGB triple per class."""
    out = []
    for k in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb((k / max(1, num_classes)) % 1.0, 0.75, 0.95 - 0.25 * (k % 2))
        out.append([int(round(255 * r)), int(round(255 * g)), int(round(255 * b))])
    return out


def class_appearance(num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """Per-class appearance parameters (shared by all images of a seed)."""
    rng = np.random.default_rng([seed, 0])
    directions = rng.normal(size=(num_classes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return {
        "mean": 128.0 + directions * rng.uniform(22.0, 40.0, size=(num_classes, 1)),
        "noise": rng.uniform(6.0, 22.0, size=num_classes),
        "freq": rng.uniform(0.06, 0.32, size=num_classes),  # cycles per pixel
        "angle": rng.uniform(0.0, np.pi, size=num_classes),
        "amplitude": rng.uniform(12.0, 38.0, size=num_classes),
        "checker": rng.random(num_classes) < 0.4,
    }


def _region_map(rng: np.random.Generator, size: int, present: np.ndarray, num_classes: int) -> np.ndarray:
    # Fields live on a coarse periodic grid (cheap to smooth) and are sampled with cubic splines at warped
    # full-resolution coordinates.
    coarse = max(8, size // 4)
    sigma = coarse / rng.uniform(7.0, 12.0)
    fields = ndimage.gaussian_filter(rng.normal(size=(num_classes, coarse, coarse)), sigma=(0, sigma, sigma),
                                     mode="wrap")
    fields /= fields.reshape(num_classes, -1).std(axis=1).reshape(-1, 1, 1) + 1e-8
    # One smooth displacement warps all fields: boundaries become irregular, not blob-like.
    disp = ndimage.gaussian_filter(rng.normal(size=(2, coarse, coarse)), sigma=(0, coarse / 6, coarse / 6),
                                   mode="wrap")
    disp *= (coarse / 8) / (np.abs(disp).max() + 1e-8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) * (coarse / size)
    grid = np.stack([yy, xx])
    coords = grid + np.stack([ndimage.map_coordinates(d, grid, order=1, mode="grid-wrap") for d in disp])
    warped = np.stack([ndimage.map_coordinates(f, coords, order=3, mode="grid-wrap") for f in fields])
    warped += rng.normal(scale=0.4, size=(num_classes, 1, 1))
    warped[~present] = -np.inf
    return warped.argmax(axis=0).astype(np.uint8)


def _texture(rng: np.random.Generator, size: int, app: dict[str, np.ndarray], k: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = app["angle"][k] + rng.normal(scale=0.15)
    freq = app["freq"][k] * rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2 * np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    if app["checker"][k]:
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        pattern = np.sign(np.sin(2 * np.pi * freq * u + phase) * np.sin(2 * np.pi * freq * v + phase))
    else:
        pattern = np.sin(2 * np.pi * freq * u + phase)
    return app["amplitude"][k] * pattern


def toy_sample(index: int, *, split: str, num_classes: int, size: int, seed: int) -> Sample:
    """Image ``index`` of ``split``: a :class:`Sample` with a ``size×size`` RGB image and its label map."""
    if num_classes < 2:
        raise ValueError(f"the toy dataset needs num_classes >= 2, got {num_classes}")
    app = class_appearance(num_classes, seed)
    rng = np.random.default_rng([seed, _SPLIT_CODES.get(split, 3), index])
    count = int(rng.integers(2, min(num_classes, 4) + 1))
    present = np.zeros(num_classes, dtype=bool)
    present[index % num_classes] = True
    others = [c for c in rng.permutation(num_classes) if c != index % num_classes][: count - 1]
    present[others] = True
    label = _region_map(rng, size, present, num_classes)

    image = np.empty((size, size, 3), dtype=np.float64)
    illumination = rng.normal(scale=10.0, size=3)
    for k in np.flatnonzero(present):
        mask = label == k
        colour = app["mean"][k] + illumination + rng.normal(scale=8.0, size=3)
        texture = _texture(rng, size, app, k)[..., None]
        noise = rng.normal(scale=app["noise"][k], size=(size, size, 3))
        image[mask] = (colour + texture + noise)[mask]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Sample(image=image, label=label, source=f"toy/{split}/{index:06d}")


def _samples(split: str, count: int, **kw) -> Iterator[Sample]:
    for i in range(count):
        yield toy_sample(i, split=split, **kw)


def generate_toy(
    out_root: PathLike,
    *,
    num_classes: int = 5,
    num_train: int = 256,
    num_val: int = 64,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 16,
    overwrite: bool = False,
) -> DatasetManifest:
    """Write the toy dataset (``train`` and ``val`` splits, PNG images) and its manifest.

    Args:
        out_root: dataset folder to create.
        num_classes: number of classes K (>= 2).
        num_train: training images.
        num_val: validation images.
        size: image side in pixels.
        seed: everything is a function of this seed.
        samples_per_shard: records per shard (the default gives train 16 shards: enough for
            2 ranks × 2 workers × several shards).
        overwrite: regenerate even if the folder already holds the same toy dataset. A folder holding a
            toy dataset with other parameters is always regenerated.

    Returns:
        The written :class:`DatasetManifest`.
    """
    params = dict(num_classes=num_classes, num_train=num_train, num_val=num_val, size=size, seed=seed,
                  samples_per_shard=samples_per_shard)
    root = Path(out_root)
    fields = dict(
        name="toy",
        num_classes=num_classes,
        class_names=[f"toy{k}" for k in range(num_classes)],
        colors=palette(num_classes),
        extra={"params": params, "generator": "dist_seg.data.toy"},
    )

    def write(split: str, count: int, rewrite: bool) -> DatasetManifest:
        info = write_split(
            _samples(split, count, num_classes=num_classes, size=size, seed=seed),
            root, split, samples_per_shard=samples_per_shard, image_format="png", overwrite=rewrite,
        )
        return update_split(root, split, info, **fields)

    return write_generated(root, "toy", params, num_train=num_train, num_val=num_val, overwrite=overwrite,
                           write_split=write)


# ------------------------------------------------------------------------------------------ CLI hook
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-seg prepare toy``."""
    add_generator_arguments(parser, num_classes=5, size=64)


def convert(args: argparse.Namespace) -> int:
    """Run ``dist-seg prepare toy``."""
    generate_toy(args.out, **generator_kwargs(args))
    return 0
