"""Toy object scenes for MaskDistill (SPEC §8.7): objects of K classes on "stuff" backgrounds, exact masks.

Each image has

* a background of 1 or 2 "stuff" textures (out of :data:`NUM_STUFF`), split along a smooth random
  curve when there are two; the whole background is label 0, whatever its texture (stuff is not an
  object class, as in PASCAL VOC);
* 1 to 3 objects: smooth blobs (a disc whose radius is modulated by smooth noise, kept as the one
  connected piece holding its centre), each of one of the K object classes; objects never overlap
  or touch (a 1-pixel gap), so every instance mask is exact and whole.

Appearance (:func:`dist_seg.data.toy.class_appearance`): every object class and every stuff texture
has its own mean colour, oriented-stripe or checker texture and noise level, fixed by the seed.

Labels: 0 = background, ``1..K`` = object class, so the manifest says ``num_classes = K + 1`` with
class 0 named ``background`` (the VOC convention: ids are ``category_id`` s, cluster + 1 in MaskDistill).
The instances are written beside the shards as COCO ground truth (``instances_<split>.json``, see
:mod:`dist_seg.data.instances`; ``image_id`` = the record's global index, ``category_id`` = its label id),
enough to score class-agnostic mask AP and to check mined masks against the true objects.

Image ``i`` of a split always holds an object of class ``i mod K``, so every class occurs in every split
of at least K images. Randomness comes from ``numpy.random.default_rng([seed, split, i])``: the same
seed gives the same pixels and the same shard bytes on any machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from dist_seg.data.classes import _bit_interleaved_palette
from dist_seg.data.generated import add_generator_arguments, generator_kwargs, write_generated
from dist_seg.data.instances import instance_annotation, instances_path, read_instances, write_instances
from dist_seg.data.manifest import DataError, DatasetManifest, PathLike, update_split
from dist_seg.data.shards import Sample, write_split
from dist_seg.data.toy import _texture, class_appearance

NAME = "toy_objects"
NUM_STUFF = 4
"""Stuff textures available to the backgrounds (each image uses 1 or 2)."""
MAX_OBJECTS = 3
_SPLIT_CODES = {"train": 1, "val": 2}
_PLACEMENT_TRIES = 30


def class_names(num_classes: int) -> list[str]:
    """``["background", "object1", ..., "objectK"]``: the name of each label id."""
    return ["background"] + [f"object{k}" for k in range(1, num_classes + 1)]


def _smooth_field(rng: np.random.Generator, size: int, coarse: int, sigma: float) -> np.ndarray:
    """Unit-variance smooth noise at ``size×size`` (smoothed on a coarse grid, bilinearly upsampled)."""
    field = ndimage.gaussian_filter(rng.normal(size=(coarse, coarse)), sigma=sigma, mode="wrap")
    field = ndimage.zoom(field, size / coarse, order=1, mode="grid-wrap", grid_mode=True)[:size, :size]
    return field / (field.std() + 1e-8)


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth blob inside the image: a noisy disc, reduced to the connected piece holding its centre."""
    radius = rng.uniform(0.12, 0.24) * size
    cy, cx = rng.uniform(radius, size - radius, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dist = np.hypot(yy - cy, xx - cx) / radius
    mask = dist + 0.3 * _smooth_field(rng, size, 8, 1.2) < 1.0
    components, _ = ndimage.label(mask)
    centre = components[int(cy), int(cx)]
    if centre == 0:  # the noise cut the centre out: keep the largest piece
        counts = np.bincount(components.ravel())
        counts[0] = 0
        centre = int(counts.argmax())
    return components == centre


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, app: dict[str, np.ndarray], k: int,
           illumination: np.ndarray) -> None:
    size = image.shape[0]
    colour = app["mean"][k] + illumination + rng.normal(scale=8.0, size=3)
    texture = _texture(rng, size, app, k)[..., None]
    noise = rng.normal(scale=app["noise"][k], size=(size, size, 3))
    image[mask] = (colour + texture + noise)[mask]


