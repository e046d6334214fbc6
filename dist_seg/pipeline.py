"""MaskDistill stages that train (SPEC §8): the top layer that may call the trainer.

``dist-seg detect RECIPE [k=v ...]`` (:func:`detect_stage`) trains the Mask R-CNN detector as method
``maskrcnn`` under :func:`dist_seg.trainer.train` in ``<train.output_dir>/detect`` and then predicts the
candidates of every training image (``candidates_<split>.json``). Re-running the command resumes training
from the newest checkpoint, and skips prediction when the candidates file is complete and was made from
the final checkpoint with the same settings.

``dist-seg maskdistill RECIPE [k=v ...]`` (:func:`maskdistill_stage`) runs every stage of a recipe in
order, skipping those whose outputs are present and valid: prepare (toy_objects only) → masks → name →
detect → pseudo → distil (the student, plus optional CRF rounds; :func:`distil_stage`) → linear protocol
(:func:`linear_stage`) → eval (:func:`eval_stage`, SPEC §8.6, and paper 003's Table 3 mask AP where the
dataset has instance ground truth).

``dist-seg eval-instances RECIPE [k=v ...] [--split S]`` (:func:`instances_stage`) scores every object-mask
set of a split present in the work dir (each miner's masks, the Mask R-CNN candidates) with mask AP in
Table 3's three settings (:mod:`dist_seg.eval.instances`).

Every command here shares one parser (recipe, ``--config``, overrides); :data:`STAGES` maps the command
name to its stage function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from dist_seg import distributed as D
from dist_seg.config import ConfigError, RunConfig

log = logging.getLogger("dist_seg.pipeline")


DETECT_DIR = "detect"


def detector_config(cfg: RunConfig) -> RunConfig:
    """The detector's run config: method ``maskrcnn`` in ``<train.output_dir>/detect`` with DetectConfig's
    global batch and number of steps; everything else (seed, checkpointing, tracking) from ``cfg``."""
    d = cfg.maskdistill.detect
    run_name = f"{cfg.tracking.run_name}-detect" if cfg.tracking.run_name else "detect"
    return dataclasses.replace(
        cfg, method="maskrcnn",
        data=dataclasses.replace(cfg.data, batch_size=d.batch_size),
        train=dataclasses.replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / DETECT_DIR),
                                  num_steps=d.num_steps, mode="online"),
        tracking=dataclasses.replace(cfg.tracking, run_name=run_name),
    )


def _candidates_are_current(path: Path, checkpoint: Path, cfg: RunConfig, split: str) -> bool:
    """Whether ``path`` is a complete candidates file of ``checkpoint`` with this run's prediction settings."""
    from dist_seg.data.manifest import read_manifest
    from dist_seg.maskdistill.detect import CANDIDATES_FORMAT, prediction_settings, read_candidates
    from dist_seg.maskdistill.files import MaskDistillFileError

    if not path.is_file():
        return False
    try:
        info, _ = read_candidates(path)
    except MaskDistillFileError as err:
        log.warning("%s; predicting again", err)
        return False
    want = {"format": CANDIDATES_FORMAT, "complete": True, "checkpoint": str(checkpoint),
            "step": cfg.train.num_steps, "num_images": read_manifest(cfg.data.root).split(split).num_samples,
            **prediction_settings(cfg, split)}
    stale = {k: (info.get(k), v) for k, v in want.items() if info.get(k) != v}
    if stale:
        log.info("%s is out of date (%s); predicting again", path, ", ".join(f"{k}: {a!r} != {b!r}"
                                                                          for k, (a, b) in stale.items()))
    return not stale


