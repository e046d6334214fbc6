"""Object masks scored against instance ground truth: MaskDistill's Table 3 (paper 003, appendix A.4).

COCO-style mask AP (``pycocotools.cocoeval.COCOeval``, ``iouType="segm"``; AP = AP@[.5:.95], AP50, AP75 at
100 detections per image, as percentages) in the paper's three settings:

* ``agnostic_multi`` (Table 3 a/b): every detection, classes disregarded (``useCats=0``);
* ``semantic_single`` (c/d): per image only the most confident detection, scored against the one
  ground-truth object of largest *box* IoU with it;
* ``semantic_multi`` (e/f): every detection, with its class.

"Semantic": the predictions carry cluster ids, not classes; the clusters are first matched one-to-one to
the ground-truth classes with the Hungarian algorithm (:func:`match_clusters`: ``scipy.optimize.
linear_sum_assignment`` maximising, over all predictions, the summed mask IoU of each prediction with its
best-overlapping ground-truth object, credited to that object's class). One matching per set of
predictions serves both semantic settings.

Predictions are COCO results dicts ``{"image_id", "category_id", "score", "segmentation" (RLE)}`` with
``category_id = cluster + 1``; ground truth is a COCO dataset dict (``dist_seg.data.instances``). Pure
functions of those: no files, no ranks (the stage runs them on one process).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

__all__ = ["SETTINGS", "coco_ap", "evaluate_instances", "match_clusters", "single_object"]

log = logging.getLogger(__name__)

SETTINGS = ("agnostic_multi", "semantic_single", "semantic_multi")
METRICS = ("AP", "AP50", "AP75")


def _rle(segmentation: Mapping[str, Any]) -> dict[str, Any]:
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed (COCO crowd annotations)
        size = [int(v) for v in segmentation["size"]]
        return mask_utils.frPyObjects({"size": size, "counts": counts}, *size)
    return {"size": [int(v) for v in segmentation["size"]],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _coco(gt: Mapping[str, Any]) -> COCO:
    coco = COCO()
    anns = [{**ann, "segmentation": _rle(ann["segmentation"]), "iscrowd": int(ann.get("iscrowd", 0))}
            for ann in gt["annotations"]]
    coco.dataset = {"images": list(gt["images"]), "annotations": anns, "categories": list(gt["categories"])}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results(dets: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # Only what loadRes needs: with a "bbox" key it would take the box area as the mask's area.
    return [{"image_id": int(d["image_id"]), "category_id": int(d["category_id"]), "score": float(d["score"]),
             "segmentation": _rle(d["segmentation"])} for d in dets]


def coco_ap(gt: Mapping[str, Any], dets: Sequence[Mapping[str, Any]], *, use_cats: bool) -> dict[str, Optional[float]]:
    """Mask AP / AP50 / AP75 (percent) of ``dets`` on ``gt`` with ``COCOeval(iouType="segm")``.

    Args:
        gt: COCO dataset dict; every image listed is evaluated (an image without objects turns its
            detections into false positives).
        dets: COCO results on images of ``gt`` (others are an error: filter them first).
        use_cats: False: class-agnostic (``params.useCats = 0``).

    Returns:
        ``{"AP", "AP50", "AP75"}``; 0.0 when there are objects but no detections, None when ``gt`` has no
        object to find.
    """
    if not any(not ann.get("iscrowd", 0) for ann in gt["annotations"]):
        return dict.fromkeys(METRICS)
    if not dets:
        return dict.fromkeys(METRICS, 0.0)
    coco = _coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes(_results(dets))
        ev = COCOeval(coco, res, iouType="segm")
        ev.params.imgIds = sorted(coco.getImgIds())
        ev.params.useCats = int(use_cats)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats: AP@[.5:.95], AP50, AP75 at maxDets=100 over all areas; -1 when nothing was evaluated.
    return {name: (None if value < 0 else round(float(value) * 100, 4)) for name, value in zip(METRICS, ev.stats[:3])}


def _by_image(items: Sequence[Mapping[str, Any]]) -> dict[int, list]:
    out: dict[int, list] = {}
    for item in items:
        out.setdefault(int(item["image_id"]), []).append(item)
    return out


def _box(det: Mapping[str, Any]) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(_rle(det["segmentation"]))]


def single_object(gt: Mapping[str, Any], dets: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list]:
    """The single-object setting: per image the most confident detection and one ground-truth object.

    The object kept is the non-crowd one of largest box IoU with the detection's box (the tight box of its
    mask); ties go to the larger object, then to the lower annotation id. An image without a detection
    keeps its largest object (a miss either way); an image without a non-crowd object leaves the evaluation.

    Returns:
        ``(gt', dets')``: the reduced ground truth (same categories) and the kept detections.
    """
    gt_by_image, det_by_image = _by_image([a for a in gt["annotations"] if not a.get("iscrowd", 0)]), _by_image(dets)
    images, anns, kept = [], [], []
    for image in gt["images"]:
        objects = gt_by_image.get(int(image["id"]), [])
        if not objects:
            continue
        images.append(image)
        candidates = det_by_image.get(int(image["id"]), [])
        if not candidates:
            anns.append(max(objects, key=lambda a: (float(a["area"]), -int(a["id"]))))
            continue
        best = max(candidates, key=lambda d: float(d["score"]))  # max keeps the first of equal scores
        kept.append(best)
        ious = mask_utils.iou([_box(best)], [[float(v) for v in a["bbox"]] for a in objects],
                              [0] * len(objects))[0]
        anns.append(max(zip(ious.tolist(), objects), key=lambda t: (t[0], float(t[1]["area"]), -int(t[1]["id"])))[1])
    return {"images": images, "annotations": anns, "categories": list(gt["categories"])}, kept


def match_clusters(gt: Mapping[str, Any], dets: Sequence[Mapping[str, Any]]) -> tuple[dict[int, int], np.ndarray]:
    """Hungarian matching of predicted clusters (``category_id``) to ground-truth classes.

    Matrix ``M[cluster, class]``: for every detection, the mask IoU with its best-overlapping non-crowd
    ground-truth object of the same image (ties to the lower annotation id; no credit without overlap),
    added at that object's class. ``linear_sum_assignment(M, maximize=True)`` pairs clusters and classes
    one-to-one; with more clusters than classes, the unpaired clusters keep no class.

    Returns:
        ``({predicted category_id: ground-truth category_id}, M)`` (M's rows: sorted predicted ids; columns:
        ``gt["categories"]`` in order).
    """
    classes = [int(c["id"]) for c in gt["categories"]]
    column = {c: j for j, c in enumerate(classes)}
    clusters = sorted({int(d["category_id"]) for d in dets})
    row = {c: i for i, c in enumerate(clusters)}
    matrix = np.zeros((len(clusters), len(classes)))
    gt_by_image = _by_image([a for a in gt["annotations"] if not a.get("iscrowd", 0)])
    for image_id, image_dets in _by_image(dets).items():
        objects = gt_by_image.get(image_id, [])
        if not objects:
            continue
        ious = mask_utils.iou([_rle(d["segmentation"]) for d in image_dets], [_rle(a["segmentation"]) for a in objects],
                              [0] * len(objects))
        for det, det_ious in zip(image_dets, np.atleast_2d(ious)):
            j = int(np.argmax(det_ious))  # first maximum: the lower annotation id in list order
            if det_ious[j] > 0:
                matrix[row[int(det["category_id"])], column[int(objects[j]["category_id"])]] += det_ious[j]
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return {clusters[r]: classes[c] for r, c in zip(rows, cols)}, matrix


def evaluate_instances(gt: Mapping[str, Any], dets: Sequence[Mapping[str, Any]], *, semantic: bool = True) -> dict:
    """Table 3's three settings for one set of predictions.

    Args:
        gt: the instance ground truth (COCO dataset dict); its images are the evaluated set.
        dets: COCO results (``category_id`` = cluster + 1, ``score``); detections on images outside ``gt`` are
            dropped and counted (``outside_gt``).
        semantic: the predictions carry clusters (named masks, Mask R-CNN candidates); False scores only the
            class-agnostic setting (the semantic ones are None).

    Returns:
        ``{"agnostic_multi", "semantic_single", "semantic_multi"}`` each ``{"AP", "AP50", "AP75"}`` or None, plus
        ``num_images``, ``num_objects``, ``num_predictions``, ``outside_gt``, ``cluster_to_class``
        (``{str(cluster id): class id}``) and ``unmatched_clusters`` (clusters paired with no class: their
        detections count in no class's AP).
    """
    image_ids = {int(im["id"]) for im in gt["images"]}
    inside = [d for d in dets if int(d["image_id"]) in image_ids]
    out: dict[str, Any] = {
        "num_images": len(image_ids), "num_objects": sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0)),
        "num_predictions": len(inside), "outside_gt": len(dets) - len(inside),
        "agnostic_multi": coco_ap(gt, inside, use_cats=False), "semantic_single": None, "semantic_multi": None,
        "cluster_to_class": None, "unmatched_clusters": None}
    if out["outside_gt"]:
        log.info("%d predictions are on images without instance ground truth; not scored", out["outside_gt"])
    if not semantic:
        return out
    mapping, _ = match_clusters(gt, inside)
    clusters = sorted({int(d["category_id"]) for d in inside})
    # An unpaired cluster gets an id no ground-truth class has: COCOeval scores it in no class.
    unused = min([0, *(int(c["id"]) for c in gt["categories"])]) - 1
    renamed = [{**d, "category_id": mapping.get(int(d["category_id"]), unused)} for d in inside]
    out["semantic_multi"] = coco_ap(gt, renamed, use_cats=True)
    single_gt, single_dets = single_object(gt, renamed)
    out["semantic_single"] = coco_ap(single_gt, single_dets, use_cats=True)
    out["cluster_to_class"] = {str(k): v for k, v in sorted(mapping.items())}
    out["unmatched_clusters"] = [c for c in clusters if c not in mapping]
    return out
