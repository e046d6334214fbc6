"""``dist-seg prepare potsdam3`` on tiny fake IIC Potsdam trees (``.mat`` tiles written with scipy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from dist_seg.cli import main as cli_main
from dist_seg.data.classes import POTSDAM3
from dist_seg.data.manifest import DataError, read_manifest
from dist_seg.data.potsdam import prepare_potsdam3
from dist_seg.data.shards import make_loader

# STEGO / IIC: {0: 0, 4: 0} roads and cars, {1: 1, 5: 1} buildings and clutter, {2: 2, 3: 2} vegetation.
MERGE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
S = 8  # tile side


def reference(gt: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: MERGE.get(int(v), 255))(gt).astype(np.int64)


def write_tree(src: Path, tiles: dict[str, tuple[np.ndarray, np.ndarray | None]], lists: dict[str, list[str]]) -> None:
    (src / "imgs").mkdir(parents=True, exist_ok=True)
    (src / "gt").mkdir(parents=True, exist_ok=True)
    for name, (img, gt) in tiles.items():
        scipy.io.savemat(src / "imgs" / f"{name}.mat", {"img": img})
        if gt is not None:
            scipy.io.savemat(src / "gt" / f"{name}.mat", {"gt": gt})
    for list_name, ids in lists.items():
        (src / list_name).write_text("".join(f"{i}\n" for i in ids))


def rgbir(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (S, S, 4), dtype=np.uint8)


def read_split(root: Path, split: str) -> list[dict]:
    """Records through the shard reader, in index order (tiles are square, so res = S is no resize)."""
    loader, _ = make_loader(root, split, batch_size=1, res=S, num_workers=0, shuffle=False, infinite=False)
    rows = []
    for batch in loader:
        rows.append({"index": int(batch["index"][0]), "image": batch["image"][0].permute(1, 2, 0).numpy(),
                     "label": batch["label"][0].numpy()})
    return sorted(rows, key=lambda r: r["index"])


def test_tiles_merge_six_classes_into_three(tmp_path):
    rng = np.random.default_rng(0)
    gt_a = rng.permutation(np.r_[np.repeat(np.arange(6), 10), [255, 7, 6, 200]]).reshape(S, S).astype(np.int32)
    gt_b = rng.integers(0, 6, (S, S)).astype(np.int32)
    float_unit = rgbir(2).astype(np.float64) / 255.0
    float_byte = rgbir(3).astype(np.float32)
    src, out = tmp_path / "src", tmp_path / "out"
    write_tree(src, {"10": (rgbir(1), gt_a), "11": (float_unit, gt_b), "12": (float_byte, gt_b)},
               {"labelled_train.txt": ["11", "12"], "labelled_test.txt": ["10"]})

    reports = prepare_potsdam3(src, out, image_format="png", workers=0, progress=False)

    (val,) = read_split(out, "val")
    for value in np.unique(gt_a):
        got = set(np.unique(val["label"][gt_a == value]).tolist())
        assert got == {MERGE.get(int(value), -1)}, f"gt {value} -> {got} (-1 is the reader's ignore)"
    expected = reference(gt_a)
    expected[expected == 255] = -1
    np.testing.assert_array_equal(val["label"], expected)
    np.testing.assert_array_equal(val["image"], rgbir(1)[..., :3], err_msg="RGB kept, IR dropped")
    train = read_split(out, "train")
    assert len(train) == 2, "Potsdam is never five-cropped"
    np.testing.assert_array_equal(train[0]["image"], rgbir(2)[..., :3], err_msg="float [0,1] tile scaled by 255")
    np.testing.assert_array_equal(train[1]["image"], rgbir(3)[..., :3], err_msg="float [0,255] tile rounded")
    np.testing.assert_array_equal(train[0]["label"], reference(gt_b))
    assert reports["val"].info.ignore_pixels == 4
    assert reports["val"].info.class_pixels == [20, 20, 20]
    manifest = read_manifest(out)
    assert manifest.name == "potsdam3" and manifest.class_names == list(POTSDAM3.class_names)
    assert manifest.splits["train"].crop == "none"
    assert manifest.extra["conversion"]["val"]["id_list"] == str(src / "labelled_test.txt")


def test_unlabelled_split_and_cli(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_tree(src, {"1": (rgbir(1), np.zeros((S, S), np.int32)), "2": (rgbir(2), None)},
               {"labelled_train.txt": ["1"], "labelled_test.txt": ["1"], "unlabelled_train.txt": ["2"]})
    code = cli_main(["prepare", "potsdam3", "--src", str(src), "--out", str(out), "--workers", "0", "--no-progress",
                     "--splits", "train", "unlabelled_train", "--image-format", "png"])
    assert code == 0
    manifest = read_manifest(out)
    assert manifest.splits["unlabelled_train"].has_labels is False
    assert manifest.splits["train"].has_labels is True
    (row,) = read_split(out, "unlabelled_train")
    assert (row["label"] == -1).all()
    np.testing.assert_array_equal(row["image"], rgbir(2)[..., :3])
    with pytest.raises(SystemExit):
        cli_main(["prepare", "potsdam3", "--src", str(src), "--out", str(out), "--five-crop"])


def test_errors_and_skips(tmp_path, capsys):
    src = tmp_path / "src"
    with pytest.raises(DataError, match=str(src / "imgs")):
        prepare_potsdam3(src, tmp_path / "out", workers=0, progress=False)
    good = np.full((S, S), 3, np.int32)  # tree -> vegetation
    write_tree(src, {
        "1": (rgbir(1), good),
        "2": (rgbir(2), None),  # no gt
        "3": (rgbir(3), np.zeros((S - 1, S), np.int32)),  # wrong size
        "4": (rgbir(4).astype(np.int32) * 4, good),  # values up to 1020: not 8-bit
    }, {"labelled_train.txt": ["1", "2", "3", "4"]})
    with pytest.raises(DataError, match=str(src / "labelled_test.txt")):
        prepare_potsdam3(src, tmp_path / "out", workers=0, progress=False)

    reports = prepare_potsdam3(src, tmp_path / "out", splits=["train"], workers=0, progress=False)

    printed = capsys.readouterr().out
    assert "source images: 4, skipped: 3" in printed, printed
    reasons = {s.source: s.reason for s in reports["train"].skipped}
    assert "no label" in reasons["imgs/2.mat"]
    assert "label 3.mat is 8×7 but the image is 8×8" in reasons["imgs/3.mat"]
    assert "outside 0..255" in reasons["imgs/4.mat"]
    assert all(source in printed for source in reasons)
    (row,) = read_split(tmp_path / "out", "train")
    assert (row["label"] == 2).all()
    with pytest.raises(DataError, match="no label"):
        prepare_potsdam3(src, tmp_path / "strict", splits=["train"], strict=True, workers=0, progress=False)