def detect_stage(cfg: RunConfig, *, accelerator=None) -> Optional[Path]:
    """Train the Mask R-CNN detector (or resume it) and predict candidates for every training image.

    Args:
        cfg: the MaskDistill run config (the detector's is derived with :func:`detector_config`).
        accelerator: an ``accelerate.Accelerator`` to share; built and ended here when omitted.

    Returns:
        The candidates file, or None when training stopped early on a termination signal (re-run the
        same command to resume).
    """
    from dist_seg.maskdistill.detect import predict_candidates
    from dist_seg.maskdistill.files import candidates_path
    from dist_seg.trainer import checkpoint_dir, make_accelerator, setup_logging, train

    setup_logging()
    det_cfg = detector_config(cfg)
    split = det_cfg.maskdistill.detect.split or det_cfg.data.train_split
    final = checkpoint_dir(det_cfg) / f"step-{det_cfg.train.num_steps:08d}.pt"
    out = candidates_path(det_cfg, split)
    own = accelerator is None
    accelerator = accelerator or make_accelerator(det_cfg)
    try:
        # The trainer writes the final checkpoint atomically: its presence means training is done.
        if D.broadcast_object(final.is_file()):
            log.info("detector already trained (%s): skipping training", final)
        else:
            result = train(det_cfg, accelerator)
            if result.get("stopped"):
                return None
        if D.broadcast_object(_candidates_are_current(out, final, det_cfg, split) if D.is_main_process() else None):
            log.info("candidates %s are complete and match %s: skipping prediction", out, final)
            return out
        return predict_candidates(det_cfg, final, split, device=accelerator.device)
    finally:
        if own:
            accelerator.end_training()


# ================================================================================ MaskDistill: distil
DISTIL_DIR = "distil"
LINEAR_DIR = "linear"
RESULTS_NAME = "maskdistill_results.json"


def _num_train(root: str | Path, split: str) -> int:
    from dist_seg.data.manifest import read_manifest

    return int(read_manifest(root).split(split).num_samples)


def distil_config(cfg: RunConfig, *, data_root: str | Path, round_index: int = 0) -> RunConfig:
    """The student's run config (SPEC §8.5): method ``maskdistill`` on the pseudo-label dataset ``data_root``.

    ``maskdistill.distil.epochs`` become ``epochs · ceil(N / batch_size)`` steps for the N training images;
    the run lives in ``<train.output_dir>/distil`` (CRF round r: ``distil-crf<r>``). Validation uses the
    ground-truth split the pseudo-label dataset carries (``extra["pseudo"]["val_split"]``).
    """
    from dist_seg.data.manifest import read_manifest

    dc = cfg.maskdistill.distil
    manifest = read_manifest(data_root)
    val_split = (manifest.extra.get("pseudo") or {}).get("val_split") or cfg.data.val_split
    steps_per_epoch = math.ceil(_num_train(data_root, cfg.data.train_split) / dc.batch_size)
    name = DISTIL_DIR if round_index == 0 else f"{DISTIL_DIR}-crf{round_index}"
    run_name = f"{cfg.tracking.run_name}-{name}" if cfg.tracking.run_name else name
    return dataclasses.replace(
        cfg, method="maskdistill", num_classes=None,
        data=dataclasses.replace(cfg.data, root=str(data_root), batch_size=dc.batch_size, val_split=val_split,
                                 feature_cache=None, knn_table=None),
        train=dataclasses.replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / name),
                                  num_steps=dc.epochs * steps_per_epoch),
        maskdistill=dataclasses.replace(cfg.maskdistill, distil=dataclasses.replace(
            dc, steps_per_epoch=steps_per_epoch, linear_from=None)),
        tracking=dataclasses.replace(cfg.tracking, run_name=run_name),
    )


def linear_config(cfg: RunConfig, student_checkpoint: str | Path) -> RunConfig:
    """The linear protocol's run config (SPEC §8.6): the student's last 1×1 conv re-trained on the source
    dataset's ground-truth training labels, ``linear_epochs`` at a global batch of ``linear_batch_size``."""
    dc = cfg.maskdistill.distil
    steps_per_epoch = math.ceil(_num_train(cfg.data.root, cfg.data.train_split) / dc.linear_batch_size)
    run_name = f"{cfg.tracking.run_name}-{LINEAR_DIR}" if cfg.tracking.run_name else LINEAR_DIR
    return dataclasses.replace(
        cfg, method="maskdistill", num_classes=None,
        data=dataclasses.replace(cfg.data, batch_size=dc.linear_batch_size, feature_cache=None, knn_table=None),
        train=dataclasses.replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / LINEAR_DIR),
                                  num_steps=dc.linear_epochs * steps_per_epoch),
        maskdistill=dataclasses.replace(cfg.maskdistill, distil=dataclasses.replace(
            dc, steps_per_epoch=steps_per_epoch, linear_from=str(student_checkpoint))),
        tracking=dataclasses.replace(cfg.tracking, run_name=run_name),
    )


