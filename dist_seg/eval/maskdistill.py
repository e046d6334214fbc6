"""MaskDistill evaluation (SPEC §8.6): K+1-class scores at the images' original resolution.

Every product of the pipeline is scored on the same protocol, as the paper's Table 1 does:

* the student: each image resized to the student's input (deeplab: ``size × size``; head: ``eval_res``
  square, features from the frozen backbone), argmax, nearest back to the image's own size
  (optionally a dense CRF, SPEC §6 parameters, on the logits upsampled to the image first);
* the intermediate products, given as label maps per image (the mined masks + K-means, the Mask R-CNN
  pseudo-labels).

Clustering scores are SPEC §6 :func:`~dist_seg.eval.metrics.cluster_scores` on the ``(K+1) × (K+1)``
confusion of *all* classes, background included (Hungarian over all of them, as VOC-style unsupervised
segmentation reports it); linear scores (:func:`~dist_seg.eval.metrics.linear_scores`, no matching) apply
to a student trained by the linear protocol. Each rank reads its own shards (``wds.split_by_node``) and
the confusion matrices are summed over ranks before matching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from dist_seg.data.shards import decode_label_png, resolve_shards
from dist_seg.data.transforms import IGNORE_INDEX, normalize
from dist_seg.eval.metrics import ConfusionMeter, cluster_scores, linear_scores

__all__ = ["full_resolution_records", "score_label_maps", "score_student", "student_logits"]


def full_resolution_records(root: str | Path, split: str, *, per_rank: bool = True) -> Iterator[dict]:
    """``{"index", "image" uint8 [H, W, 3], "label" int64 [H, W] (−1 = ignore)}`` of a split, unresized.

    Args:
        root: a prepared dataset folder.
        split: the split to read.
        per_rank: read only this rank's shards (``wds.split_by_node``); False reads every record.
    """
    urls = resolve_shards(root, split).urls
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node if per_rank else None,
                             workersplitter=None, empty_check=False)
    dataset = dataset.decode(wds.handle_extension("label.png", decode_label_png), "rgb8")
    for raw in dataset:
        image = raw.get("png", raw.get("jpg"))
        meta = raw["json"]
        label = raw.get("label.png")
        if label is None:
            label = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        label = torch.from_numpy(np.asarray(label, dtype=np.int64))
        label[label == IGNORE_INDEX] = -1
        yield {"index": int(meta["index"]), "image": np.array(image, dtype=np.uint8), "label": label}


def _meters(num_classes: int, num_preds: int, device) -> ConfusionMeter:
    return ConfusionMeter(num_classes, num_preds, device=device)


def score_label_maps(label_maps: Callable[[int, int, int], Optional[np.ndarray]] | Mapping[int, np.ndarray],
                     root: str | Path, split: str, *, num_classes: int,
                     num_preds: Optional[int] = None, device: torch.device | str = "cpu") -> dict:
    """Cluster scores of per-image label maps against a split's ground truth (SPEC §8.6).

    Args:
        label_maps: ``{global index: uint8 [H, W] map}``, or a function ``(index, height, width) -> map``
            (None for an image without a prediction: it is predicted all background, 0, and counted).
        root: the prepared dataset holding the ground truth.
        split: its split.
        num_classes: K+1 ground-truth classes (background included).
        num_preds: predicted ids (default ``num_classes``).
        device: where the confusion matrix lives (the collective backend's device).

    Returns:
        :func:`cluster_scores` of the summed confusion, plus ``num_images`` and ``missing`` (images
        without a map), summed over ranks.
    """
    from dist_seg import distributed as D

    meter = _meters(num_classes, num_preds or num_classes, device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for rec in full_resolution_records(root, split):
        h, w = rec["label"].shape
        if callable(label_maps):
            pred = label_maps(rec["index"], h, w)
        else:
            pred = label_maps.get(rec["index"])
        counts[0] += 1
        if pred is None:
            counts[1] += 1
            pred = np.zeros((h, w), dtype=np.uint8)
        if pred.shape != (h, w):
            raise ValueError(f"label map of image {rec['index']} is {pred.shape}, the image is {(h, w)}")
        meter.update(torch.from_numpy(np.asarray(pred, dtype=np.int64)).to(device), rec["label"].to(device))
    meter.all_reduce()
    D.all_reduce_sum(counts)
    scores = cluster_scores(meter.confusion.cpu())
    scores.update(num_images=int(counts[0]), missing=int(counts[1]))
    return scores


@torch.no_grad()
def student_logits(method, image: torch.Tensor, *, backbone=None, eval_res: int = 320) -> torch.Tensor:
    """K+1 logits ``[1, K+1, s, s]`` of one normalised image ``[1, 3, H, W]`` at the student's input size.

    deeplab: the image resized to ``maskdistill.distil.size`` square; head: to ``eval_res`` square, through
    ``backbone.patch_features``, the logits upsampled to ``eval_res``.
    """
    if method.student == "deeplab":
        size = method.cfg.maskdistill.distil.size
        x = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        return method.encode(x)
    if backbone is None:
        raise ValueError("the head student needs the frozen backbone to score images")
    x = F.interpolate(image, size=(eval_res, eval_res), mode="bilinear", align_corners=False)
    logits = method.encode(backbone.patch_features(x).float())
    return F.interpolate(logits, size=(eval_res, eval_res), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_student(method, image_u8: np.ndarray, *, backbone=None, eval_res: int = 320, crf: bool = False,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """The student's label map ``int64 [H, W]`` of one uint8 image ``[H, W, 3]`` (SPEC §8.5 inference)."""
    h, w = image_u8.shape[:2]
    image = normalize(torch.from_numpy(image_u8).permute(2, 0, 1)[None].to(device))
    logits = student_logits(method, image, backbone=backbone, eval_res=eval_res)
    if crf:
        from dist_seg.eval.crf import dense_crf

        up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
        probs = dense_crf(image_u8, F.log_softmax(up, dim=0).cpu().numpy())
        return np.asarray(probs).argmax(0).astype(np.int64)
    pred = logits.argmax(1, keepdim=True).float()
    return F.interpolate(pred, size=(h, w), mode="nearest")[0, 0].long().cpu().numpy()


@torch.no_grad()
def score_student(method, root: str | Path, split: str, *, backbone=None, eval_res: int = 320, crf: bool = False,
                  device: torch.device | str = "cpu", max_images: Optional[int] = None) -> dict:
    """Clustering (and, for a linear-protocol model, linear) scores of a student on a split (SPEC §8.6).

    Args:
        method: a :class:`~dist_seg.methods.maskdistill.MaskDistillMethod` (deeplab or head).
        root: prepared dataset with ground-truth labels (K+1 classes).
        split: the split to score.
        backbone: the frozen §1 backbone (head student only).
        eval_res: the head student's square input side.
        crf: refine with the dense CRF (SPEC §6 parameters) first.
        device: where the model runs.
        max_images: score at most this many images per rank (tests).

    Returns:
        ``{"cluster": cluster_scores, "linear": linear_scores or None, "num_images": n}`` (same on every rank).
    """
    from dist_seg import distributed as D

    was_training = method.training
    method.eval()
    k = method.num_classes
    meter = _meters(k, k, device)
    counted = torch.zeros(1, dtype=torch.int64, device=device)
    try:
        for i, rec in enumerate(full_resolution_records(root, split)):
            if max_images is not None and i >= max_images:
                break
            pred = predict_student(method, rec["image"], backbone=backbone, eval_res=eval_res, crf=crf, device=device)
            meter.update(torch.from_numpy(pred).to(device), rec["label"].to(device))
            counted += 1
    finally:
        method.train(was_training)
    meter.all_reduce()
    D.all_reduce_sum(counted)
    confusion = meter.confusion.cpu()
    return {"cluster": cluster_scores(confusion), "linear": linear_scores(confusion) if method.linear else None,
            "num_images": int(counted)}
