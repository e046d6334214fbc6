"""Naming the mined masks with K-means clusters of their crops' CLS features (SPEC §8.2): the ``name`` stage.

Each mask's box is cropped from the full-resolution image (not masked), zero-padded to a multiple of the
patch size and described by the CLS token of ``maskdistill.name.backbone`` (``dino_vits8``). The
descriptors are whitened per dimension (divided by their std over all masks, support set included), L2
normalised and clustered with scikit-learn's ``MiniBatchKMeans``; every annotation of ``masks_<split>.json``
gets ``cluster`` (0..K−1) and ``category_id = cluster + 1``. No ground truth is read unless
``maskdistill.name.with_gt`` is set (the official code's renaming of clusters to classes, offered only as a
flagged parity option).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import scipy.cluster.vq
import torch
import torchvision.transforms.functional as TVF
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import MiniBatchKMeans

from dist_seg import distributed as D
from dist_seg.maskdistill.files import MaskDistillFileError, masks_path, read_json, write_json_atomic
from dist_seg.maskdistill.mining import MASKS_COMMAND, load_stage_config

__all__ = ["KMEANS_SEED", "cluster_descriptors", "configure_parser", "crop_descriptors", "name_masks",
           "naming_provenance", "run"]

log = logging.getLogger(__name__)

KMEANS_SEED = 1234
KMEANS_BATCH = 1000


def _box(bbox, width: int, height: int) -> tuple[int, int, int, int]:
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(0, round(x)), max(0, round(y))
    x1, y1 = min(width, round(x + w)), min(height, round(y + h))
    if x1 <= x0 or y1 <= y0:
        raise MaskDistillFileError(f"box {list(bbox)} is empty inside a {width}x{height} image; re-run "
                                   f"`{MASKS_COMMAND}`")
    return x0, y0, x1, y1


@torch.no_grad()
def crop_descriptors(backbone, records, annotations: list[dict]) -> np.ndarray:
    """CLS features ``[len(annotations), C]`` of each annotation's box crop (SPEC §8.2).

    Args:
        backbone: a :class:`dist_seg.backbones.Backbone`.
        records: indexable by image id, giving ``{"image": uint8 [3, H, W]}`` at full resolution.
        annotations: COCO annotations with ``image_id`` and ``bbox`` ([x, y, w, h]).
    """
    p = backbone.patch_size
    out = np.zeros((len(annotations), backbone.embed_dim), dtype=np.float32)
    for row, ann in enumerate(annotations):
        image = records[int(ann["image_id"])]["image"]
        x0, y0, x1, y1 = _box(ann["bbox"], int(image.shape[2]), int(image.shape[1]))
        crop = TVF.convert_image_dtype(image[:, y0:y1, x0:x1], torch.float32)
        h, w = crop.shape[-2:]
        # Padding with the ImageNet mean is exactly zero after the backbone's normalisation (the official
        # code zero-pads the normalised crop).
        padded = backbone.mean.reshape(3, 1, 1).expand(3, -(-h // p) * p, -(-w // p) * p).clone()
        padded[:, :h, :w] = crop.to(padded.device)
        out[row] = backbone.cls_features(padded[None])[0].cpu().numpy()
    return out


def cluster_descriptors(features: np.ndarray, num_clusters: int, *, support: Optional[np.ndarray] = None) -> np.ndarray:
    """K-means cluster ids of ``features`` (SPEC §8.2); ``support`` rows are used only for fitting.

    Whitening (``scipy.cluster.vq.whiten``: each dimension divided by its std, computed over the features and
    the support set together), L2-normalised rows, then ``MiniBatchKMeans(num_clusters, batch_size=1000,
    random_state=1234, n_init=3, max_iter=100)`` fitted on all rows and predicted on ``features``.
    """
    num_main = len(features)
    rows = features if support is None or len(support) == 0 else np.concatenate([features, support])
    if len(rows) < num_clusters:
        raise ValueError(f"{len(rows)} masks cannot form {num_clusters} clusters; lower "
                         f"maskdistill.name.num_clusters or mine more images")
    white = scipy.cluster.vq.whiten(rows.astype(np.float64))
    white /= np.maximum(np.linalg.norm(white, axis=1, keepdims=True), 1e-12)
    kmeans = MiniBatchKMeans(num_clusters, batch_size=KMEANS_BATCH, random_state=KMEANS_SEED, n_init=3,
                             max_iter=100).fit(white)
    return kmeans.predict(white[:num_main]).astype(np.int64)


def _num_clusters(cfg) -> int:
    from dist_seg.data.manifest import read_manifest

    if cfg.maskdistill.name.num_clusters is not None:
        if cfg.maskdistill.name.num_clusters < 1:
            raise ValueError(f"maskdistill.name.num_clusters must be >= 1, got {cfg.maskdistill.name.num_clusters}")
        return int(cfg.maskdistill.name.num_clusters)
    manifest = read_manifest(cfg.data.root, dataset=cfg.data.dataset)
    if manifest.num_classes is None or manifest.num_classes < 2:
        raise ValueError(f"dataset {cfg.data.root} has no object classes to count (num_classes="
                         f"{manifest.num_classes}); set maskdistill.name.num_clusters=K")
    return int(manifest.num_classes) - 1  # class 0 is the background


def naming_provenance(cfg, *, weights_id: str, num_clusters: int) -> dict[str, Any]:
    """What ``info["name"]`` of a named masks file records (compared to reuse a finished naming)."""
    name = cfg.maskdistill.name
    support = None
    if name.support_root:
        support = {"root": str(name.support_root), "split": name.support_split,
                   "masks": str(_support_masks_path(cfg))}
    return {"backbone": name.backbone, "weights_id": weights_id, "num_clusters": num_clusters,
            "with_gt": bool(name.with_gt), "support": support, "kmeans": {
                "algorithm": "sklearn MiniBatchKMeans", "batch_size": KMEANS_BATCH, "random_state": KMEANS_SEED,
                "n_init": 3, "max_iter": 100, "whiten": True}}


def _support_masks_path(cfg) -> Path:
    name = cfg.maskdistill.name
    if name.support_masks:
        return Path(name.support_masks)
    return Path(name.support_root) / "maskdistill" / f"masks_{name.support_split}.json"


def _gt_classes(records, annotations: list[dict]) -> np.ndarray:
    """Per mask, the most frequent ground-truth object class (1..) under it; -1 where it covers none."""
    from pycocotools import mask as mask_utils

    out = np.full(len(annotations), -1, dtype=np.int64)
    for row, ann in enumerate(annotations):
        label = records[int(ann["image_id"])]["label"].numpy()
        seg = ann["segmentation"]
        mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        values = label[mask]
        values = values[values > 0]  # 0 = background, -1 = ignore
        if values.size:
            out[row] = int(np.bincount(values).argmax())
    return out


def _rename_with_gt(clusters: np.ndarray, gt: np.ndarray, num_clusters: int) -> tuple[np.ndarray, dict[int, int]]:
    """Clusters renamed so that cluster c + 1 is the GT class Hungarian-matched to it (maximum agreement)."""
    counted = gt > 0
    if not counted.any():
        raise ValueError("maskdistill.name.with_gt=true but no mask covers a labelled object pixel")
    if gt[counted].max() > num_clusters:
        raise ValueError(f"ground truth has class ids up to {gt[counted].max()} but there are {num_clusters} "
                         f"clusters; with_gt needs num_clusters = the dataset's object classes")
    votes = np.zeros((num_clusters, num_clusters), dtype=np.int64)
    np.add.at(votes, (clusters[counted], gt[counted] - 1), 1)
    rows, cols = linear_sum_assignment(votes, maximize=True)
    mapping = {int(r): int(c) for r, c in zip(rows, cols)}
    return np.array([mapping[int(c)] for c in clusters], dtype=np.int64), mapping


def name_masks(cfg, *, split: Optional[str] = None, accelerator=None, overwrite: bool = False) -> Path:
    """The ``name`` stage: a K-means cluster for every mined mask of ``split``, written into its masks file.

    Args:
        cfg: the run config (``data.root``, ``maskdistill.name``, ``maskdistill.work_dir``).
        split: the split whose masks are named (default ``data.train_split``).
        accelerator: an ``accelerate`` Accelerator / PartialState for the device; default CUDA if available.
        overwrite: cluster again even if the file is already named for this configuration.

    Returns:
        The masks file (rewritten atomically with ``cluster`` and ``category_id`` per annotation and
        ``info["name"]``).

    Raises:
        MaskDistillFileError: no (readable) masks file; the message names ``dist-seg masks``.
        ValueError: fewer masks than clusters, or a with-GT request the dataset cannot serve.
    """
    from dist_seg.backbones import load_backbone
    from dist_seg.data.shards import IndexedShards

    split = split or cfg.data.train_split
    path = masks_path(cfg, split)
    data = read_json(path, what="mined object masks", made_by=MASKS_COMMAND)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise MaskDistillFileError(f"{path} is not a masks file; re-run `{MASKS_COMMAND} --overwrite`")
    name = cfg.maskdistill.name
    num_clusters = _num_clusters(cfg)
    device = accelerator.device if accelerator is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(name.backbone, weights=name.weights, allow_download=cfg.backbone.allow_download,
                             weights_key="maskdistill.name.weights")
    backbone.to(device)
    expected = naming_provenance(cfg, weights_id=backbone.weights_id, num_clusters=num_clusters)
    stored = data.get("info", {}).get("name") or {}
    if not overwrite and {key: stored.get(key) for key in expected} == expected:
        log.info("%s is already named for this configuration; kept (pass --overwrite to cluster again)", path)
        return path
    started = time.time()
    annotations = data["annotations"]
    records = IndexedShards(cfg.data.root, split, res=None, decode="image")
    try:
        features = crop_descriptors(backbone, records, annotations)
        gt = _gt_classes(records, annotations) if name.with_gt else None
    finally:
        records.close()
    support = None
    if name.support_root:
        support_path = _support_masks_path(cfg)
        support_data = read_json(support_path, what="mined object masks of the support set",
                                 made_by=f"{MASKS_COMMAND} data.root={name.support_root}")
        support_records = IndexedShards(name.support_root, name.support_split, res=None, decode="image")
        try:
            support = crop_descriptors(backbone, support_records, support_data.get("annotations", []))
        finally:
            support_records.close()
    clusters = cluster_descriptors(features, num_clusters, support=support)
    info_name = dict(expected, num_masks=len(annotations), num_support_masks=0 if support is None else len(support))
    names = {c: f"cluster{c}" for c in range(num_clusters)}
    if name.with_gt:
        clusters, mapping = _rename_with_gt(clusters, gt, num_clusters)
        info_name["gt_mapping"] = {str(k): v + 1 for k, v in sorted(mapping.items())}
        names = {c: f"class{c + 1}" for c in range(num_clusters)}
        log.warning("maskdistill.name.with_gt=true: clusters were renamed to ground-truth classes (parity option; "
                    "recorded in info.name.with_gt)")
    for ann, cluster in zip(annotations, clusters.tolist()):
        ann["cluster"] = int(cluster)
        ann["category_id"] = int(cluster) + 1
    data["categories"] = [{"id": c + 1, "name": names[c], "supercategory": ""} for c in range(num_clusters)]
    data.setdefault("info", {})["name"] = info_name
    write_json_atomic(data, path)
    sizes = np.bincount(clusters, minlength=num_clusters).tolist()
    log.info("%s: %d masks named with %d clusters (sizes %s) in %.1fs", path, len(annotations), num_clusters,
             sizes, time.time() - started)
    return path


# ------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dist-seg name RECIPE [key=value ...]``."""
    from dist_seg.runtime import add_recipe_arguments

    add_recipe_arguments(parser, overrides_help="config overrides, e.g. maskdistill.name.num_clusters=20")
    parser.add_argument("--split", default=None, help="split whose masks are named (default: data.train_split)")
    parser.add_argument("--overwrite", action="store_true", help="cluster again even if already named")


def run(args: argparse.Namespace) -> int:
    """``dist-seg name RECIPE``: cluster the mined masks (one process; other ranks wait)."""
    from dist_seg.backbones import BackboneWeightsError
    from dist_seg.config import ConfigError
    from dist_seg.data.manifest import DataError

    try:
        _, cfg = load_stage_config(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    code = 0
    if D.is_main_process():
        try:
            path = name_masks(cfg, split=args.split, overwrite=args.overwrite)
            info = read_json(path, what="named masks", made_by="dist-seg name RECIPE")["info"]["name"]
            print(f"name: {info['num_masks']} masks in {info['num_clusters']} clusters -> {path}"
                  + (" (clusters renamed with ground truth: with_gt=true)" if info["with_gt"] else ""))
        except (BackboneWeightsError, DataError, MaskDistillFileError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            code = 2
    D.barrier()
    return code