def _final_checkpoint(run_cfg: RunConfig) -> Path:
    from dist_seg.trainer import checkpoint_dir

    return checkpoint_dir(run_cfg) / f"step-{run_cfg.train.num_steps:08d}.pt"


def _train_once(run_cfg: RunConfig, accelerator, what: str) -> Optional[Path]:
    """Train ``run_cfg`` unless its final checkpoint exists; the final checkpoint, or None if stopped early."""
    from dist_seg.trainer import train

    final = _final_checkpoint(run_cfg)
    # The trainer writes the final checkpoint atomically: its presence means training is done.
    if D.broadcast_object(final.is_file()):
        log.info("%s already trained (%s): skipping", what, final)
        return final
    result = train(run_cfg, accelerator)
    return None if result.get("stopped") else final


def load_student(checkpoint: str | Path, device) -> Any:
    """The trained student (or linear-protocol model) of a checkpoint, in eval mode on ``device``."""
    from dist_seg.trainer import load_method_checkpoint

    method, _, _ = load_method_checkpoint(checkpoint, device=device)
    return method


def crf_relabel(cfg: RunConfig, checkpoint: str | Path, *, source: str | Path, out_root: str | Path,
                device="cpu", backbone=None) -> Path:
    """One CRF round's labels (SPEC §8.5): the trained student's CRF-refined argmax on every training image.

    The training split of ``source`` (a pseudo-label dataset) is rewritten into ``out_root`` with the new
    labels in the label slot (images and record metadata unchanged); its ground-truth validation split is
    copied beside it. Runs on the main process (other ranks wait); a complete output is kept.
    """
    import webdataset as wds

    from dist_seg.data.manifest import read_manifest, update_split
    from dist_seg.data.shards import encode_label, resolve_shards, split_is_complete, write_records
    from dist_seg.eval.maskdistill import full_resolution_records, predict_student

    out_root = Path(out_root)
    manifest = read_manifest(source)
    splits = [cfg.data.train_split] + [s for s in manifest.splits if s != cfg.data.train_split]
    if D.is_main_process() and not all(split_is_complete(out_root, s) for s in splits):
        method = load_student(checkpoint, device)
        preds = {rec["index"]: predict_student(method, rec["image"], backbone=backbone, eval_res=cfg.data.eval_res,
                                               crf=True, device=device)
                 for rec in full_resolution_records(source, cfg.data.train_split, per_rank=False)}
        per_shard = max(1, max(resolve_shards(source, cfg.data.train_split).nsamples or [16]))
        for split in splits:
            def records(split=split):
                urls = resolve_shards(source, split).urls
                for raw in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                          empty_check=False):
                    rec = {k: v for k, v in raw.items() if not k.startswith("__")}
                    rec["json"] = json.loads(rec["json"])
                    if split == cfg.data.train_split:
                        rec["label.png"] = encode_label(preds[int(rec["json"]["index"])].astype("uint8"))
                    yield rec

            info = write_records(records(), out_root, split, samples_per_shard=per_shard, overwrite=True)
            extra = dict(manifest.extra)
            extra["crf_relabel"] = {"checkpoint": str(checkpoint), "source": str(source)}
            update_split(out_root, split, info, name=f"{manifest.name}_crf", num_classes=manifest.num_classes,
                         class_names=manifest.class_names, colors=manifest.colors, extra=extra)
    D.barrier()
    return out_root


def distil_stage(cfg: RunConfig, *, accelerator=None, data_root: Optional[str | Path] = None) -> Optional[Path]:
    """Train the student on the pseudo-labels, then the optional CRF rounds (SPEC §8.5).

    Each CRF round relabels the training set with the previous model's CRF-refined predictions and
    retrains from the initial weights (same init and seed) in ``distil-crf<r>``.

    Returns:
        The final student checkpoint (of the last round), or None when training stopped early.
    """
    from dist_seg.maskdistill.files import work_dir
    from dist_seg.maskdistill.pseudo import pseudo_root
    from dist_seg.trainer import make_accelerator, setup_logging

    setup_logging()
    root = Path(data_root) if data_root is not None else pseudo_root(cfg)
    own = accelerator is None
    accelerator = accelerator or make_accelerator(cfg)
    try:
        ckpt = _train_once(distil_config(cfg, data_root=root), accelerator, "student")
        for r in range(1, cfg.maskdistill.distil.crf_rounds + 1):
            if ckpt is None:
                return None
            backbone = _backbone_for(cfg, accelerator.device)
            root = crf_relabel(cfg, ckpt, source=root, out_root=work_dir(cfg) / f"pseudo_crf{r}",
                               device=accelerator.device, backbone=backbone)
            ckpt = _train_once(distil_config(cfg, data_root=root, round_index=r), accelerator, f"CRF round {r}")
        return ckpt
    finally:
        if own:
            accelerator.end_training()


