"""A tiny detection dataset for the detect-stage tests: shards of a few images with 1–2 known objects and the
named masks JSON that ``dist-seg masks`` + ``dist-seg name`` would write for them (written here by hand)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from dist_seg.data.manifest import update_split
from dist_seg.data.shards import Sample, write_split
from dist_seg.maskdistill.files import write_json_atomic

SIZES = ((56, 72), (64, 64), (72, 56), (60, 76))
COLORS = ((220, 40, 40), (40, 200, 60))  # cluster 0, cluster 1


def _objects(i: int, h: int, w: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    out = []
    for k in range(1 + i % 2):
        mask = np.zeros((h, w), dtype=bool)
        y0, x0 = int(rng.integers(2, h // 2)), int(rng.integers(2 + k * w // 2, w // 2 + k * w // 2 - 4))
        mask[y0:y0 + int(rng.integers(10, h // 2)), x0:x0 + int(rng.integers(8, w // 2 - 2))] = True
        out.append((mask, (i + k) % 2))
    return out


def make_detect_dataset(root: Path, *, num: int = 6, unmasked: tuple[int, ...] = (5,), seed: int = 0) -> Path:
    """Write ``train`` shards of ``num`` images and ``<root>/maskdistill/masks_train.json``; return the JSON path.

    Images listed in ``unmasked`` get no mask in the JSON (the detector must skip them).
    """
    rng = np.random.default_rng(seed)
    samples, images, annotations = [], [], []
    for i in range(num):
        h, w = SIZES[i % len(SIZES)]
        image = (rng.integers(0, 60, size=(h, w, 3)) + 80).astype(np.uint8)
        for mask, cluster in _objects(i, h, w, rng):
            image[mask] = COLORS[cluster]
            if i in unmasked:
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({"id": len(annotations), "image_id": i, "category_id": cluster + 1, "cluster": cluster,
                                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask.sum())})
        samples.append(Sample(image=image, label=None, source=f"img-{i}"))
        images.append({"id": i, "key": f"{i:09d}", "width": w, "height": h})
    info = write_split(samples, root, "train", samples_per_shard=3, image_format="png")
    update_split(root, "train", info, name="detect_unit", num_classes=3, class_names=None, colors=None)
    doc = {"info": {"stage": "name"}, "images": images, "annotations": annotations,
           "categories": [{"id": 1, "name": "cluster0"}, {"id": 2, "name": "cluster1"}]}
    return write_json_atomic(doc, Path(root) / "maskdistill" / "masks_train.json")


def detect_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """A seconds-long Mask R-CNN run on the tiny dataset (random init: no weights in tests)."""
    return [f"data.root={root}", f"train.output_dir={out}", "method=maskrcnn", "data.batch_size=2",
            "data.num_workers=0", "train.num_steps=3", "train.log_every=1", "train.val_every=0",
            "tracking.enabled=false", "maskdistill.detect.init=random", "maskdistill.detect.min_sizes=[48,64]",
            "maskdistill.detect.max_size=96", "maskdistill.detect.test_min_size=64",
            "maskdistill.detect.base_lr=0.0005", "maskdistill.detect.warmup_steps=2", "train.grad_clip=1.0",
            "maskdistill.detect.detections_per_img=10", "maskdistill.detect.rpn_post_nms_top_n_train=200",
            "maskdistill.detect.rpn_post_nms_top_n_test=100", "maskdistill.detect.box_batch_size_per_image=64", *extra]


@pytest.fixture
def one_thread():
    """One torch thread in the test process, as in the subprocesses and gloo ranks: float reductions then run
    in the same order (weights compare bitwise), and a loaded 2-core box is not oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
