"""``dist-seg prepare voc12`` on tiny fake VOC 2012 + SBD trees in the official layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_seg.cli import main as cli_main
from dist_seg.data.classes import VOC12
from dist_seg.data.manifest import DataError, read_manifest
from dist_seg.data.voc12 import prepare_voc12

from .test_convert_cocostuff import read_records, rgb

VAL = ["2007_000033", "2007_000042"]
TRAIN = ["2007_000032", "2008_000008", "2011_000003"]  # 2011_000003: SBD only


def _label(seed: int, h: int = 10, w: int = 14) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 21, (h, w)).astype(np.uint8)
    label[0, :3] = 255  # void border
    label[1, 0] = 30  # not a VOC id: must become void
    return label


def _palette_png(label: np.ndarray, path: Path) -> None:
    # SegmentationClass files are palette PNGs: the pixel values are the ids, the palette gives colours.
    img = Image.fromarray(label, mode="P")
    flat = [v for c in VOC12.colors for v in c] + [224, 224, 192] * (256 - 21)
    img.putpalette(flat)
    img.save(path)


# The object segmentation set (ImageSets/Segmentation/trainval.txt): val and VOC train, not the SBD-only image.
OBJECT_SET = VAL + TRAIN[:2]
# (instance id, class id, rows, cols) of each object-set image: two persons and a car, one touching the border.
INSTANCES = [(1, 15, slice(3, 7), slice(1, 6)), (2, 7, slice(3, 9), slice(8, 13)), (3, 15, slice(8, 10), slice(0, 4))]


def _objects(n: int, label: np.ndarray) -> np.ndarray:
    """SegmentationObject map of object-set image n (instance ids, 255 void), painting its classes into label."""
    objects = np.zeros_like(label)
    for inst, cls, rows, cols in INSTANCES[: 1 + n % 3]:
        objects[rows, cols] = inst
        label[rows, cols] = cls
    objects[0, :3] = 255  # the void border of _label is void in both maps
    return objects


def make_voc(src: Path, *, sbd: Path | None = None, train_aug_list: bool = False) -> dict[str, np.ndarray]:
    voc = src / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    labels = {}
    for n, image_id in enumerate(VAL + TRAIN):
        Image.fromarray(rgb(10, 14, n)).save(voc / "JPEGImages" / f"{image_id}.jpg", format="PNG")
        labels[image_id] = _label(n)
        if image_id in OBJECT_SET:
            _palette_png(_objects(n, labels[image_id]), voc / "SegmentationObject" / f"{image_id}.png")
        if image_id != "2011_000003":
            _palette_png(labels[image_id], voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VAL) + "\n")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(TRAIN[:2]) + "\n")
    (voc / "ImageSets/Segmentation/trainval.txt").write_text("\n".join(OBJECT_SET) + "\n")
    aug = (sbd or voc) / "SegmentationClassAug"
    aug.mkdir(parents=True, exist_ok=True)
    for image_id in VAL + TRAIN:  # SegmentationClassAug covers val too (12,031 = 10,582 + 1,449)
        Image.fromarray(labels[image_id], mode="L").save(aug / f"{image_id}.png")
    if train_aug_list:
        (voc / "ImageSets/Segmentation/train_aug.txt").write_text(
            "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in TRAIN[::-1]))
    return labels


def _expected(label: np.ndarray) -> np.ndarray:
    out = label.copy()
    out[out == 30] = 255
    return out


def test_val_and_derived_trainaug_with_separate_sbd(tmp_path, capsys):
    src, sbd, out = tmp_path / "voc", tmp_path / "sbd", tmp_path / "out"
    labels = make_voc(src, sbd=sbd)
    reports = prepare_voc12(src, out, sbd=sbd, image_format="png", workers=0, progress=False)
    text = capsys.readouterr().out
    assert "not in the val list (3 ids" in text, "the derived trainaug list must say where it came from"
    assert reports["val"].info.num_samples == 2 and reports["trainaug"].info.num_samples == 3
    manifest = read_manifest(out)
    assert manifest.name == "voc12" and manifest.num_classes == 21 and manifest.class_names[0] == "background"
    assert manifest.class_names[15] == "person" and manifest.colors[15] == [192, 128, 128]
    for split, ids in (("val", VAL), ("trainaug", sorted(TRAIN))):
        recs = read_records(out, split)
        assert [r["meta"]["source"] for r in recs] == [f"JPEGImages/{i}.jpg" for i in ids]
        for rec, image_id in zip(recs, ids):
            np.testing.assert_array_equal(rec["label"], _expected(labels[image_id]),
                                          err_msg=f"{split}/{image_id}: labels must be the palette indices")
            assert rec["image"].shape == (10, 14, 3), "original resolution, no crop"
        assert manifest.split(split).crop == "none" and manifest.split(split).ignore_pixels == 4 * len(ids)


def test_train_aug_list_is_used_when_present(tmp_path, capsys):
    src, out = tmp_path / "voc", tmp_path / "out"
    make_voc(src, train_aug_list=True)
    prepare_voc12(src, out, splits=["trainaug"], workers=0, progress=False)
    assert "train_aug.txt" in capsys.readouterr().out
    recs = read_records(out, "trainaug")
    assert [r["meta"]["source"] for r in recs] == [f"JPEGImages/{i}.jpg" for i in TRAIN[::-1]]


def test_unreadable_and_rgb_labels_are_counted_skips(tmp_path):
    src, out = tmp_path / "voc", tmp_path / "out"
    make_voc(src)
    voc = src / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages" / f"{VAL[0]}.jpg").write_bytes(b"not an image")
    Image.fromarray(rgb(10, 14, 9)).save(voc / "SegmentationClass" / f"{VAL[1]}.png")  # RGB colours, not ids
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VAL + ["2008_000008"]) + "\n")
    reports = prepare_voc12(src, out, splits=["val"], workers=0, progress=False)
    assert reports["val"].info.num_samples == 1 and len(reports["val"].skipped) == 2
    unreadable = read_manifest(out).extra["unreadable"]["val"]
    assert any("could not be read" in s for s in unreadable) and any("RGB image" in s for s in unreadable)
    with pytest.raises(DataError, match="--strict"):
        prepare_voc12(src, tmp_path / "strict", splits=["val"], workers=0, progress=False, strict=True)


def test_missing_files_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="VOCtrainval_11-May-2012.tar"):
        prepare_voc12(tmp_path, tmp_path / "out")
    src = tmp_path / "voc"
    make_voc(src, sbd=tmp_path / "elsewhere")
    with pytest.raises(DataError, match="--sbd"):
        prepare_voc12(src, tmp_path / "out", splits=["trainaug"])
    assert cli_main(["prepare", "voc12", "--src", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--sbd DIR" in err and "\n" not in err


def test_cli_prepare_voc12(tmp_path, capsys):
    src, out = tmp_path / "voc", tmp_path / "out"
    make_voc(src)
    assert cli_main(["prepare", "voc12", "--src", str(src), "--out", str(out), "--workers", "0",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "dataset 'voc12': 21 classes" in text and "trainaug: 3 samples" in text and "val: 2 samples" in text
    # Resumes: complete splits are kept.
    assert cli_main(["prepare", "voc12", "--src", str(src), "--out", str(out), "--workers", "0",
                     "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_maskcontrast_layout(tmp_path):
    # MaskDistill's own copy of VOC: images/, SegmentationClass/, SegmentationClassAug/, sets/*.txt.
    src, out = tmp_path / "PASCAL_VOC", tmp_path / "out"
    for d in ("images", "SegmentationClass", "SegmentationClassAug", "sets"):
        (src / d).mkdir(parents=True)
    labels = {}
    for n, image_id in enumerate(VAL + TRAIN):
        Image.fromarray(rgb(10, 14, n)).save(src / "images" / f"{image_id}.jpg", format="PNG")
        labels[image_id] = _label(n)
        _palette_png(labels[image_id], src / "SegmentationClass" / f"{image_id}.png")
        Image.fromarray(labels[image_id], mode="L").save(src / "SegmentationClassAug" / f"{image_id}.png")
    (src / "sets" / "val.txt").write_text("\n".join(VAL) + "\n")
    (src / "sets" / "trainaug.txt").write_text("\n".join(TRAIN[:2]) + "\n")
    reports = prepare_voc12(src, out, workers=0, progress=False, report=False)
    assert reports["trainaug"].info.num_samples == 2 and reports["val"].info.num_samples == 2
    assert read_manifest(out).extra["conversion"]["val"]["layout"] == "maskcontrast"
    assert not (out / "instances_val.json").exists(), "no SegmentationObject here: no instance ground truth"
    for rec, image_id in zip(read_records(out, "trainaug"), TRAIN[:2]):
        np.testing.assert_array_equal(rec["label"], _expected(labels[image_id]))


def test_object_segmentation_set_round_trips_through_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    from dist_seg.data.instances import instances_path

    src, out = tmp_path / "voc", tmp_path / "out"
    make_voc(src)
    prepare_voc12(src, out, workers=0, progress=False, report=False)
    for split, ids in (("val", VAL), ("trainaug", sorted(TRAIN))):
        coco = COCO(str(instances_path(out, split)))
        in_set = [(index, image_id) for index, image_id in enumerate(ids) if image_id in OBJECT_SET]
        assert sorted(coco.getImgIds()) == [index for index, _ in in_set], f"{split}: the object set's records"
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(VOC12.class_names[1:])
        records = read_records(out, split)
        for index, image_id in in_set:
            n = (VAL + TRAIN).index(image_id)
            objects = _objects(n, _label(n))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[index]))
            assert len(anns) == 1 + n % 3, f"{split}/{image_id}: one annotation per instance id"
            assert coco.imgs[index]["file_name"] == f"{image_id}.jpg" and records[index]["meta"]["source"] == \
                f"JPEGImages/{image_id}.jpg", "image_id is the record's index"
            for ann, (inst, cls, _, _) in zip(anns, INSTANCES):
                np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), objects == inst)
                ys, xs = np.nonzero(objects == inst)
                assert ann["category_id"] == cls and ann["iscrowd"] == 0 and ann["area"] == len(ys)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