def linear_stage(cfg: RunConfig, student_checkpoint: str | Path, *, accelerator=None) -> Optional[Path]:
    """The linear protocol (SPEC §8.6) on the student checkpoint; its final checkpoint (None if stopped)."""
    from dist_seg.trainer import make_accelerator

    own = accelerator is None
    accelerator = accelerator or make_accelerator(cfg)
    try:
        return _train_once(linear_config(cfg, student_checkpoint), accelerator, "linear protocol")
    finally:
        if own:
            accelerator.end_training()


def _backbone_for(cfg: RunConfig, device):
    if cfg.maskdistill.distil.student != "head":
        return None
    from dist_seg.backbones import load_backbone

    return load_backbone(cfg.backbone.name, cfg.backbone.weights, allow_download=cfg.backbone.allow_download).to(device)


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None or x != x else round(float(x), 2)


def eval_stage(cfg: RunConfig, student: str | Path, linear: Optional[str | Path], *, device="cpu") -> dict:
    """Score the pipeline's products on SPEC §8.6's protocol and write ``<train.output_dir>/maskdistill_results.json``.

    Rows: the initial masks + K-means and the Mask R-CNN pseudo-labels on the training split (the only
    images they exist for), an all-background prediction as the floor, and the student on the training
    and validation splits (clustering: Hungarian over all K+1 classes incl. background; linear: the
    linear-protocol model, no matching). Where the dataset has instance ground truth for the training
    split, ``instances`` holds paper 003's Table 3 rows (:func:`score_instances`) of every object-mask set
    in the work dir; the whole result is also logged to MLflow (run ``<run_name>-eval``).
    """
    import numpy as np

    from dist_seg.data.manifest import read_manifest
    from dist_seg.eval.maskdistill import score_label_maps, score_student
    from dist_seg.maskdistill.detect import read_candidates
    from dist_seg.maskdistill.files import candidates_path, masks_path, read_json
    from dist_seg.maskdistill.pseudo import masks_label_map, pseudo_label_map

    manifest = read_manifest(cfg.data.root, dataset=cfg.data.dataset)
    k1 = int(manifest.num_classes)
    train_split, val_split = cfg.data.train_split, cfg.data.val_split
    rows: list[dict[str, Any]] = []

    masks = read_json(masks_path(cfg, train_split), what="named object masks", made_by="dist-seg name RECIPE")
    by_image: dict[int, list] = {}
    for ann in masks.get("annotations", []):
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    scores = score_label_maps(lambda i, h, w: masks_label_map(by_image.get(i, []), h, w), cfg.data.root,
                              train_split, num_classes=k1, device=device)
    rows.append({"product": "initial masks + K-means", "split": train_split, "cluster": scores, "linear": None})

    _, dets = read_candidates(candidates_path(cfg, train_split))
    by_image = {}
    for det in dets:
        by_image.setdefault(int(det["image_id"]), []).append(det)
    tau = cfg.maskdistill.pseudo.threshold
    scores = score_label_maps(lambda i, h, w: pseudo_label_map(by_image.get(i, []), h, w, threshold=tau)[0],
                              cfg.data.root, train_split, num_classes=k1, device=device)
    rows.append({"product": "Mask R-CNN pseudo-labels", "split": train_split, "cluster": scores, "linear": None})

    # What predicting background everywhere scores: the floor the rows above must be read against.
    for split in [train_split] + ([val_split] if val_split != train_split and val_split in manifest.splits else []):
        scores = score_label_maps(lambda i, h, w: np.zeros((h, w), dtype=np.uint8), cfg.data.root, split,
                                  num_classes=k1, device=device)
        rows.append({"product": "reference: all background", "split": split, "cluster": scores, "linear": None})

    backbone = _backbone_for(cfg, device)
    model = load_student(student, device)
    lin = load_student(linear, device) if linear is not None else None
    name = f"student ({cfg.maskdistill.distil.student})"
    splits = [train_split] + ([val_split] if val_split != train_split and val_split in manifest.splits else [])
    for split in splits:
        res = score_student(model, cfg.data.root, split, backbone=backbone, eval_res=cfg.data.eval_res, device=device)
        lin_res = (score_student(lin, cfg.data.root, split, backbone=backbone, eval_res=cfg.data.eval_res,
                                 device=device)["linear"] if lin is not None else None)
        rows.append({"product": name, "split": split, "cluster": res["cluster"], "linear": lin_res})
    result = {
        "dataset": cfg.data.root, "num_classes": k1, "student": cfg.maskdistill.distil.student,
        "student_checkpoint": str(student), "linear_checkpoint": str(linear) if linear else None,
        "rows": [{"product": r["product"], "split": r["split"],
                  "cluster_mIoU": _round(r["cluster"]["mIoU"]), "cluster_Acc": _round(r["cluster"]["Acc"]),
                  "linear_mIoU": _round(r["linear"]["mIoU"]) if r["linear"] else None,
                  "linear_Acc": _round(r["linear"]["Acc"]) if r["linear"] else None} for r in rows],
        # Table 3 (mask AP of the object masks and candidates) where the dataset has instance ground truth.
        "instances": _on_main(lambda: score_instances(cfg, train_split)),
    }
    if D.is_main_process():
        from dist_seg.maskdistill.files import write_json_atomic

        write_json_atomic(result, Path(cfg.train.output_dir) / RESULTS_NAME)
        _track(cfg, "eval", result)
    return result


