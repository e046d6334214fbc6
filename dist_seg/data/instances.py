"""Instance annotations beside a prepared dataset: COCO-style ground truth with RLE masks.

Datasets whose objects matter as instances (``toy_objects``, ``coco20k``; SPEC §8.7) keep them in
``<root>/instances_<split>.json`` next to the shards, in the format ``pycocotools.coco.COCO`` reads::

    {"info": {...}, "images": [{"id", "width", "height", "file_name"}],
     "annotations": [{"id", "image_id", "category_id", "segmentation" (RLE, counts as str),
                      "bbox" [x, y, w, h], "area", "iscrowd"}],
     "categories": [{"id", "name"}]}

``image_id`` is the record's global index in the split (its shard ``__key__``), so class-agnostic
mask AP (COCO20k's metric) is scored with ``COCOeval`` against predictions keyed the same way, and the
MaskDistill stage files (:mod:`dist_seg.maskdistill`) use the same ids.

The mask helpers here (RLE encode/decode through pycocotools) are shared by the converters and by
the pseudo-label stage. :func:`write_object_png_instances` turns VOC-style object PNGs (instance ids,
255 = boundary/ignore) and their class PNGs into such a file (``dist-seg prepare voc12``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dist_seg.data.manifest import DataError, PathLike

__all__ = ["decode_rle", "encode_rle", "instance_annotation", "instances_path", "object_png_instances",
           "read_instances", "write_instances", "write_object_png_instances"]

log = logging.getLogger(__name__)


def instances_path(root: PathLike, split: str) -> Path:
    """``<root>/instances_<split>.json``."""
    return Path(root) / f"instances_{split}.json"


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary ``H×W`` mask -> compressed RLE ``{"size": [H, W], "counts": str}`` (JSON-able)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(segmentation: dict[str, Any], height: int, width: int) -> np.ndarray:
    """An RLE (compressed with str/bytes counts, or uncompressed with a list) -> bool ``H×W`` mask.

    Raises:
        DataError: the RLE is malformed or its size is not ``[height, width]``.
    """
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise DataError(f"expected an RLE segmentation {{'size', 'counts'}}, got {type(segmentation).__name__}")
    size = [int(v) for v in segmentation["size"]]
    if size != [int(height), int(width)]:
        raise DataError(f"RLE of size {size} for an image of {height}×{width}")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": size, "counts": counts}, *size)
    else:
        rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    # A list of one RLE: pycocotools' single-dict path warns under NumPy 2.
    return mask_utils.decode([rle])[:, :, 0].astype(bool)


def instance_annotation(mask: np.ndarray, *, ann_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    """One COCO annotation for a binary mask: RLE, tight ``[x, y, w, h]`` box, area, ``iscrowd=0``."""
    rle = encode_rle(mask)
    coded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return {"id": int(ann_id), "image_id": int(image_id), "category_id": int(category_id), "segmentation": rle,
            "bbox": [float(v) for v in mask_utils.toBbox(coded)], "area": float(mask_utils.area(coded)),
            "iscrowd": 0}


def write_instances(root: PathLike, split: str, doc: dict[str, Any]) -> Path:
    """Write ``instances_<split>.json`` atomically (temporary file + rename)."""
    path = instances_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return path


def read_instances(root: PathLike, split: str) -> dict[str, Any] | None:
    """The instance ground truth of ``split``, or None when the dataset has none."""
    path = instances_path(root, split)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not readable JSON ({err}); re-run `dist-seg prepare`") from None


def object_png_instances(objects: np.ndarray, classes: np.ndarray) -> tuple[list[tuple[np.ndarray, int]], int]:
    """The instances of a VOC-style object map: ``(mask, class id)`` per instance id, and how many had no class.

    Args:
        objects: ``H×W`` instance ids (``SegmentationObject``: 0 = background, 1..n = objects, 255 = boundary
            or ignored region).
        classes: ``H×W`` class ids at the same pixels (``SegmentationClass``: 0 = background, 255 = void).

    Returns:
        ``([(bool mask, class), ...] in instance-id order, skipped)``: an instance's class is the most frequent
        class id (1..254) under it (VOC's two maps agree pixel for pixel, so it is the only one); an instance
        with no such pixel is skipped and counted.
    """
    out, skipped = [], 0
    for inst in np.unique(objects):
        if inst in (0, 255):
            continue
        mask = objects == inst
        under = classes[mask]
        under = under[(under > 0) & (under < 255)]
        if under.size == 0:
            skipped += 1
            continue
        out.append((mask, int(np.bincount(under).argmax())))
    return out, skipped


def _read_ids_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("L", "P"):
            raise DataError(f"{path} is a {img.mode} image; expected 8-bit ids (palette or grey PNG)")
        return np.array(img)


def write_object_png_instances(root: PathLike, split: str, images: Sequence[tuple[int, str, Path, Path]], *,
                               category_names: Sequence[str], info: dict[str, Any]) -> Path:
    """Write ``instances_<split>.json`` from object/class PNG pairs (e.g. VOC's object segmentation set).

    Args:
        root: the prepared dataset folder.
        split: its split.
        images: ``(record index, file name, object PNG, class PNG)`` per image with instance annotations; the
            record index is the image's ``image_id``.
        category_names: names of classes 1..C (``categories`` ids 1..C).
        info: recorded in ``info`` (with the counts of images and instances written and skipped).

    Returns:
        The file written. An image whose two PNGs differ in size is skipped (counted in ``info`` and logged).
    """
    doc: dict[str, Any] = {"info": dict(info), "images": [], "annotations": [],
                           "categories": [{"id": k, "name": n} for k, n in enumerate(category_names, start=1)]}
    bad_images, no_class = [], 0
    for index, file_name, object_png, class_png in images:
        objects, classes = _read_ids_png(object_png), _read_ids_png(class_png)
        if objects.shape != classes.shape:
            bad_images.append(file_name)
            continue
        height, width = objects.shape
        doc["images"].append({"id": int(index), "width": int(width), "height": int(height), "file_name": file_name})
        found, skipped = object_png_instances(objects, classes)
        no_class += skipped
        for mask, category in found:
            doc["annotations"].append(instance_annotation(mask, ann_id=len(doc["annotations"]) + 1, image_id=index,
                                                          category_id=category))
    if bad_images:
        log.warning("%s/%s: %d images whose object and class PNGs differ in size were left out, e.g. %s", root,
                    split, len(bad_images), bad_images[0])
    doc["info"].update(num_images=len(doc["images"]), num_instances=len(doc["annotations"]),
                       skipped_images=bad_images, skipped_instances_without_class=no_class)
    return write_instances(root, split, doc)
