"""The toy_objects generator (SPEC §8.7): objects of K classes on stuff backgrounds with exact masks."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools.coco import COCO

from dist_seg.cli import main
from dist_seg.data.instances import decode_rle, instances_path, read_instances
from dist_seg.data.manifest import read_manifest
from dist_seg.data.shards import IndexedShards
from dist_seg.data.toy_objects import MAX_OBJECTS, generate_toy_objects, toy_object_scene

SMALL = dict(num_classes=3, num_train=12, num_val=6, size=48, samples_per_shard=4)


@pytest.fixture(autouse=True)
def _wids_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids-cache"))


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_toy_objects_is_deterministic_to_the_byte(tmp_path):
    generate_toy_objects(tmp_path / "a", seed=3, **SMALL)
    generate_toy_objects(tmp_path / "b", seed=3, **SMALL)
    generate_toy_objects(tmp_path / "c", seed=4, **SMALL)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "same seed must give identical files"
    assert any(a[k] != c.get(k) for k in a if k.endswith(".tar")), "another seed must give other shards"


def test_scene_masks_are_exact_disjoint_and_match_the_label():
    for i in range(20):
        sample, instances = toy_object_scene(i, split="train", num_classes=4, size=64, seed=0)
        assert 1 <= len(instances) <= MAX_OBJECTS
        assert instances[0][1] == i % 4 + 1, "image i holds an object of class i mod K"
        painted = np.zeros(sample.label.shape, dtype=np.int64)
        for mask, category in instances:
            assert 1 <= category <= 4 and mask.any()
            assert not (painted[mask] > 0).any(), "objects must never overlap"
            painted[mask] = category
        assert np.array_equal(painted, sample.label), "the label map is exactly the union of the instances"
        # A texture boundary inside the background is not a label boundary: stuff is all class 0.
        assert set(np.unique(sample.label)) <= set(range(5))


def test_dataset_manifest_instances_and_shards(tmp_path):
    manifest = generate_toy_objects(tmp_path, seed=1, **SMALL)
    assert manifest.name == "toy_objects" and manifest.num_classes == 4
    assert manifest.class_names == ["background", "object1", "object2", "object3"]
    assert manifest.extra["background_id"] == 0 and manifest.extra["num_object_classes"] == 3
    assert manifest.extra["instances"] == {"train": "instances_train.json", "val": "instances_val.json"}
    for split, count in (("train", 12), ("val", 6)):
        info = manifest.split(split)
        assert info.num_samples == count and info.ignore_pixels == 0
        assert len(info.class_pixels) == 4 and min(info.class_pixels) > 0, f"{split}: a class never occurs"
        assert info.class_pixels[0] > sum(info.class_pixels[1:]), "background should dominate"
    # The instance ground truth is valid COCO, keyed by global record index, and matches the shards exactly.
    coco = COCO(str(instances_path(tmp_path, "val")))
    assert sorted(coco.getImgIds()) == list(range(6)) and sorted(coco.getCatIds()) == [1, 2, 3]
    shards = IndexedShards(tmp_path, "val", res=48)
    for image_id in range(6):
        label = shards[image_id]["label"].numpy()
        rebuilt = np.zeros_like(label)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            mask = decode_rle(ann["segmentation"], 48, 48)
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == mask.sum()
            rebuilt[mask] = ann["category_id"]
        assert np.array_equal(rebuilt, label)


def test_resume_rebuilds_missing_instances_without_touching_shards(tmp_path):
    generate_toy_objects(tmp_path, seed=2, **SMALL)
    before = _tree_bytes(tmp_path / "train")
    want = read_instances(tmp_path, "train")
    instances_path(tmp_path, "train").unlink()
    generate_toy_objects(tmp_path, seed=2, **SMALL)
    assert _tree_bytes(tmp_path / "train") == before
    assert read_instances(tmp_path, "train") == want


def test_cli_prepare_toy_objects(tmp_path, capsys):
    out = tmp_path / "objects"
    assert main(["prepare", "toy_objects", "--out", str(out), "--num-train", "8", "--num-val", "4",
                 "--num-classes", "2", "--size", "40", "--seed", "5", "--samples-per-shard", "4"]) == 0
    text = capsys.readouterr().out
    assert "dataset 'toy_objects': 3 classes" in text and "background" in text
    manifest = read_manifest(out)
    assert manifest.split("train").num_samples == 8 and len(manifest.split("train").shards) == 2
    assert manifest.extra["params"]["seed"] == 5
    assert main(["prepare", "toy_objects", "--out", str(tmp_path / "bad"), "--size", "8"]) == 1
    assert "--size >= 32" in capsys.readouterr().err
