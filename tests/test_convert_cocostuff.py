"""``dist-seg prepare cocostuff27`` on tiny fake COCO-Stuff trees in the official layouts."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_seg.cli import main as cli_main
from dist_seg.data.classes import COCOSTUFF27, COCOSTUFF27_LUT
from dist_seg.data.cocostuff import prepare_cocostuff27
from dist_seg.data.manifest import DataError, read_manifest

# The reference table, typed in from STEGO's src/data.py (Coco.fine_to_coarse) independently of
# dist_seg's table (which is derived from the COCO-Stuff hierarchy by name).
STEGO_FINE_TO_COARSE = {
    0: 9, 1: 11, 2: 11, 3: 11, 4: 11, 5: 11, 6: 11, 7: 11, 8: 11, 9: 8, 10: 8, 11: 8, 12: 8, 13: 8, 14: 8,
    15: 7, 16: 7, 17: 7, 18: 7, 19: 7, 20: 7, 21: 7, 22: 7, 23: 7, 24: 7, 25: 6, 26: 6, 27: 6, 28: 6, 29: 6,
    30: 6, 31: 6, 32: 6, 33: 10, 34: 10, 35: 10, 36: 10, 37: 10, 38: 10, 39: 10, 40: 10, 41: 10, 42: 10,
    43: 5, 44: 5, 45: 5, 46: 5, 47: 5, 48: 5, 49: 5, 50: 5, 51: 2, 52: 2, 53: 2, 54: 2, 55: 2, 56: 2, 57: 2,
    58: 2, 59: 2, 60: 2, 61: 3, 62: 3, 63: 3, 64: 3, 65: 3, 66: 3, 67: 3, 68: 3, 69: 3, 70: 3, 71: 0, 72: 0,
    73: 0, 74: 0, 75: 0, 76: 0, 77: 1, 78: 1, 79: 1, 80: 1, 81: 1, 82: 1, 83: 4, 84: 4, 85: 4, 86: 4, 87: 4,
    88: 4, 89: 4, 90: 4, 91: 17, 92: 17, 93: 22, 94: 20, 95: 20, 96: 22, 97: 15, 98: 25, 99: 16, 100: 13,
    101: 12, 102: 12, 103: 17, 104: 17, 105: 23, 106: 15, 107: 15, 108: 17, 109: 15, 110: 21, 111: 15,
    112: 25, 113: 13, 114: 13, 115: 13, 116: 13, 117: 13, 118: 22, 119: 26, 120: 14, 121: 14, 122: 15,
    123: 22, 124: 21, 125: 21, 126: 24, 127: 20, 128: 22, 129: 15, 130: 17, 131: 16, 132: 15, 133: 22,
    134: 24, 135: 21, 136: 17, 137: 25, 138: 16, 139: 21, 140: 17, 141: 22, 142: 16, 143: 21, 144: 21,
    145: 25, 146: 21, 147: 26, 148: 21, 149: 24, 150: 20, 151: 17, 152: 14, 153: 21, 154: 26, 155: 15,
    156: 23, 157: 20, 158: 21, 159: 24, 160: 15, 161: 24, 162: 22, 163: 25, 164: 15, 165: 20, 166: 17,
    167: 17, 168: 22, 169: 14, 170: 18, 171: 18, 172: 18, 173: 18, 174: 18, 175: 18, 176: 18, 177: 26,
    178: 26, 179: 19, 180: 19, 181: 24,
}  # fmt: skip
# STEGO's get_class_labels("cocostuff27"); it names two classes "food" and two "furniture".
STEGO_NAMES = ["electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
               "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food", "furniture",
               "rawmaterial", "textile", "wall", "window", "building", "ground", "plant", "sky", "solid",
               "structural", "water"]


def reference_coarse(fine: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: STEGO_FINE_TO_COARSE.get(int(v), 255))(fine).astype(np.uint8)


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
        image_bytes = rec.get("png", rec.get("jpg"))
        out.append({
            "key": key,
            "meta": json.loads(rec["json"]),
            "image": np.array(Image.open(io.BytesIO(image_bytes)).convert("RGB")),
            "label": np.array(Image.open(io.BytesIO(rec["label.png"]))) if "label.png" in rec else None,
        })
    return out


def make_tree(src: Path, layout: str, images: dict[str, dict[str, tuple[np.ndarray, np.ndarray | None]]]) -> None:
    """images: split dir -> id -> (RGB, fine label or None for 'no label file')."""
    for split_dir, entries in images.items():
        img_dir = src / split_dir if layout == "official" else src / "images" / split_dir
        lab_dir = (src / "stuffthingmaps_trainval2017" / split_dir if layout == "official"
                   else src / "annotations" / split_dir)
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        for image_id, (rgb, fine) in entries.items():
            # PNG bytes in a .jpg file: PIL reads by content, and the pixels stay exact for the test.
            Image.fromarray(rgb).save(img_dir / f"{image_id}.jpg", format="PNG")
            if fine is not None:
                Image.fromarray(fine, mode="L").save(lab_dir / f"{image_id}.png")


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_every_fine_id_maps_like_stego(tmp_path):
    fine = np.concatenate([np.arange(182), np.full(10, 255)]).astype(np.uint8)
    rng = np.random.default_rng(0)
    fine = rng.permutation(fine).reshape(12, 16)
    assert set(np.unique(fine)) == set(range(182)) | {255}
    src, out = tmp_path / "src", tmp_path / "out"
    make_tree(src, "official", {"val2017": {"000000000001": (rgb(12, 16, 1), fine)}})

    reports = prepare_cocostuff27(src, out, splits=["val"], image_format="png", workers=0, progress=False)

    (rec,) = read_records(out, "val")
    expected = reference_coarse(fine)
    assert rec["label"].shape == fine.shape
    for value in range(256):
        where = fine == value
        if where.any():
            got = set(np.unique(rec["label"][where]).tolist())
            assert got == {STEGO_FINE_TO_COARSE.get(value, 255)}, f"fine id {value} -> {got}"
    np.testing.assert_array_equal(rec["label"], expected, err_msg="coarse labels differ from STEGO's table")
    np.testing.assert_array_equal(rec["image"], rgb(12, 16, 1), err_msg="png image pixels changed")
    assert rec["meta"]["source"] == "val2017/000000000001.jpg" and rec["meta"]["crop"] is None
    # The library table, compared entry by entry as well (and the LUT leaves void and unknown ids ignored).
    assert {i: int(COCOSTUFF27_LUT[i]) for i in range(182)} == STEGO_FINE_TO_COARSE
    assert all(COCOSTUFF27_LUT[i] == 255 for i in range(182, 256))
    info = reports["val"].info
    assert info.class_pixels == np.bincount(expected[expected != 255], minlength=27).tolist()
    assert info.ignore_pixels == 10


def test_class_names_follow_stego_order():
    names = list(COCOSTUFF27.class_names)
    assert len(names) == 27 and len(COCOSTUFF27.colors) == 27
    # Same classes in the same order; the duplicates get COCO-Stuff's "-stuff" names.
    normalised = [n.removesuffix("-stuff").replace("-", "") for n in names]
    assert normalised == STEGO_NAMES, names
    assert names[14] == "food-stuff" and names[15] == "furniture-stuff"
    assert len(set(map(tuple, COCOSTUFF27.colors))) == 27, "class colours must be distinct"


def test_train_five_crops_and_val_does_not(tmp_path):
    h, w = 24, 20
    rng = np.random.default_rng(3)
    fines = {f"{i:012d}": rng.choice(np.r_[0:182, 255], (h, w)).astype(np.uint8) for i in range(2)}
    src, out = tmp_path / "src", tmp_path / "out"
    make_tree(src, "official", {
        "train2017": {k: (rgb(h, w, i), f) for i, (k, f) in enumerate(fines.items())},
        "val2017": {"000000000007": (rgb(h, w, 7), fines["000000000000"])},
    })

    reports = prepare_cocostuff27(src, out, image_format="png", workers=0, progress=False)

    train = read_records(out, "train")
    assert len(train) == 2 * 5, f"2 train images x 5 crops, got {len(train)} records"
    assert reports["train"].info.crop == "five" and reports["val"].info.crop == "none"
    # torchvision five_crop order: top-left, top-right, bottom-left, bottom-right, centre (12x10 crops).
    boxes = [(0, 0), (0, 10), (12, 0), (12, 10), (6, 5)]
    for n, rec in enumerate(train):
        image_index, crop = divmod(n, 5)
        key = f"{image_index:012d}"
        top, left = boxes[crop]
        assert rec["meta"] == {"index": n, "source": f"train2017/{key}.jpg", "crop": crop, "has_label": True}
        np.testing.assert_array_equal(rec["label"], reference_coarse(fines[key])[top:top + 12, left:left + 10],
                                      err_msg=f"label of crop {crop} of {key}")
        np.testing.assert_array_equal(rec["image"], rgb(h, w, image_index)[top:top + 12, left:left + 10])
    val = read_records(out, "val")
    assert len(val) == 1 and val[0]["label"].shape == (h, w)
    np.testing.assert_array_equal(val[0]["label"], reference_coarse(fines["000000000000"]))


def test_curated_list_is_used_and_reported(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    fine = np.full((8, 8), 100, dtype=np.uint8)  # carpet -> floor (13)
    make_tree(src, "iic", {"train2017": {f"{i:012d}": (rgb(8, 8, i), fine) for i in range(4)},
                           "val2017": {f"{i:012d}": (rgb(8, 8, i), fine) for i in range(10, 13)}})
    curated = src / "curated" / "train2017"
    curated.mkdir(parents=True)
    (curated / "Coco164kFull_Stuff_Coarse.txt").write_text("000000000003\n000000000001\n")

    prepare_cocostuff27(src, out, five_crop=False, image_format="png", workers=0, progress=False)

    printed = capsys.readouterr().out
    list_path = curated / "Coco164kFull_Stuff_Coarse.txt"
    assert f"STEGO's curated list {list_path}" in printed, printed
    assert "Coco164kFull_Stuff_Coarse_7.txt is not there" in printed and "all images" in printed, printed
    train = read_records(out, "train")
    assert [r["meta"]["source"] for r in train] == ["images/train2017/000000000003.jpg",
                                                    "images/train2017/000000000001.jpg"], "list order kept"
    assert all((r["label"] == 13).all() for r in train)
    assert len(read_records(out, "val")) == 3, "val without a list uses every image"
    conversion = read_manifest(out).extra["conversion"]
    assert conversion["train"]["image_list"] == str(list_path)
    assert conversion["train"]["layout"] == "iic"
    assert conversion["val"]["image_list"] is None

    with pytest.raises(DataError, match="image list 'nope.txt' not found"):
        prepare_cocostuff27(src, tmp_path / "out2", splits=["train"], train_list="nope.txt", workers=0,
                            progress=False)


def test_missing_folder_names_expected_path(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "train2017").mkdir(parents=True)
    code = cli_main(["prepare", "cocostuff27", "--src", str(src), "--out", str(tmp_path / "out"), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert str(src / "stuffthingmaps_trainval2017" / "train2017") in err, err
    assert not (tmp_path / "out" / "train").exists()


def test_skips_are_counted_listed_and_strict_fails(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    good = np.full((8, 8), 0, dtype=np.uint8)  # person -> 9
    make_tree(src, "official", {"val2017": {
        "000000000001": (rgb(8, 8, 1), good),
        "000000000002": (rgb(8, 8, 2), None),  # no label file
        "000000000003": (rgb(8, 8, 3), np.zeros((6, 8), np.uint8)),  # wrong size
        "000000000004": (rgb(8, 8, 4), good),
    }})
    (src / "val2017" / "000000000004.jpg").write_bytes(b"not an image")

    code = cli_main(["prepare", "cocostuff27", "--src", str(src), "--out", str(out), "--splits", "val",
                     "--workers", "0", "--no-progress", "--image-format", "png"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "source images: 4, skipped: 3" in printed, printed
    records = read_records(out, "val")
    assert [r["meta"]["source"] for r in records] == ["val2017/000000000001.jpg"]
    assert (records[0]["label"] == 9).all()
    skipped = {s["source"]: s["reason"] for s in read_manifest(out).extra["skipped"]["val"]}
    assert set(skipped) == {"val2017/000000000002.jpg", "val2017/000000000003.jpg", "val2017/000000000004.jpg"}
    assert "no label" in skipped["val2017/000000000002.jpg"]
    assert "000000000003.png is 8×6 but the image is 8×8" in skipped["val2017/000000000003.jpg"]
    assert "could not be read" in skipped["val2017/000000000004.jpg"]
    for source in skipped:
        assert source in printed, f"{source} not printed"
    assert len(read_manifest(out).extra["unreadable"]["val"]) == 3

    with pytest.raises(DataError, match="have no label"):
        prepare_cocostuff27(src, tmp_path / "strict", splits=["val"], strict=True, workers=0, progress=False)
    (src / "stuffthingmaps_trainval2017" / "val2017" / "000000000002.png").write_bytes(
        (src / "stuffthingmaps_trainval2017" / "val2017" / "000000000001.png").read_bytes())
    with pytest.raises(DataError, match="8×6 but the image is 8×8"):
        prepare_cocostuff27(src, tmp_path / "strict", splits=["val"], strict=True, workers=0, progress=False)
    assert not (tmp_path / "strict" / "val").exists(), "a failed split must leave nothing that looks complete"


def test_resume_keeps_complete_split_and_pool_matches_serial(tmp_path, capsys):
    src = tmp_path / "src"
    rng = np.random.default_rng(5)
    make_tree(src, "official", {"train2017": {
        f"{i:012d}": (rgb(16, 16, i), rng.choice(np.r_[0:182, 255], (16, 16)).astype(np.uint8)) for i in range(6)}})
    serial, pooled = tmp_path / "serial", tmp_path / "pooled"
    prepare_cocostuff27(src, serial, splits=["train"], workers=0, samples_per_shard=7, progress=False)
    prepare_cocostuff27(src, pooled, splits=["train"], workers=2, samples_per_shard=7, progress=False)
    shards = sorted(p.name for p in (serial / "train").glob("*.tar"))
    assert len(shards) == 5, "30 crops at 7 per shard"
    for name in shards:
        assert (serial / "train" / name).read_bytes() == (pooled / "train" / name).read_bytes(), \
            f"{name}: the pool must write the same records in the same order"

    # Resume: a complete split is not read again (the source images may even be gone).
    for p in (src / "train2017").iterdir():
        p.write_bytes(b"corrupt")
    capsys.readouterr()
    reports = prepare_cocostuff27(src, serial, splits=["train"], workers=0, progress=False)
    assert reports["train"].resumed and reports["train"].info.num_samples == 30
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(DataError, match="--overwrite"):
        prepare_cocostuff27(src, serial, splits=["train"], five_crop=False, workers=0, progress=False)


def test_verification_catches_a_lost_record(tmp_path, monkeypatch):
    import dist_seg.data.convert_common as common

    src, out = tmp_path / "src", tmp_path / "out"
    make_tree(src, "official", {"val2017": {f"{i:012d}": (rgb(8, 8, i), np.zeros((8, 8), np.uint8))
                                            for i in range(3)}})
    real = common.write_records

    def lossy(records, *args, **kwargs):
        return real((r for i, r in enumerate(records) if i != 1), *args, **kwargs)

    monkeypatch.setattr(common, "write_records", lossy)
    with pytest.raises(DataError, match="holds 2 records, expected 3"):
        prepare_cocostuff27(src, out, splits=["val"], workers=0, progress=False)
    assert not (out / "val").exists(), "a split that failed verification must not look complete"