# ================================================================================ MaskDistill: Table 3
INSTANCES_NAME = "maskdistill_instances.json"
CANDIDATES_PRODUCT = "Mask R-CNN candidates (†)"


def _product_key(product: str) -> str:
    """An MLflow-safe short name of a product row: ``masks (dino)`` -> ``masks_dino``, candidates -> ``candidates``."""
    if product == CANDIDATES_PRODUCT:
        return "candidates"
    return product.replace(" (", "_").replace(")", "").replace(" ", "_")


def instance_products(cfg: RunConfig, split: str) -> list[tuple[str, Path, list[dict], bool]]:
    """The object-mask sets of ``split`` present in ``maskdistill.work_dir``, as COCO results.

    Every miner's masks file (``masks[_<method>]_<split>.json``; score 1, one mask per image; ``category_id``
    = cluster + 1 once named) and the Mask R-CNN candidates (``candidates_<split>.json``).

    Returns:
        ``[(product, path, detections, semantic)]``; ``semantic`` is False for masks not yet named.
    """
    from dist_seg.maskdistill.detect import read_candidates
    from dist_seg.maskdistill.files import candidates_path, masks_path, read_json
    from dist_seg.maskdistill.mining import MASKS_COMMAND, MINERS

    out = []
    for method in MINERS:
        path = masks_path(cfg, split, method)
        if not path.is_file():
            continue
        data = read_json(path, what="mined object masks", made_by=MASKS_COMMAND)
        named = bool((data.get("info") or {}).get("name"))
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"] if named else 1, "score": 1.0,
                 "segmentation": a["segmentation"]} for a in data.get("annotations", [])]
        out.append((f"masks ({method})", path, dets, named))
    path = candidates_path(cfg, split)
    if path.is_file():
        out.append((CANDIDATES_PRODUCT, path, read_candidates(path)[1], True))
    return out


