"""MaskDistill's Table 3 scoring (``dist_seg.eval.instances``): COCOeval in the paper's three settings.

Constructed ground truth and predictions: perfect predictions score 100; perturbed ones score what a
direct ``pycocotools`` COCOeval call on the same files gives; the single-object rule and the Hungarian
matching pick the objects and classes the construction implies.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dist_seg.data.instances import encode_rle, instance_annotation
from dist_seg.eval.instances import coco_ap, evaluate_instances, match_clusters, single_object

H, W = 40, 50
# (image, class, (y0, y1, x0, x1)): two classes, 1 to 3 objects per image, image 3 has none.
OBJECTS = [(0, 1, (2, 14, 3, 20)), (0, 2, (20, 36, 25, 45)), (1, 2, (5, 30, 5, 30)), (2, 1, (0, 10, 0, 10)),
           (2, 1, (15, 35, 10, 28)), (2, 2, (12, 22, 32, 48))]


def _mask(box, dy: int = 0, dx: int = 0) -> np.ndarray:
    y0, y1, x0, x1 = box
    m = np.zeros((H, W), bool)
    m[max(0, y0 + dy):y1 + dy, max(0, x0 + dx):x1 + dx] = True
    return m


def _gt() -> dict:
    anns = [instance_annotation(_mask(box), ann_id=i + 1, image_id=img, category_id=cat)
            for i, (img, cat, box) in enumerate(OBJECTS)]
    return {"images": [{"id": i, "width": W, "height": H} for i in range(4)], "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _det(image_id, cluster_id, mask, score) -> dict:
    return {"image_id": image_id, "category_id": cluster_id, "score": score, "segmentation": encode_rle(mask)}


CLUSTER_OF = {1: 2, 2: 1}  # class -> the cluster id (category_id) that predicts it: a permutation


def _direct(tmp_path, gt: dict, dets: list, *, use_cats: bool) -> list[float]:
    """COCOeval as its documentation runs it: COCO(json file), loadRes(results file)."""
    gt_file, det_file = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_file.write_text(json.dumps(gt))
    det_file.write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        ev = COCOeval(coco, coco.loadRes(str(det_file)), iouType="segm")
        ev.params.useCats = int(use_cats)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [round(float(v) * 100, 4) for v in ev.stats[:3]]


def test_predictions_equal_to_the_ground_truth_score_100():
    gt = _gt()
    dets = [_det(img, CLUSTER_OF[cat], _mask(box), 0.9 - 0.1 * i) for i, (img, cat, box) in enumerate(OBJECTS)]
    res = evaluate_instances(gt, dets)
    for setting in ("agnostic_multi", "semantic_multi", "semantic_single"):
        assert res[setting]["AP50"] == 100.0 and res[setting]["AP"] == 100.0, (setting, res[setting])
    assert res["cluster_to_class"] == {"1": 2, "2": 1} and res["unmatched_clusters"] == []
    assert (res["num_images"], res["num_objects"], res["num_predictions"], res["outside_gt"]) == (4, 6, 6, 0)


def _perturbed() -> list[dict]:
    """Shifted masks, a missing object, an extra detection, a wrong cluster, an empty image's false positive."""
    d = [_det(0, CLUSTER_OF[1], _mask(OBJECTS[0][2], dy=2), 0.95),     # shifted by 2 px (IoU ~.8)
         _det(0, CLUSTER_OF[2], _mask(OBJECTS[1][2], dx=6), 0.6),      # shifted by 6 px (IoU ~.54)
         # object 3 (image 1) missing
         _det(2, CLUSTER_OF[1], _mask(OBJECTS[3][2]), 0.7),
         _det(2, CLUSTER_OF[2], _mask(OBJECTS[4][2]), 0.8),           # wrong cluster for a class-1 object
         _det(2, CLUSTER_OF[2], _mask(OBJECTS[5][2], dy=1), 0.5),
         _det(2, CLUSTER_OF[1], _mask((30, 40, 30, 50)), 0.85),        # extra: nothing there
         _det(3, CLUSTER_OF[1], _mask((5, 15, 5, 15)), 0.3)]           # on an image without objects
    return d


def test_perturbed_predictions_score_what_cocoeval_gives(tmp_path):
    gt, dets = _gt(), _perturbed()
    res = evaluate_instances(gt, copy.deepcopy(dets))
    agnostic = [res["agnostic_multi"][k] for k in ("AP", "AP50", "AP75")]
    assert agnostic == _direct(tmp_path, gt, dets, use_cats=False)
    assert 0 < agnostic[1] < 100 and agnostic[2] < agnostic[1], "the perturbations must cost something"
    # Semantic: the matching undoes the permutation (most IoU lies on the right pairs), then COCOeval per class.
    assert res["cluster_to_class"] == {"1": 2, "2": 1}
    renamed = [{**d, "category_id": {v: k for k, v in CLUSTER_OF.items()}[d["category_id"]]} for d in dets]
    assert [res["semantic_multi"][k] for k in ("AP", "AP50", "AP75")] == _direct(tmp_path, gt, renamed, use_cats=True)
    assert res["semantic_multi"]["AP50"] < agnostic[1], "the wrong cluster costs AP only when classes count"
    # Single: per image the top detection against its object of largest box IoU.
    single_gt, single_dets = single_object(gt, renamed)
    assert [res["semantic_single"][k] for k in ("AP", "AP50", "AP75")] == _direct(tmp_path, single_gt, single_dets,
                                                                                 use_cats=True)


