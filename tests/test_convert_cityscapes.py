"""``dist-seg prepare cityscapes27`` on tiny fake Cityscapes trees in the official layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_seg.cli import main as cli_main
from dist_seg.data.cityscapes import prepare_cityscapes27
from dist_seg.data.classes import CITYSCAPES27
from dist_seg.data.manifest import DataError, read_manifest


def reference(ids: np.ndarray) -> np.ndarray:
    """STEGO's CityscapesSeg: target = id - 7, negatives -> ignore; ids above 33 (none in the official
    files) are ignored too."""
    out = ids.astype(np.int64) - 7
    out[(out < 0) | (out > 26)] = 255
    return out.astype(np.uint8)


def read_records(root: Path, split: str) -> list[dict]:
    """Every record of a split, in index order, read straight from the tar files."""
    index = json.loads((root / split / "wids.json").read_text())
    grouped: dict[str, dict[str, bytes]] = {}
    for shard in index["shardlist"]:
        with tarfile.open(root / split / shard["url"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                grouped.setdefault(key, {})[ext] = tar.extractfile(member).read()
    out = []
    for key in sorted(grouped):
        rec = grouped[key]
        out.append({
            "meta": json.loads(rec["json"]),
            "image": np.array(Image.open(io.BytesIO(rec.get("png", rec.get("jpg")))).convert("RGB")),
            "label": np.array(Image.open(io.BytesIO(rec["label.png"]))),
        })
    return out


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def add_frame(src: Path, split: str, city: str, frame: str, image: np.ndarray, ids: np.ndarray | None) -> None:
    img_dir = src / "leftImg8bit" / split / city
    lab_dir = src / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(img_dir / f"{city}_{frame}_leftImg8bit.png")
    # The other gtFine files must be ignored.
    Image.fromarray(np.zeros(image.shape, np.uint8)).save(lab_dir / f"{city}_{frame}_gtFine_color.png")
    if ids is not None:
        Image.fromarray(ids, mode="L").save(lab_dir / f"{city}_{frame}_gtFine_labelIds.png")


def test_label_ids_map_to_27_classes_and_void_is_ignored(tmp_path):
    ids = np.concatenate([np.arange(34), np.arange(34), [34, 40, 255, 7]]).astype(np.uint8)
    ids = np.random.default_rng(0).permutation(ids).reshape(8, 9)
    src, out = tmp_path / "src", tmp_path / "out"
    add_frame(src, "val", "lindau", "000000_000019", rgb(8, 9, 0), ids)

    reports = prepare_cityscapes27(src, out, splits=["val"], image_format="png", workers=0, progress=False)

    (rec,) = read_records(out, "val")
    for value in range(256):
        where = ids == value
        if where.any():
            want = value - 7 if 7 <= value <= 33 else 255
            assert set(np.unique(rec["label"][where]).tolist()) == {want}, f"label id {value}"
    np.testing.assert_array_equal(rec["label"], reference(ids))
    np.testing.assert_array_equal(rec["image"], rgb(8, 9, 0))
    assert rec["meta"]["source"] == "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png"
    # ids 0..6 twice each, plus 34, 40, 255 -> 7*2 + 3 ignored pixels; every class twice (+1 road).
    assert reports["val"].info.ignore_pixels == 17
    assert reports["val"].info.class_pixels == [3] + [2] * 26


def test_class_names_and_official_colours():
    assert len(CITYSCAPES27.class_names) == 27 and len(CITYSCAPES27.colors) == 27
    names = dict(zip(CITYSCAPES27.class_names, CITYSCAPES27.colors))
    # spot checks against cityscapesScripts' labels.py (id 7 road .. id 33 bicycle)
    assert CITYSCAPES27.class_names[0] == "road" and names["road"] == (128, 64, 128)
    assert CITYSCAPES27.class_names[16] == "sky" and names["sky"] == (70, 130, 180)
    assert CITYSCAPES27.class_names[26] == "bicycle" and names["bicycle"] == (119, 11, 32)
    assert names["person"] == (220, 20, 60) and names["car"] == (0, 0, 142)


def test_train_five_crops_cities_in_order_and_val_whole(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    h, w = 12, 16
    rng = np.random.default_rng(1)
    frames = [("zurich", "000001_000019"), ("aachen", "000002_000019"), ("aachen", "000001_000019")]
    labels = {}
    for i, (city, frame) in enumerate(frames):
        labels[(city, frame)] = rng.integers(0, 34, (h, w), dtype=np.uint8)
        add_frame(src, "train", city, frame, rgb(h, w, i), labels[(city, frame)])
    add_frame(src, "val", "lindau", "000000_000019", rgb(h, w, 9), labels[frames[0]])

    code = cli_main(["prepare", "cityscapes27", "--src", str(src), "--out", str(out), "--workers", "0",
                     "--image-format", "png", "--no-progress"])
    assert code == 0

    train = read_records(out, "train")
    assert len(train) == 3 * 5, "3 train images x 5 crops"
    order = [("aachen", "000001_000019"), ("aachen", "000002_000019"), ("zurich", "000001_000019")]
    boxes = [(0, 0), (0, 8), (6, 0), (6, 8), (3, 4)]  # 6x8 crops: tl, tr, bl, br, centre
    for n, rec in enumerate(train):
        image_index, crop = divmod(n, 5)
        city, frame = order[image_index]
        top, left = boxes[crop]
        assert rec["meta"]["source"] == f"leftImg8bit/train/{city}/{city}_{frame}_leftImg8bit.png"
        assert rec["meta"]["crop"] == crop
        np.testing.assert_array_equal(rec["label"], reference(labels[(city, frame)])[top:top + 6, left:left + 8],
                                      err_msg=f"{city} {frame} crop {crop}")
        np.testing.assert_array_equal(rec["image"], rgb(h, w, frames.index((city, frame)))[top:top + 6, left:left + 8])
    val = read_records(out, "val")
    assert len(val) == 1 and val[0]["label"].shape == (h, w) and val[0]["meta"]["crop"] is None
    manifest = read_manifest(out)
    assert manifest.name == "cityscapes27" and manifest.num_classes == 27
    assert manifest.splits["train"].crop == "five" and manifest.splits["val"].crop == "none"

    # --no-five-crop writes whole images (into a fresh folder).
    assert cli_main(["prepare", "cityscapes27", "--src", str(src), "--out", str(tmp_path / "whole"),
                     "--splits", "train", "--no-five-crop", "--workers", "0", "--no-progress"]) == 0
    assert len(read_records(tmp_path / "whole", "train")) == 3


def test_missing_folders_name_the_expected_path(tmp_path, capsys):
    src = tmp_path / "src"
    add_frame(src, "val", "lindau", "000000_000019", rgb(4, 4, 0), np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=str(src / "leftImg8bit" / "train")):
        prepare_cityscapes27(src, tmp_path / "out", workers=0, progress=False)
    (src / "leftImg8bit" / "train" / "x").mkdir(parents=True)
    code = cli_main(["prepare", "cityscapes27", "--src", str(src), "--out", str(tmp_path / "out"), "--workers", "0"])
    assert code == 1
    assert str(src / "gtFine" / "train") in capsys.readouterr().err
    assert not (tmp_path / "out" / "val").exists(), "layout errors surface before any split is written"


def test_missing_and_wrong_size_labels_are_skipped_and_listed(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    add_frame(src, "val", "bonn", "000000_000001", rgb(6, 6, 0), np.full((6, 6), 26, np.uint8))
    add_frame(src, "val", "bonn", "000000_000002", rgb(6, 6, 1), None)
    add_frame(src, "val", "bonn", "000000_000003", rgb(6, 6, 2), np.full((5, 6), 26, np.uint8))

    reports = prepare_cityscapes27(src, out, splits=["val"], workers=0, progress=False)

    printed = capsys.readouterr().out
    assert "source images: 3, skipped: 2" in printed, printed
    records = read_records(out, "val")
    assert len(records) == 1 and (records[0]["label"] == 19).all(), "id 26 (car) -> 19"
    reasons = {s.source.split("/")[-1]: s.reason for s in reports["val"].skipped}
    assert "no label" in reasons["bonn_000000_000002_leftImg8bit.png"]
    assert "bonn_000000_000003_gtFine_labelIds.png is 6×5 but the image is 6×6" in reasons[
        "bonn_000000_000003_leftImg8bit.png"]
    assert len(read_manifest(out).extra["skipped"]["val"]) == 2
    with pytest.raises(DataError, match="bonn_000000_000002_gtFine_labelIds.png"):
        prepare_cityscapes27(src, tmp_path / "strict", splits=["val"], strict=True, workers=0, progress=False)