def _merge_splits(docs: list[dict], products: list[list[tuple]]) -> tuple[dict, list[tuple]]:
    """One evaluation over several splits: image ids offset split by split (ground truth and predictions alike)."""
    gt: dict[str, Any] = {"images": [], "annotations": [], "categories": docs[0]["categories"]}
    offsets, offset = [], 0
    for doc in docs:
        offsets.append(offset)
        gt["images"] += [{**im, "id": int(im["id"]) + offset} for im in doc["images"]]
        gt["annotations"] += [{**a, "id": len(gt["annotations"]) + i + 1, "image_id": int(a["image_id"]) + offset}
                              for i, a in enumerate(doc["annotations"])]
        offset += 1 + max([int(im["id"]) for im in doc["images"]] + [-1])
    merged = []
    names = [[p[0] for p in split_products] for split_products in products]
    for name in names[0]:
        if not all(name in n for n in names):
            log.warning("%s is missing for some of the splits: not scored over all of them", name)
            continue
        found = [next(p for p in split_products if p[0] == name) for split_products in products]
        dets = [{**d, "image_id": int(d["image_id"]) + off} for off, (_, _, ds, _) in zip(offsets, found) for d in ds]
        merged.append((name, ", ".join(str(p[1]) for p in found), dets, all(p[3] for p in found)))
    return gt, merged


def score_instances(cfg: RunConfig, split: str | Sequence[str]) -> Optional[list[dict]]:
    """Table 3's mask AP (``dist_seg.eval.instances``) of every object-mask set of ``split`` in the work dir.

    Several splits are scored as one set of images (e.g. VOC's object segmentation set, whose 2,913 images
    are the 1,464 of ``trainaug`` and the 1,449 of ``val`` that have instances); a product is scored only if
    every split has it.

    Returns:
        One row per product (``product``, ``file``, ``split`` and :func:`~dist_seg.eval.instances.
        evaluate_instances`' settings and counts); None when the dataset has no instance ground truth for a
        split (``instances_<split>.json``).
    """
    from dist_seg.data.instances import read_instances
    from dist_seg.eval.instances import evaluate_instances

    splits = [split] if isinstance(split, str) else list(split)
    docs = [read_instances(cfg.data.root, s) for s in splits]
    if any(doc is None for doc in docs):
        log.info("%s has no instance ground truth for %s: no mask AP", cfg.data.root,
                 ", ".join(s for s, doc in zip(splits, docs) if doc is None))
        return None
    products = [instance_products(cfg, s) for s in splits]
    if len(splits) == 1:
        gt, merged = docs[0], [(name, str(path), dets, sem) for name, path, dets, sem in products[0]]
    else:
        gt, merged = _merge_splits(docs, products)
    rows = []
    for product, files, dets, semantic in merged:
        log.info("mask AP of %s (%s, %d predictions)", product, files, len(dets))
        rows.append({"product": product, "file": files, "split": "+".join(splits),
                     **evaluate_instances(gt, dets, semantic=semantic)})
    return rows


def _track(cfg: RunConfig, name: str, result: dict) -> None:
    """Log a results dict (mIoU rows and/or Table 3 rows) as the metrics of one MLflow run ``<run_name>-<name>``."""
    from dist_seg.tracking import Tracker

    run_name = f"{cfg.tracking.run_name}-{name}" if cfg.tracking.run_name else name
    tracker = Tracker(dataclasses.replace(cfg.tracking, run_name=run_name), active=D.is_main_process(),
                      params={"method": "maskdistill", "data.root": cfg.data.root, "data.dataset": cfg.data.dataset},
                      tags={"method": "maskdistill", "dataset": str(cfg.data.dataset)})
    try:
        metrics = {}
        for r in result.get("rows") or []:
            for key in ("cluster_mIoU", "cluster_Acc", "linear_mIoU", "linear_Acc"):
                if r.get(key) is not None:
                    metrics[f"{_product_key(r['product'])}/{r['split']}/{key}"] = r[key]
        for r in result.get("instances") or []:
            for setting in ("agnostic_multi", "semantic_single", "semantic_multi"):
                for metric, value in (r.get(setting) or {}).items():
                    if value is not None:
                        metrics[f"instances/{_product_key(r['product'])}/{setting}/{metric}"] = value
        tracker.log_metrics(metrics)
    finally:
        tracker.end()