def test_single_object_rule_picks_the_object_of_largest_box_iou():
    gt = _gt()
    dets = [_det(0, 1, _mask(OBJECTS[1][2], dy=3), 0.9),   # top of image 0: overlaps object 2 only
            _det(0, 1, _mask(OBJECTS[0][2]), 0.8),         # a perfect mask of object 1, but less confident
            _det(2, 1, _mask((12, 30, 12, 40)), 0.7),      # box overlaps objects 5 (IoU .37) and 6 (IoU .14)
            _det(3, 1, _mask((0, 5, 0, 5)), 0.9)]          # image 3 has no object: it leaves the evaluation
    single_gt, kept = single_object(gt, dets)
    assert [a["id"] for a in single_gt["annotations"]] == [2, 3, 5], "image 1 without detection keeps object 3"
    assert [im["id"] for im in single_gt["images"]] == [0, 1, 2]
    assert [(d["image_id"], d["score"]) for d in kept] == [(0, 0.9), (2, 0.7)]
    # Box IoU, not mask IoU: an L-shaped object whose box holds the detection wins over a closer-masked one.
    gt2 = {"images": [{"id": 0, "width": W, "height": H}], "categories": [{"id": 1, "name": "a"}]}
    ell = np.zeros((H, W), bool)
    ell[0:30, 0:4] = True
    ell[26:30, 0:30] = True
    square = _mask((10, 20, 10, 20))
    gt2["annotations"] = [instance_annotation(square, ann_id=1, image_id=0, category_id=1),
                          instance_annotation(ell, ann_id=2, image_id=0, category_id=1)]
    det = _mask((4, 26, 4, 26))  # box IoU with the square .21, with the L's box .54; mask IoU the other way
    single_gt, _ = single_object(gt2, [_det(0, 1, det, 1.0)])
    assert [a["id"] for a in single_gt["annotations"]] == [2]


def test_hungarian_matching_and_unmatched_clusters(tmp_path):
    gt = _gt()
    dets = [_det(img, CLUSTER_OF[cat], _mask(box), 0.9) for img, cat, box in OBJECTS]
    dets.append(_det(0, 7, _mask(OBJECTS[0][2], dx=1), 0.95))  # a third cluster, weaker on class 1 than cluster 2
    mapping, matrix = match_clusters(gt, dets)
    assert mapping == {1: 2, 2: 1} and matrix.shape == (3, 2)
    np.testing.assert_allclose(matrix[0], [0, 3.0]), "cluster 1: three exact class-2 masks"
    res = evaluate_instances(gt, dets)
    assert res["unmatched_clusters"] == [7]
    # Cluster 7 has no class: its detection counts in no class's AP (as COCOeval treats an unknown category).
    kept = [{**d, "category_id": {2: 1, 1: 2}[d["category_id"]]} for d in dets if d["category_id"] != 7]
    assert [res["semantic_multi"][k] for k in ("AP", "AP50", "AP75")] == _direct(tmp_path, gt, kept, use_cats=True)


def test_edge_cases_no_detections_and_outside_images():
    gt = _gt()
    assert coco_ap(gt, [], use_cats=False) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    empty = {**gt, "annotations": []}
    assert coco_ap(empty, [_det(0, 1, _mask((0, 5, 0, 5)), 1.0)], use_cats=False)["AP50"] is None
    res = evaluate_instances(gt, [_det(9, 1, _mask((0, 5, 0, 5)), 1.0)], semantic=False)
    assert res["outside_gt"] == 1 and res["agnostic_multi"]["AP50"] == 0.0 and res["semantic_multi"] is None


@pytest.mark.parametrize("counts_type", [str, bytes])
def test_rle_counts_as_str_or_bytes(counts_type):
    gt = _gt()
    dets = [_det(img, 1, _mask(box), 1.0) for img, _, box in OBJECTS]
    for d in dets:
        d["segmentation"]["counts"] = counts_type(d["segmentation"]["counts"], "ascii") if counts_type is bytes \
            else d["segmentation"]["counts"]
    assert coco_ap(gt, dets, use_cats=False)["AP50"] == 100.0


