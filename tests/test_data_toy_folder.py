"""Toy generator, folder converter and the `dist-seg prepare` command."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dist_seg.cli import main
from dist_seg.data.folder import prepare_folder
from dist_seg.data.manifest import DataError, read_manifest
from dist_seg.data.shards import IndexedShards, make_loader
from dist_seg.data.toy import generate_toy, toy_sample

SMALL = dict(num_classes=4, num_train=24, num_val=8, size=32, samples_per_shard=4)


@pytest.fixture(autouse=True)
def _wids_cache(tmp_path, monkeypatch):
    # IndexedShards keeps its shard symlinks in $WIDS_CACHE; keep them inside the test's folder.
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids-cache"))


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ toy
def test_toy_is_deterministic_to_the_byte(tmp_path):
    generate_toy(tmp_path / "a", seed=7, **SMALL)
    generate_toy(tmp_path / "b", seed=7, **SMALL)
    generate_toy(tmp_path / "c", seed=8, **SMALL)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "same seed must give identical files"
    assert any(a[k] != c.get(k) for k in a if k.endswith(".tar")), "another seed must give other shards"


def test_toy_labels_classes_and_manifest(tmp_path):
    manifest = generate_toy(tmp_path, seed=1, **SMALL)
    assert manifest.name == "toy" and manifest.num_classes == 4
    assert manifest.class_names == ["toy0", "toy1", "toy2", "toy3"] and len(manifest.colors) == 4
    assert read_manifest(tmp_path) == manifest
    for split, count in (("train", 24), ("val", 8)):
        info = manifest.split(split)
        assert info.num_samples == count and info.has_labels
        assert len(info.class_pixels) == 4 and min(info.class_pixels) > 0, f"{split}: a class never occurs"
        assert info.ignore_pixels == 0
    loader, _ = make_loader(tmp_path, "val", batch_size=8, res=32, num_workers=0, shuffle=False, infinite=False)
    labels = np.concatenate([b["label"].numpy().ravel() for b in loader])
    assert labels.min() >= 0 and labels.max() < 4, "toy labels must be exact ids, no ignore"
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    # Images are stored losslessly: the shard holds exactly what the generator made.
    row = IndexedShards(tmp_path, "val", res=32)[5]
    sample = toy_sample(5, split="val", num_classes=4, size=32, seed=1)
    assert np.array_equal(row["image"].permute(1, 2, 0).numpy(), sample.image)
    assert np.array_equal(row["label"].numpy(), sample.label.astype(np.int64))


def test_toy_default_has_enough_shards_for_two_ranks_two_workers():
    from dist_seg.data import toy

    defaults = toy.generate_toy.__kwdefaults__
    shards = -(-defaults["num_train"] // defaults["samples_per_shard"])
    assert shards >= 8, f"default toy train split has {shards} shards, need >= 2 ranks x 2 workers x 2"


def test_toy_colour_alone_is_informative_but_not_enough():
    from sklearn.naive_bayes import GaussianNB

    samples = [toy_sample(i, split="train", num_classes=5, size=48, seed=0) for i in range(40)]
    x = np.concatenate([s.image.reshape(-1, 3) for s in samples]).astype(np.float64)
    y = np.concatenate([s.label.ravel() for s in samples])
    held = [toy_sample(i, split="val", num_classes=5, size=48, seed=0) for i in range(10)]
    xv = np.concatenate([s.image.reshape(-1, 3) for s in held]).astype(np.float64)
    yv = np.concatenate([s.label.ravel() for s in held])
    acc = GaussianNB().fit(x, y).score(xv, yv)
    majority = np.bincount(yv).max() / yv.size
    assert acc > majority + 0.1, f"pixel colour should carry class information (acc {acc:.2f}, majority {majority:.2f})"
    assert acc < 0.85, f"pixel colour alone should not solve the toy task (acc {acc:.2f})"


# --------------------------------------------------------------------------------------------- folder
def _write_images(folder, sizes, *, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)


def _write_labels(folder, sizes, *, num_classes=3, seed=1):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for stem, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, num_classes, (h, w)).astype(np.uint8), mode="L").save(folder / f"{stem}.png")


def test_folder_with_labels_five_crop_and_unreadable_images(tmp_path):
    src, labs = tmp_path / "img", tmp_path / "lab"
    _write_images(src, {"a.png": (20, 30), "b.jpg": (24, 24), "c.png": (30, 20)})
    (src / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (src / "notes.txt").write_text("ignored: not an image")
    _write_labels(labs, {"a": (20, 30), "b": (24, 24), "c": (30, 20), "broken": (8, 8)})
    manifest = prepare_folder(src, tmp_path / "out", labels_dir=labs, five_crop=True, samples_per_shard=4)
    info = manifest.split("train")
    assert info.num_samples == 15 and info.crop == "five" and info.has_labels
    assert manifest.num_classes == 3 and manifest.class_names == ["class0", "class1", "class2"]
    assert manifest.extra["unreadable"]["train"] == ["broken.jpg"], manifest.extra
    loader, _ = make_loader(tmp_path / "out", "train", batch_size=5, res=8, num_workers=0, shuffle=False,
                            infinite=False)
    assert sorted(i for b in loader for i in b["index"].tolist()) == list(range(15))


def test_folder_lists_images_without_labels(tmp_path):
    src, labs = tmp_path / "img", tmp_path / "lab"
    _write_images(src, {"a.png": (8, 8), "b.png": (8, 8), "c.png": (8, 8)})
    _write_labels(labs, {"b": (8, 8)})
    with pytest.raises(DataError, match="2 of 3 images") as err:
        prepare_folder(src, tmp_path / "out", labels_dir=labs)
    assert "a.png" in str(err.value) and "c.png" in str(err.value) and "b.png" not in str(err.value)
    assert not (tmp_path / "out" / "train").exists(), "nothing may be written when labels are missing"


def test_folder_lists_labels_of_the_wrong_size(tmp_path):
    src, labs = tmp_path / "img", tmp_path / "lab"
    _write_images(src, {"a.png": (8, 8), "b.png": (10, 12)})
    _write_labels(labs, {"a": (8, 8), "b": (12, 10)})
    with pytest.raises(DataError, match="do not match") as err:
        prepare_folder(src, tmp_path / "out", labels_dir=labs)
    assert "b.png: 10×12, image b.png: 12×10" in str(err.value), str(err.value)


def test_folder_rejects_ids_above_num_classes(tmp_path):
    src, labs = tmp_path / "img", tmp_path / "lab"
    _write_images(src, {"a.png": (8, 8)})
    _write_labels(labs, {"a": (8, 8)}, num_classes=5)
    with pytest.raises(DataError, match="num_classes=2"):
        prepare_folder(src, tmp_path / "out", labels_dir=labs, num_classes=2)


def test_folder_without_labels(tmp_path):
    _write_images(tmp_path / "img", {f"{i}.png": (9, 11) for i in range(5)})
    manifest = prepare_folder(tmp_path / "img", tmp_path / "out", split="val", samples_per_shard=2)
    assert manifest.num_classes is None and not manifest.split("val").has_labels


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_prepare_toy_and_folder(tmp_path, capsys):
    out = tmp_path / "toy"
    code = main(["prepare", "toy", "--out", str(out), "--num-train", "16", "--num-val", "4", "--size", "24",
                 "--num-classes", "3", "--samples-per-shard", "4"])
    assert code == 0
    manifest = read_manifest(out)
    assert manifest.num_classes == 3 and manifest.split("train").num_samples == 16
    assert len(manifest.split("train").shards) == 4
    printed = capsys.readouterr().out
    assert "train: 16 samples in 4 shards" in printed and "toy0" in printed, printed

    _write_images(tmp_path / "img", {"a.png": (8, 8)})
    (tmp_path / "lab").mkdir()
    code = main(["prepare", "folder", "--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
                 "--out", str(tmp_path / "f")])
    assert code == 1, "a user error must give exit code 1, not a traceback"
    assert "have no label" in capsys.readouterr().err