def instances_stage(cfg: RunConfig, *, split: Optional[str | Sequence[str]] = None, accelerator=None) -> Path:
    """``dist-seg eval-instances``: Table 3 for every object-mask set of ``split`` (default ``data.train_split``;
    several splits are scored as one set, see :func:`score_instances`).

    Writes ``<train.output_dir>/maskdistill_instances.json`` (``_<split>[+<split>]`` before ``.json`` for other
    splits), logs it to MLflow (run ``<run_name>-instances``) and prints the table; the main process scores,
    the others wait.
    """
    from dist_seg.maskdistill.files import MaskDistillFileError, work_dir, write_json_atomic

    splits = [split] if isinstance(split, str) else list(split or [cfg.data.train_split])
    label = "+".join(splits)
    rows = _on_main(lambda: score_instances(cfg, splits))
    if rows is None:
        raise MaskDistillFileError(f"{cfg.data.root} has no instance ground truth for split {label!r} "
                                   f"(instances_<split>.json): prepare a dataset that has it (voc12, coco20k, "
                                   f"toy_objects) or pass --split")
    if not rows:
        raise MaskDistillFileError(f"no object masks of split {label!r} in {work_dir(cfg)}: create them with "
                                   f"`dist-seg masks RECIPE --split {splits[0]}` (and `dist-seg name`)")
    name = INSTANCES_NAME if splits == [cfg.data.train_split] else INSTANCES_NAME.replace(".json", f"_{label}.json")
    path = Path(cfg.train.output_dir) / name
    result = {"dataset": cfg.data.root, "split": label, "instances": rows}
    if D.is_main_process():
        write_json_atomic(result, path)
        _track(cfg, "instances", result)
        print(format_instances(rows))
    D.barrier()
    return path


def _ap_cell(scores: Optional[dict], key: str) -> str:
    return "—" if not scores or scores.get(key) is None else f"{scores[key]:.1f}"


def format_instances(rows: Optional[list[dict]]) -> str:
    """Table 3 (markdown): per product, AP50 / AP / AP75 in the three settings, as the paper orders them."""
    if not rows:
        return ""
    head = " | ".join(f"{s} AP50 | {s} AP | {s} AP75" for s in ("agnostic multi", "semantic single", "semantic multi"))
    lines = [f"Mask AP (COCOeval segm, %) on {rows[0]['split']} ({rows[0]['num_images']} images, "
             f"{rows[0]['num_objects']} objects; paper 003 Table 3 settings)", "",
             f"| product | predictions | {head} |", "|---|---|" + "---|" * 9]
    for r in rows:
        cells = " | ".join(_ap_cell(r.get(s), k) for s in ("agnostic_multi", "semantic_single", "semantic_multi")
                           for k in ("AP50", "AP", "AP75"))
        lines.append(f"| {r['product']} | {r['num_predictions']} | {cells} |")
    return "\n".join(lines)


def format_results(result: dict) -> str:
    """The results table (markdown): product, split, clustering and linear mIoU / Acc."""
    def cell(x):
        return "—" if x is None else f"{x:.1f}"

    lines = [f"MaskDistill on {result['dataset']} ({result['num_classes']} classes incl. background; clustering = "
             f"Hungarian over all {result['num_classes']} classes)", "",
             "| product | split | cluster mIoU | cluster Acc | linear mIoU | linear Acc |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['product']} | {r['split']} | {cell(r['cluster_mIoU'])} | {cell(r['cluster_Acc'])} | "
                     f"{cell(r['linear_mIoU'])} | {cell(r['linear_Acc'])} |")
    if result.get("instances"):
        lines += ["", format_instances(result["instances"])]
    return "\n".join(lines)


