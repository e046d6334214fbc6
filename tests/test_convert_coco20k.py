"""``dist-seg prepare coco20k`` on a tiny fake COCO 2014 tree with LOST's image-list format."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from dist_seg.cli import main as cli_main
from dist_seg.data.coco20k import prepare_coco20k
from dist_seg.data.instances import decode_rle, instances_path
from dist_seg.data.manifest import DataError, read_manifest

from .test_convert_cocostuff import read_records, rgb

H, W = 12, 16
CATS = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}]


def _name(i: int) -> str:
    return f"COCO_train2014_{i:012d}.jpg"


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as crowd annotations store it): run lengths of the column-major pixels,
    starting with a run of zeros."""
    flat = mask.T.ravel().astype(np.uint8)
    counts = [len(list(run)) for _, run in itertools.groupby(flat)]
    if flat[0] == 1:
        counts = [0] + counts
    rle = {"size": [H, W], "counts": counts}
    assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects(rle, H, W)).astype(bool), mask)
    return rle


def make_coco(src: Path) -> dict[int, np.ndarray]:
    """Four images; 9 (person under a dog + a crowd), 25 (toothbrush), 30 (no objects), 42 (corrupt file)."""
    (src / "train2014").mkdir(parents=True)
    (src / "annotations").mkdir()
    for n, i in enumerate((9, 25, 30)):
        Image.fromarray(rgb(H, W, n)).save(src / "train2014" / _name(i), format="PNG")
    (src / "train2014" / _name(42)).write_bytes(b"broken")
    person, dog, crowd = _box(0, 10, 0, 8), _box(2, 5, 2, 6), _box(8, 12, 10, 16)
    anns = [
        {"id": 1, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": float(person.sum()), "bbox": [0, 0, 8, 10],
         "segmentation": _uncompressed_rle(person)},
        {"id": 2, "image_id": 9, "category_id": 18, "iscrowd": 0, "area": float(dog.sum()), "bbox": [2, 2, 4, 3],
         "segmentation": _uncompressed_rle(dog)},
        {"id": 3, "image_id": 9, "category_id": 1, "iscrowd": 1, "area": float(crowd.sum()),
         "bbox": [10, 8, 6, 4], "segmentation": _uncompressed_rle(crowd)},
        {"id": 4, "image_id": 25, "category_id": 90, "iscrowd": 0, "area": 48.0, "bbox": [4, 3, 8, 6],
         "segmentation": [[4, 3, 12, 3, 12, 9, 4, 9]]},  # a polygon
        {"id": 5, "image_id": 42, "category_id": 18, "iscrowd": 0, "area": 4.0, "bbox": [0, 0, 2, 2],
         "segmentation": _uncompressed_rle(_box(0, 2, 0, 2))},
    ]
    images = [{"id": i, "file_name": _name(i), "height": H, "width": W} for i in (9, 25, 30, 42, 77)]
    (src / "annotations" / "instances_train2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    # LOST's list format; image 77 is annotated but not listed, 99 is listed but not annotated.
    (src / "coco_20k_filenames.txt").write_text(
        "".join(f"train2014/{_name(i)}\n" for i in (25, 9, 30, 42, 99)))
    label9 = np.zeros((H, W), np.uint8)
    label9[person], label9[dog], label9[crowd] = 1, 2, 255  # the dog (smaller) stays on top of the person
    return {9: label9, 25: None, 30: np.zeros((H, W), np.uint8)}


def test_labels_instances_and_skips(tmp_path, capsys):
    src, out = tmp_path / "coco", tmp_path / "out"
    expected = make_coco(src)
    reports = prepare_coco20k(src, out, workers=0, progress=False, image_format="png")
    assert "5 images from" in capsys.readouterr().out
    rep = reports["train"]
    assert rep.info.num_samples == 3 and len(rep.skipped) == 2
    manifest = read_manifest(out)
    assert manifest.name == "coco20k" and manifest.num_classes == 4
    assert manifest.class_names == ["background", "person", "dog", "toothbrush"]
    assert manifest.extra["category_ids"] == {"1": 1, "18": 2, "90": 3} and manifest.extra["transductive"]
    reasons = " ".join(manifest.extra["unreadable"]["train"])
    assert "could not be read" in reasons and f"entry of {_name(99)}" in reasons

    recs = read_records(out, "train")
    assert [r["meta"]["source"] for r in recs] == [f"train2014/{_name(i)}" for i in (25, 9, 30)]
    np.testing.assert_array_equal(recs[1]["label"], expected[9])
    np.testing.assert_array_equal(recs[2]["label"], expected[30])
    polygon = COCO(str(src / "annotations" / "instances_train2014.json")).annToMask(
        {"segmentation": [[4, 3, 12, 3, 12, 9, 4, 9]], "image_id": 25})
    np.testing.assert_array_equal(recs[0]["label"], polygon.astype(np.uint8) * 3)
    np.testing.assert_array_equal(recs[1]["image"], rgb(H, W, 0))

    # Instance ground truth keyed by record index, with COCO ids kept and crowd flags intact.
    gt = COCO(str(instances_path(out, "train")))
    assert [gt.imgs[i]["coco_id"] for i in range(3)] == [25, 9, 30]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[1]))
    assert sorted((a["category_id"], a["iscrowd"]) for a in anns) == [(1, 0), (1, 1), (2, 0)]
    person = next(a for a in anns if a["category_id"] == 1 and not a["iscrowd"])
    assert np.array_equal(decode_rle(person["segmentation"], H, W), _box(0, 10, 0, 8))
    assert gt.getAnnIds(imgIds=[2]) == []

    # Resume keeps the split and the instances.
    before = instances_path(out, "train").read_bytes()
    prepare_coco20k(src, out, workers=0, progress=False, image_format="png")
    assert instances_path(out, "train").read_bytes() == before


def test_missing_sources_name_the_fix(tmp_path, capsys):
    src = tmp_path / "coco"
    make_coco(src)
    (src / "coco_20k_filenames.txt").unlink()
    with pytest.raises(DataError, match="valeoai/LOST"):
        prepare_coco20k(src, tmp_path / "out")
    (src / "annotations" / "instances_train2014.json").unlink()
    assert cli_main(["prepare", "coco20k", "--src", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "annotations_trainval2014.zip" in err and "\n" not in err


def test_cli_prepare_coco20k_with_list(tmp_path, capsys):
    src, out = tmp_path / "coco", tmp_path / "out"
    make_coco(src)
    listing = tmp_path / "mine.txt"
    listing.write_text(f"{_name(9)}\n")
    assert cli_main(["prepare", "coco20k", "--src", str(src), "--out", str(out), "--list", str(listing),
                     "--workers", "0", "--no-progress"]) == 0
    assert "dataset 'coco20k': 4 classes" in capsys.readouterr().out
    assert read_manifest(out).split("train").num_samples == 1