def toy_object_scene(index: int, *, split: str, num_classes: int, size: int,
                     seed: int) -> tuple[Sample, list[tuple[np.ndarray, int]]]:
    """Image ``index`` of ``split``.

    Args:
        index: image index within the split.
        split: split name (``train``/``val``; others get their own stream too).
        num_classes: K object classes (>= 1).
        size: image side in pixels (>= 32).
        seed: everything is a function of this seed.

    Returns:
        ``(sample, instances)``: the :class:`Sample` (label 0 = background, 1..K = object class) and one
        ``(bool mask, category_id)`` per object, in painting order.
    """
    if num_classes < 1:
        raise ValueError(f"toy_objects needs num_classes >= 1 object classes, got {num_classes}")
    if size < 32:
        raise ValueError(f"toy_objects needs size >= 32 pixels, got {size}")
    app = class_appearance(num_classes + NUM_STUFF, seed)
    rng = np.random.default_rng([seed, _SPLIT_CODES.get(split, 3), index])
    illumination = rng.normal(scale=10.0, size=3)
    image = np.empty((size, size, 3), dtype=np.float64)

    stuff = num_classes + rng.permutation(NUM_STUFF)[: int(rng.integers(1, 3))]
    if len(stuff) == 1:
        _paint(rng, image, np.ones((size, size), dtype=bool), app, int(stuff[0]), illumination)
    else:
        # Two stuff regions split along a smooth curve, each covering between 30 % and 70 % of the image.
        field = _smooth_field(rng, size, 6, 1.0)
        first = field < np.quantile(field, rng.uniform(0.3, 0.7))
        _paint(rng, image, first, app, int(stuff[0]), illumination)
        _paint(rng, image, ~first, app, int(stuff[1]), illumination)

    count = int(rng.integers(1, MAX_OBJECTS + 1))
    classes = [index % num_classes] + [int(c) for c in rng.integers(0, num_classes, size=count - 1)]
    label = np.zeros((size, size), dtype=np.uint8)
    occupied = np.zeros((size, size), dtype=bool)
    instances: list[tuple[np.ndarray, int]] = []
    for k in classes:
        for _ in range(_PLACEMENT_TRIES):
            mask = _blob(rng, size)
            if not (ndimage.binary_dilation(mask) & occupied).any():
                break
        else:
            continue  # no free room left: the image gets fewer objects (never an overlap)
        _paint(rng, image, mask, app, k, illumination)
        occupied |= mask
        label[mask] = k + 1
        instances.append((mask, k + 1))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Sample(image=image, label=label, source=f"{NAME}/{split}/{index:06d}"), instances


def _coco_doc(split: str, params: dict[str, Any], num_classes: int) -> dict[str, Any]:
    return {"info": {"dataset": NAME, "split": split, "params": params,
                     "note": "image_id = global record index; category_id = label id (1..K)"},
            "images": [], "annotations": [],
            "categories": [{"id": k, "name": n} for k, n in enumerate(class_names(num_classes)) if k > 0]}


def _scenes(split: str, count: int, doc: dict[str, Any], *, num_classes: int, size: int,
            seed: int) -> Iterator[Sample]:
    for i in range(count):
        sample, instances = toy_object_scene(i, split=split, num_classes=num_classes, size=size, seed=seed)
        doc["images"].append({"id": i, "width": size, "height": size, "file_name": sample.source})
        for mask, category in instances:
            doc["annotations"].append(instance_annotation(mask, ann_id=len(doc["annotations"]) + 1, image_id=i,
                                                          category_id=category))
        yield sample


def generate_toy_objects(
    out_root: PathLike,
    *,
    num_classes: int = 3,
    num_train: int = 256,
    num_val: int = 64,
    size: int = 96,
    seed: int = 0,
    samples_per_shard: int = 16,
    overwrite: bool = False,
) -> DatasetManifest:
    """Write the toy objects dataset (``train``, ``val``; PNG images), its instances and its manifest.

    Args:
        out_root: dataset folder to create.
        num_classes: K object classes (the manifest holds K + 1 classes, 0 = background).
        num_train: training images.
        num_val: validation images.
        size: image side in pixels (>= 32).
        seed: everything is a function of this seed.
        samples_per_shard: records per shard.
        overwrite: regenerate even if the folder already holds the same dataset. A folder holding a
            toy_objects dataset with other parameters is always regenerated.

    Returns:
        The written :class:`DatasetManifest`.
    """
    params = dict(num_classes=num_classes, num_train=num_train, num_val=num_val, size=size, seed=seed,
                  samples_per_shard=samples_per_shard)
    root = Path(out_root)
    kw = dict(num_classes=num_classes, size=size, seed=seed)

    def write(split: str, count: int, overwrite: bool) -> DatasetManifest:
        doc = _coco_doc(split, params, num_classes)
        info = write_split(_scenes(split, count, doc, **kw), root, split, samples_per_shard=samples_per_shard,
                           image_format="png", overwrite=overwrite)
        if len(doc["images"]) != count:
            # The split was already complete (nothing generated): rebuild its instances only if needed.
            old = None if overwrite else read_instances(root, split)
            if old is None or (old.get("info") or {}).get("params") != params:
                doc = _coco_doc(split, params, num_classes)
                for _ in _scenes(split, count, doc, **kw):
                    pass
                write_instances(root, split, doc)
        else:
            write_instances(root, split, doc)
        return update_split(
            root, split, info, name=NAME, num_classes=num_classes + 1, class_names=class_names(num_classes),
            colors=[list(c) for c in _bit_interleaved_palette(num_classes + 1)],
            extra={"params": params, "generator": "dist_seg.data.toy_objects", "background_id": 0,
                   "num_object_classes": num_classes,
                   "instances": {split: instances_path(root, split).name}},
        )

    return write_generated(root, NAME, params, num_train=num_train, num_val=num_val, overwrite=overwrite,
                           write_split=write)


# ------------------------------------------------------------------------------------------ CLI hook
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-seg prepare toy_objects``."""
    add_generator_arguments(parser, num_classes=3, size=96, size_help=", at least 32",
                            classes_help="object classes K (the dataset has K+1 classes, 0 = background)")


def convert(args: argparse.Namespace) -> int:
    """Run ``dist-seg prepare toy_objects``."""
    if args.num_classes < 1 or args.size < 32:
        raise DataError("toy_objects needs --num-classes >= 1 and --size >= 32")
    generate_toy_objects(args.out, **generator_kwargs(args))
    return 0