def _on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process while the others wait; an error there is raised on every rank
    (so no rank is left waiting at a barrier)."""
    result, error = None, None
    if D.is_main_process():
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    message = D.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"the main process failed: {message}")
    return result


TOY_OBJECTS = {"num_train": 128, "num_val": 32, "size": 96}


def prepare_toy(cfg: RunConfig) -> None:
    """When a toy_objects recipe's data is missing, generate it (:data:`TOY_OBJECTS`: 128 train / 32 val
    scenes of 96 px, K = ``maskdistill.name.num_clusters`` or 3), as ``dist-seg prepare toy_objects`` would."""
    from dist_seg.data.manifest import manifest_path

    if cfg.data.dataset != "toy_objects" or manifest_path(cfg.data.root).is_file():
        return
    if D.is_main_process():
        from dist_seg.data.toy_objects import generate_toy_objects

        log.info("no dataset at %s: generating toy_objects", cfg.data.root)
        generate_toy_objects(cfg.data.root, num_classes=cfg.maskdistill.name.num_clusters or 3, **TOY_OBJECTS)
    D.barrier()


def maskdistill_stage(cfg: RunConfig, *, accelerator=None) -> Optional[Path]:
    """Every MaskDistill stage of a recipe in order, skipping those whose outputs are present and valid.

    prepare (toy_objects only) → masks → name → detect → pseudo → distil (+ CRF rounds) → linear → eval.
    Returns the results file, or None when a training stage stopped early (re-run to resume).
    """
    from dist_seg.maskdistill.pseudo import pseudo_up_to_date, write_pseudo_shards
    from dist_seg.trainer import make_accelerator, setup_logging

    setup_logging()
    own = accelerator is None
    accelerator = accelerator or make_accelerator(cfg)
    split = cfg.data.train_split
    try:
        prepare_toy(cfg)
        from dist_seg.maskdistill.mining import mine_masks
        from dist_seg.maskdistill.naming import name_masks

        # Both keep a finished file made with the same configuration (and say so in the log).
        if mine_masks(cfg, split=split, accelerator=accelerator) is None:
            return None
        _on_main(lambda: name_masks(cfg, split=split, accelerator=accelerator))
        D.barrier()
        if detect_stage(cfg, accelerator=accelerator) is None:
            return None
        if D.broadcast_object(pseudo_up_to_date(cfg, split=split) if D.is_main_process() else None):
            log.info("pseudo-label dataset is up to date: skipping `pseudo`")
        else:
            _on_main(lambda: write_pseudo_shards(cfg, split=split))
        D.barrier()
        student = distil_stage(cfg, accelerator=accelerator)
        if student is None:
            return None
        linear = linear_stage(cfg, student, accelerator=accelerator)
        if linear is None:
            return None
        result = eval_stage(cfg, student, linear, device=accelerator.device)
        if D.is_main_process():
            print(format_results(result))
        return Path(cfg.train.output_dir) / RESULTS_NAME
    finally:
        if own:
            accelerator.end_training()


STAGES: dict[str, Callable[..., Optional[Path]]] = {"detect": detect_stage, "maskdistill": maskdistill_stage,
                                                    "eval-instances": instances_stage}


def run_maskdistill_recipe(config_fn: Callable[[], RunConfig], argv: Optional[list[str]] = None) -> int:
    """Entry point of the MaskDistill recipe files: ``accelerate launch recipes/maskdistill_X.py [k=v ...]``
    runs every stage (:func:`maskdistill_stage`) on the launched processes."""
    from dist_seg.trainer import resolve_config, setup_logging

    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = resolve_config(config_fn(), argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _run_stage(maskdistill_stage, "maskdistill", cfg)


def _run_stage(stage: Callable[..., Optional[Path]], command: str, cfg: RunConfig, **kwargs: Any) -> int:
    from dist_seg.backbones import BackboneWeightsError
    from dist_seg.data.manifest import DataError
    from dist_seg.maskdistill.files import MaskDistillFileError
    from dist_seg.trainer import TrainingError

    try:
        path = stage(cfg, **kwargs)
    except (BackboneWeightsError, ConfigError, DataError, MaskDistillFileError, FileNotFoundError, TrainingError,
            ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if path is None:
        from dist_seg.runtime import RESUMABLE_EXIT

        print(f"dist-seg {command}: stopped early; re-run the same command to resume", file=sys.stderr)
        return RESUMABLE_EXIT
    if D.is_main_process() and os.environ.get("RANK", "0") == "0":  # the process group may be gone by now
        print(f"dist-seg {command}: wrote {path}")
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from dist_seg.runtime import add_recipe_arguments

    add_recipe_arguments(parser)
    if parser.prog.endswith("eval-instances"):  # the one command here that scores a chosen split
        parser.add_argument("--split", action="append", default=None,
                            help="split whose masks/candidates are scored (default: data.train_split); repeat it "
                                 "to score several splits as one set (voc12: --split trainaug --split val)")


def run(args: argparse.Namespace) -> int:
    """Run the stage named by ``args.command`` on the recipe with its overrides."""
    from dist_seg.runtime import config_from_args, setup_logging

    setup_logging()
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kwargs = {"split": args.split} if args.command == "eval-instances" else {}
    return _run_stage(STAGES[args.command], args.command, cfg, **kwargs)
