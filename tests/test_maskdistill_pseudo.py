"""Pseudo-labels from scored candidates (SPEC §8.4): the rules on constructed detections, and the stage."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dist_seg.cli import main
from dist_seg.config import DataConfig, RunConfig, merge
from dist_seg.data.instances import encode_rle, read_instances
from dist_seg.data.manifest import DataError, read_manifest
from dist_seg.data.shards import IndexedShards
from dist_seg.data.toy_objects import generate_toy_objects
from dist_seg.maskdistill.config import MaskDistillConfig
from dist_seg.maskdistill.pseudo import masks_label_map, pseudo_label_map, pseudo_up_to_date

H, W = 12, 16


def _box(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _det(mask, score, category):
    return {"score": score, "category_id": category, "segmentation": encode_rle(mask), "bbox": [0, 0, 1, 1]}


A, B, C = _box(0, 4, 0, 4), _box(6, 10, 0, 4), _box(0, 4, 8, 12)


def test_threshold_keeps_confident_detections_only():
    label, info = pseudo_label_map([_det(A, 0.95, 1), _det(B, 0.9, 2), _det(C, 0.89, 3)], H, W, threshold=0.9)
    expected = np.zeros((H, W), np.uint8)
    expected[A], expected[B] = 1, 2  # score == tau is kept; 0.89 is not
    assert np.array_equal(label, expected)
    assert info == {"detections": 3, "kept": 2, "fallback": False, "painted": 2, "dropped_overlap": 0,
                    "empty": False}
    assert label.dtype == np.uint8 and label.shape == (H, W)


def test_fallback_keeps_only_the_best_when_none_passes():
    label, info = pseudo_label_map([_det(A, 0.3, 1), _det(B, 0.6, 2), _det(C, 0.5, 3)], H, W, threshold=0.9)
    expected = np.zeros((H, W), np.uint8)
    expected[B] = 2
    assert np.array_equal(label, expected)
    assert info["fallback"] and info["kept"] == 1 and info["painted"] == 1


def test_overlapping_mask_is_dropped_whole():
    overlap = _box(3, 8, 2, 7)  # shares pixels with A, mostly on free pixels
    label, info = pseudo_label_map([_det(overlap, 0.93, 2), _det(A, 0.99, 1), _det(C, 0.91, 3)], H, W)
    expected = np.zeros((H, W), np.uint8)
    expected[A], expected[C] = 1, 3
    assert np.array_equal(label, expected), "the less confident overlapping mask must leave no pixel"
    assert info["dropped_overlap"] == 1 and info["painted"] == 2
    # Touching is not overlapping: adjacent masks are both painted.
    adjacent = _box(4, 6, 0, 4)
    label, info = pseudo_label_map([_det(A, 0.99, 1), _det(adjacent, 0.95, 2)], H, W)
    assert (label == 2).sum() == adjacent.sum() and info["dropped_overlap"] == 0


def test_sorting_by_score_regardless_of_input_order():
    dets = [_det(A, 0.91, 1), _det(_box(2, 6, 2, 6), 0.97, 2), _det(C, 0.95, 3), _det(_box(0, 2, 9, 14), 0.92, 4)]
    ref, _ = pseudo_label_map(dets, H, W)
    assert (ref == 2).sum() == 16 and not (ref == 1).any(), "0.97 wins over the earlier-listed 0.91"
    assert not (ref == 4).any() and (ref == 3).sum() == 16
    rng = np.random.default_rng(0)
    for _ in range(5):
        perm = [dets[i] for i in rng.permutation(len(dets))]
        assert np.array_equal(pseudo_label_map(perm, H, W)[0], ref)
    # Equal scores: the earlier detection in the input wins (stable sort).
    tie, _ = pseudo_label_map([_det(A, 0.95, 5), _det(_box(1, 3, 1, 3), 0.95, 6)], H, W)
    assert set(np.unique(tie)) == {0, 5}


def test_empty_image_and_bad_input():
    label, info = pseudo_label_map([], H, W)
    assert not label.any() and info["empty"] and info["painted"] == 0 and not info["fallback"]
    with pytest.raises(DataError, match="category_id"):
        pseudo_label_map([_det(A, 0.95, 0)], H, W)
    with pytest.raises(DataError, match="category_id"):
        pseudo_label_map([_det(A, 0.95, 255)], H, W)
    with pytest.raises(DataError, match="RLE of size"):
        pseudo_label_map([_det(_box(0, 2, 0, 2, h=8, w=8), 0.95, 1)], H, W)
    with pytest.raises(DataError, match="lacks"):
        pseudo_label_map([{"score": 0.99, "category_id": 1}], H, W)
    with pytest.raises(ValueError, match="threshold"):
        pseudo_label_map([], H, W, threshold=1.5)
    # Category ids are painted as given (cluster + 1), up to 254.
    label, _ = pseudo_label_map([_det(A, 0.95, 254)], H, W)
    assert set(np.unique(label)) == {0, 254}


def test_masks_label_map_paints_named_masks():
    anns = [{"segmentation": encode_rle(A), "category_id": 3}, {"segmentation": encode_rle(_box(2, 5, 2, 5)),
                                                                "category_id": 1}]
    label = masks_label_map(anns, H, W)
    expected = np.zeros((H, W), np.uint8)
    expected[A] = 3
    assert np.array_equal(label, expected)
    with pytest.raises(DataError, match="dist-seg name"):
        masks_label_map([{"segmentation": encode_rle(A)}], H, W)


# -------------------------------------------------------------------------------------------- the stage
@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids-cache"))
    root = tmp_path / "data"
    generate_toy_objects(root, num_classes=3, num_train=6, num_val=3, size=32, samples_per_shard=4, seed=0)
    work = tmp_path / "work"
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "from dist_seg.config import DataConfig, RunConfig\n"
        "from dist_seg.maskdistill.config import MaskDistillConfig\n\n\n"
        "def config():\n"
        f"    return RunConfig(method='maskdistill', data=DataConfig(dataset='toy_objects', root={str(root)!r}),\n"
        f"                     maskdistill=MaskDistillConfig(work_dir={str(work)!r}))\n")
    return root, work, recipe


def _sq(y, x, s=8, n=32):
    return _box(y, y + s, x, x + s, n, n)


def _candidates():
    """Hand-written candidates for 6 images of 32×32; image 2 has none, image 3 only a weak one."""
    dets = [
        (0, _sq(0, 0), 0.99, 1), (0, _sq(4, 4), 0.95, 2), (0, _sq(20, 20), 0.92, 3),  # overlap: 2nd dropped
        (1, _sq(10, 10), 0.97, 2),
        (3, _sq(0, 20), 0.4, 3), (3, _sq(20, 0), 0.2, 1),  # fallback: only the 0.4
        (4, _sq(5, 5), 0.91, 1), (4, _sq(20, 20), 0.5, 2),
        (5, _sq(12, 0), 0.93, 3),
    ]
    return [{"image_id": i, "category_id": c, "score": s, "bbox": [0, 0, 8, 8], "segmentation": encode_rle(m)}
            for i, m, s, c in dets]


def _expected_maps():
    maps = np.zeros((6, 32, 32), np.uint8)
    maps[0][_sq(0, 0)], maps[0][_sq(20, 20)] = 1, 3
    maps[1][_sq(10, 10)] = 2
    maps[3][_sq(0, 20)] = 3
    maps[4][_sq(5, 5)] = 1
    maps[5][_sq(12, 0)] = 3
    return maps


def _members(split_dir: Path) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


@pytest.mark.slow
def test_cli_pseudo_writes_a_prepared_dataset_and_resumes(toy, tmp_path, capsys):
    root, work, recipe = toy
    work.mkdir()
    (work / "candidates_train.json").write_text(json.dumps(_candidates()))
    out = tmp_path / "pseudo"
    assert main(["pseudo", str(recipe), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "6 images, 1 without detections, 1 kept only their best detection" in text

    manifest = read_manifest(out)
    assert manifest.name == "toy_objects_pseudo" and manifest.num_classes == 4
    assert manifest.class_names == ["background", "cluster0", "cluster1", "cluster2"]
    counts = manifest.extra["pseudo"]["counts"]
    assert counts == {"images": 6, "empty_images": 1, "fallback_images": 1, "detections": 9, "kept": 7,
                      "painted": 6, "dropped_overlap": 1}
    assert manifest.extra["pseudo"]["val_split"] == "val"
    shards = IndexedShards(out, "train", res=32)
    source = IndexedShards(root, "train", res=32)
    expected = _expected_maps()
    for i in range(6):
        assert np.array_equal(shards[i]["label"].numpy(), expected[i].astype(np.int64)), f"image {i}"
        assert np.array_equal(shards[i]["image"].numpy(), source[i]["image"].numpy())
    # Images are copied byte for byte; only the label slot differs.
    got, src = _members(out / "train"), _members(root / "train")
    assert {k for k in got if k.endswith(".png") and not k.endswith(".label.png")} == \
        {k for k in src if k.endswith(".png") and not k.endswith(".label.png")}
    assert all(got[k] == src[k] for k in src if k.endswith(".png") and not k.endswith(".label.png"))
    assert json.loads(got["000000000.json"])["pseudo"] == {"detections": 3, "painted": 2, "dropped_overlap": 1,
                                                           "fallback": False}
    # The val split keeps its ground truth for validation.
    assert _members(out / "val") == _members(root / "val")
    assert manifest.split("val") == read_manifest(root).split("val")

    # Same candidates and threshold: kept as is. Another threshold: rewritten.
    stamp = (out / "train" / "wids.json").stat().st_mtime_ns
    assert main(["pseudo", str(recipe), "--out", str(out)]) == 0
    assert (out / "train" / "wids.json").stat().st_mtime_ns == stamp
    assert read_manifest(out).extra["pseudo"]["counts"] == counts
    capsys.readouterr()
    assert main(["pseudo", str(recipe), "--out", str(out), "maskdistill.pseudo.threshold=0.3"]) == 0
    new = read_manifest(out).extra["pseudo"]
    assert new["threshold"] == 0.3 and new["counts"]["kept"] == 8 and new["counts"]["fallback_images"] == 0


def test_cli_pseudo_errors_are_one_line(toy, tmp_path, capsys):
    root, work, recipe = toy
    assert main(["pseudo", str(recipe), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert "dist-seg detect RECIPE" in err and "\n" not in err
    work.mkdir()
    (work / "candidates_train.json").write_text(json.dumps([{**_candidates()[0], "image_id": 6}]))
    assert main(["pseudo", str(recipe), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert "image_id 6" in err and "another dataset" in err and "\n" not in err
    (work / "candidates_train.json").write_text(json.dumps([{**_candidates()[0], "category_id": 4}]))
    assert main(["pseudo", str(recipe), "--out", str(tmp_path / "p")]) == 2
    assert "outside 1..3" in capsys.readouterr().err
    bad = _candidates()[0]
    bad["segmentation"] = encode_rle(np.zeros((16, 16), bool))
    (work / "candidates_train.json").write_text(json.dumps([bad]))
    assert main(["pseudo", str(recipe), "--out", str(tmp_path / "p")]) == 2
    assert "RLE of size [16, 16]" in capsys.readouterr().err
    assert not (tmp_path / "p" / "train").exists(), "a failed run must not leave a split that looks complete"


@pytest.mark.slow
def test_pseudo_run_killed_before_its_manifest_is_redone_and_up_to_date_check(toy, tmp_path):
    root, work, recipe = toy
    work.mkdir()
    (work / "candidates_train.json").write_text(json.dumps(_candidates()))
    out = tmp_path / "pseudo"
    cfg = RunConfig(method="maskdistill", data=DataConfig(dataset="toy_objects", root=str(root)),
                    maskdistill=MaskDistillConfig(work_dir=str(work)))
    assert not pseudo_up_to_date(cfg, out_root=out)
    assert main(["pseudo", str(recipe), "--out", str(out)]) == 0
    assert pseudo_up_to_date(cfg, out_root=out)
    assert not pseudo_up_to_date(merge(cfg, overrides=["maskdistill.pseudo.threshold=0.5"]), out_root=out)
    want = read_manifest(out)
    labels = _members(out / "train")
    (out / "manifest.json").unlink()  # as if killed after the shards, before the manifest
    assert not pseudo_up_to_date(cfg, out_root=out)
    assert main(["pseudo", str(recipe), "--out", str(out)]) == 0
    assert pseudo_up_to_date(cfg, out_root=out)
    got = read_manifest(out)
    assert got.extra["pseudo"]["counts"] == want.extra["pseudo"]["counts"] and got.splits == want.splits
    assert _members(out / "train") == labels


def test_ground_truth_instances_as_candidates_give_the_ground_truth_labels(toy, tmp_path):
    # A perfect detector: every toy object, score 1, its own class as the cluster. The toy objects never
    # overlap, so the pseudo-labels must be exactly the ground-truth label maps.
    root, work, recipe = toy
    work.mkdir()
    gt = read_instances(root, "train")
    candidates = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": a["bbox"],
                   "segmentation": a["segmentation"]} for a in gt["annotations"]]
    (work / "candidates_train.json").write_text(json.dumps(candidates))
    out = tmp_path / "pseudo"
    assert main(["pseudo", str(recipe), "--out", str(out)]) == 0
    counts = read_manifest(out).extra["pseudo"]["counts"]
    assert counts["painted"] == len(candidates) and counts["dropped_overlap"] == 0 and counts["empty_images"] == 0
    got, src = IndexedShards(out, "train", res=32), IndexedShards(root, "train", res=32)
    for i in range(6):
        assert np.array_equal(got[i]["label"].numpy(), src[i]["label"].numpy())
