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
the pseudo-label stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dist_seg.data.manifest import DataError, PathLike

__all__ = ["decode_rle", "encode_rle", "instance_annotation", "instances_path", "read_instances",
           "write_instances"]


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
