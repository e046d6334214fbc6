"""SPEC §8.2 naming: crop CLS features, whitening, MiniBatchKMeans, the with-GT parity option, the CLI.

The masks files here are written by hand (boxes of known content) in the format ``dist-seg masks`` writes,
so the clusters have a known answer; the last test runs both stages from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dist_seg.maskdistill.files import MaskDistillFileError, write_json_atomic
from dist_seg.maskdistill.mining import encode_mask


def _image(kind: int, index: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 24×32 image with one 12×14 box of kind 0 (flat red) or 1 (black/white checkerboard) on grey noise."""
    image = (110 + 30 * rng.random((24, 32, 3))).astype(np.uint8)
    y, x = 2 + index % 9, 3 + (2 * index) % 15
    if kind == 0:
        image[y:y + 12, x:x + 14] = (220, 30, 30)
    else:
        board = ((np.arange(12)[:, None] // 2 + np.arange(14)[None, :] // 2) % 2 * 255).astype(np.uint8)
        image[y:y + 12, x:x + 14] = board[..., None]
    box = np.zeros((24, 32), bool)
    box[y:y + 12, x:x + 14] = True
    label = np.where(box, kind + 1, 0).astype(np.uint8)
    return image, label, box


def _dataset(root: Path, num: int, seed: int) -> list[int]:
    """Write a labelled dataset (3 classes: background + 2 kinds) and its hand-made masks file; return kinds."""
    from dist_seg.data.manifest import update_split
    from dist_seg.data.shards import Sample, write_split

    rng = np.random.default_rng(seed)
    kinds = [int(k) for k in rng.permutation(np.arange(num) % 2)]
    samples, images, annotations = [], [], []
    for i, kind in enumerate(kinds):
        image, label, box = _image(kind, i, rng)
        samples.append(Sample(image=image, label=label, source=f"img-{i}"))
        images.append({"id": i, "key": f"{i:09d}", "width": 32, "height": 24})
        annotations.append({"id": i + 1, "image_id": i, "category_id": 1, "iscrowd": 0, **encode_mask(box)})
    info = write_split(samples, root, "train", samples_per_shard=5, image_format="png")
    update_split(root, "train", info, name="two_kinds", num_classes=3, class_names=None, colors=None)
    write_json_atomic({"info": {"stage": "masks", "split": "train"}, "images": images, "annotations": annotations,
                       "categories": [{"id": 1, "name": "object", "supercategory": ""}]},
                      root / "maskdistill" / "masks_train.json")
    return kinds


def _cfg(root: Path, **name):
    from dist_seg.config import RunConfig

    cfg = RunConfig()
    cfg.data.root = str(root)
    cfg.maskdistill.name.backbone = "toy"
    for key, value in name.items():
        setattr(cfg.maskdistill.name, key, value)
    return cfg


def _named(path: Path) -> tuple[list[int], dict]:
    data = json.loads(path.read_text())
    clusters = [ann["cluster"] for ann in data["annotations"]]
    assert [ann["category_id"] for ann in data["annotations"]] == [c + 1 for c in clusters]
    return clusters, data


def test_two_kinds_of_crops_form_two_clusters(tmp_path):
    from dist_seg.maskdistill.naming import name_masks

    kinds = _dataset(tmp_path / "data", 12, seed=0)
    path = name_masks(_cfg(tmp_path / "data"))
    clusters, data = _named(path)
    assert len(set(clusters)) == 2, f"K comes from the manifest (3 classes - background): {clusters}"
    assert all((a == b) == (ka == kb) for a, ka in zip(clusters, kinds) for b, kb in zip(clusters, kinds)), \
        f"clusters {clusters} do not follow the crop kinds {kinds}"
    info = data["info"]["name"]
    assert info["num_clusters"] == 2 and info["with_gt"] is False and info["num_masks"] == 12
    assert info["kmeans"]["random_state"] == 1234 and info["backbone"] == "toy"
    assert [c["id"] for c in data["categories"]] == [1, 2]
    assert data["info"]["stage"] == "masks", "the mining provenance is kept"
    # A finished naming is kept; overwrite clusters again to the same result (fixed seed).
    before = path.stat().st_mtime_ns
    assert name_masks(_cfg(tmp_path / "data")) == path and path.stat().st_mtime_ns == before
    name_masks(_cfg(tmp_path / "data"), overwrite=True)
    assert _named(path)[0] == clusters


def test_with_gt_renames_clusters_to_classes_and_says_so(tmp_path):
    from dist_seg.maskdistill.naming import name_masks

    kinds = _dataset(tmp_path / "data", 12, seed=1)
    clusters, data = _named(name_masks(_cfg(tmp_path / "data", with_gt=True)))
    assert [c + 1 for c in clusters] == [k + 1 for k in kinds], "category_id = the matched GT class"
    assert data["info"]["name"]["with_gt"] is True and set(data["info"]["name"]["gt_mapping"].values()) == {1, 2}


def test_support_set_is_used_for_fitting_only(tmp_path):
    from dist_seg.maskdistill.naming import name_masks

    kinds = _dataset(tmp_path / "data", 6, seed=2)
    _dataset(tmp_path / "support", 8, seed=3)
    clusters, data = _named(name_masks(_cfg(tmp_path / "data", support_root=str(tmp_path / "support"))))
    assert len(clusters) == 6 and data["info"]["name"]["num_support_masks"] == 8
    assert all((a == b) == (ka == kb) for a, ka in zip(clusters, kinds) for b, kb in zip(clusters, kinds))
    assert data["info"]["name"]["support"]["root"] == str(tmp_path / "support")


def test_cluster_descriptors_whitens_and_normalises():
    from dist_seg.maskdistill.naming import cluster_descriptors

    rng = np.random.default_rng(0)
    # Two groups apart along dimension 0, whose scale is tiny next to dimension 1's noise: without per-
    # dimension whitening the noise would dominate; after it the groups separate.
    group = np.repeat([0, 1], 20)
    features = np.stack([1e-3 * group + 1e-5 * rng.standard_normal(40), 1.0 + 0.05 * rng.standard_normal(40)], 1)
    clusters = cluster_descriptors(features, 2)
    assert len(set(clusters[:20])) == 1 and len(set(clusters[20:])) == 1 and clusters[0] != clusters[-1]
    with pytest.raises(ValueError, match="cannot form 5 clusters"):
        cluster_descriptors(features[:3], 5)


def test_missing_masks_file_names_the_masks_stage(tmp_path, capsys):
    from dist_seg.cli import main
    from dist_seg.data.manifest import update_split
    from dist_seg.data.shards import Sample, write_split
    from dist_seg.maskdistill.naming import name_masks

    info = write_split([Sample(image=np.zeros((8, 8, 3), np.uint8), label=None, source="x")], tmp_path, "train")
    update_split(tmp_path, "train", info, name="one", num_classes=None, class_names=None, colors=None)
    with pytest.raises(MaskDistillFileError, match="dist-seg masks"):
        name_masks(_cfg(tmp_path))
    assert main(["name", "stego_toy", f"data.root={tmp_path}", "maskdistill.name.backbone=toy"]) == 2
    # (log records of earlier tests may reach stderr too: look at the error lines only)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dist-seg masks" in errors[0]


@pytest.mark.slow
def test_masks_then_name_from_the_command_line(tmp_path, capsys):
    from dist_seg.cli import main

    _dataset(tmp_path / "data", 8, seed=4)
    (tmp_path / "data" / "maskdistill" / "masks_train.json").unlink()
    common = ["stego_toy", f"data.root={tmp_path / 'data'}"]
    assert main(["masks", *common, "maskdistill.mine.backbone=toy", "maskdistill.mine.heads=2",
                 "maskdistill.mine.short_side=48"]) == 0
    assert main(["name", *common, "maskdistill.name.backbone=toy"]) == 0
    assert "8 masks in 2 clusters" in capsys.readouterr().out
    data = json.loads((tmp_path / "data" / "maskdistill" / "masks_train.json").read_text())
    assert data["info"]["stage"] == "masks" and data["info"]["name"]["num_clusters"] == 2
    assert {ann["category_id"] for ann in data["annotations"]} <= {1, 2}