# ------------------------------------------------------------------------------------------ stage / CLI
def test_eval_instances_command_scores_every_product_and_tracks_it(tmp_path, capsys):
    """``dist-seg eval-instances``: each miner's masks and the candidates of a toy_objects split, from files."""
    import mlflow

    from dist_seg.cli import main
    from dist_seg.data.instances import read_instances
    from dist_seg.data.toy_objects import generate_toy_objects

    root, work, out = tmp_path / "data", tmp_path / "work", tmp_path / "run"
    generate_toy_objects(root, num_classes=2, num_train=6, num_val=2, size=48)
    gt = read_instances(root, "train")
    anns = gt["annotations"]
    # MaskDistill's masks: every object, named (clusters swap the classes); dino's: unnamed, first object only.
    named = [{**a, "cluster": 2 - a["category_id"], "category_id": 3 - a["category_id"]} for a in anns]
    work.mkdir()
    (work / "masks_train.json").write_text(json.dumps({"info": {"name": {"num_clusters": 2}}, "annotations": named}))
    first = {}
    for a in anns:
        first.setdefault(a["image_id"], {**a, "category_id": 1})
    (work / "masks_dino_train.json").write_text(json.dumps({"info": {}, "annotations": list(first.values())}))
    cands = [{"image_id": a["image_id"], "category_id": 3 - a["category_id"], "score": 0.5,
              "segmentation": a["segmentation"]} for a in anns]
    (work / "candidates_train.json").write_text(json.dumps({"info": {}, "candidates": cands}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.root={root}", f"maskdistill.work_dir={work}", f"train.output_dir={out}",
                 f"tracking.uri={uri}", "tracking.run_name=t"]
    assert main(["eval-instances", "maskdistill_toy", *overrides]) == 0
    text = capsys.readouterr().out
    assert "| masks (maskdistill) | " in text and "| masks (dino) |" in text and "Mask R-CNN candidates" in text
    rows = {r["product"]: r for r in json.loads((out / "maskdistill_instances.json").read_text())["instances"]}
    assert set(rows) == {"masks (maskdistill)", "masks (dino)", "Mask R-CNN candidates (†)"}
    for product in ("masks (maskdistill)", "Mask R-CNN candidates (†)"):
        assert all(rows[product][s]["AP50"] == 100.0 for s in ("agnostic_multi", "semantic_single", "semantic_multi"))
    dino = rows["masks (dino)"]
    assert dino["semantic_multi"] is None and dino["semantic_single"] is None, "unnamed masks: class-agnostic only"
    assert dino["agnostic_multi"] == coco_ap(gt, [{**a, "score": 1.0} for a in first.values()], use_cats=False)
    assert len(first) < len(anns) and dino["agnostic_multi"]["AP50"] < 100.0, "dino missed the other objects"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert runs["metrics.instances/masks_maskdistill/agnostic_multi/AP50"].tolist() == [100.0]
    assert runs["metrics.instances/masks_dino/agnostic_multi/AP"].tolist() == [dino["agnostic_multi"]["AP"]]
    # A split without instance ground truth, and a work dir without masks, are one-line errors.
    assert main(["eval-instances", "maskdistill_toy", *overrides, "--split", "nope"]) == 2
    assert "no instance ground truth for split 'nope'" in capsys.readouterr().err
    assert main(["eval-instances", "maskdistill_toy", *overrides[:1], f"maskdistill.work_dir={tmp_path / 'empty'}",
                 *overrides[2:], "tracking.enabled=false"]) == 2
    assert "dist-seg masks RECIPE --split train" in capsys.readouterr().err


def test_several_splits_are_scored_as_one_set(tmp_path):
    """VOC's object set spans trainaug and val: ``--split trainaug --split val`` scores their union."""
    from dist_seg.config import RunConfig, merge
    from dist_seg.data.instances import read_instances
    from dist_seg.data.toy_objects import generate_toy_objects
    from dist_seg.pipeline import instances_stage

    root, work, out = tmp_path / "data", tmp_path / "work", tmp_path / "run"
    generate_toy_objects(root, num_classes=2, num_train=4, num_val=3, size=48)
    work.mkdir()
    gts = {s: read_instances(root, s) for s in ("train", "val")}
    dets = {"train": [{**a, "score": 1.0} for a in gts["train"]["annotations"]],  # perfect
            "val": [{**a, "score": 1.0} for a in gts["val"]["annotations"] if a["id"] % 2]}  # half missing
    for split in ("train", "val"):
        (work / f"candidates_{split}.json").write_text(json.dumps({"info": {}, "candidates": dets[split]}))
    cfg = merge(RunConfig(), overrides=[f"data.root={root}", f"maskdistill.work_dir={work}", f"train.output_dir={out}",
                                        "tracking.enabled=false"])
    path = instances_stage(cfg, split=["train", "val"])
    assert path.name == "maskdistill_instances_train+val.json"
    (row,) = json.loads(path.read_text())["instances"]
    union = {"images": gts["train"]["images"] + [{**im, "id": im["id"] + 1000} for im in gts["val"]["images"]],
             "annotations": gts["train"]["annotations"] + [{**a, "id": a["id"] + 1000, "image_id": a["image_id"] + 1000}
                                                           for a in gts["val"]["annotations"]],
             "categories": gts["train"]["categories"]}
    union_dets = dets["train"] + [{**d, "image_id": d["image_id"] + 1000} for d in dets["val"]]
    assert row["num_images"] == 7 and row["num_objects"] == len(union["annotations"]) and row["split"] == "train+val"
    assert row["agnostic_multi"] == coco_ap(union, union_dets, use_cats=False)
    assert 0 < row["agnostic_multi"]["AP50"] < 100
