"""The STEGO evaluation protocol (SPEC §6) for any method, and a run's validation without a trainer.

Validation crops are the minor side resized to ``eval_res`` and centre-cropped (done by the shard
reader). The code is averaged with the code of the horizontally flipped image, upsampled bilinearly to
the label size, and classified by the method's cluster head and, when present, its linear probe.
An optional dense CRF refines both predictions. Confusion matrices are summed over ranks before the
Hungarian matching.

:func:`validate_run` scores a method on its run's validation split; the trainer's validation and
``dist-seg eval --checkpoint`` (:func:`evaluate_checkpoint`) both call it. The ``dist-seg eval`` command
itself is :mod:`dist_seg.eval_command`, which also trains the baselines through the trainer (this module
sits below the trainer and never imports it).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dist_seg import distributed as D
from dist_seg.eval.metrics import ConfusionMeter, cluster_scores, linear_scores
from dist_seg.methods.base import Method

log = logging.getLogger(__name__)

FeatureFn = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]


def backbone_feature_fn(backbone, device: torch.device, autocast=None) -> FeatureFn:
    """Features of a batch's images and of their horizontal flips, computed by ``backbone``."""

    def fn(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"].to(device, non_blocking=True)
        with torch.no_grad(), (autocast() if autocast else torch.autocast(device.type, enabled=False)):
            both = backbone.patch_features(torch.cat([images, images.flip(-1)]))
        feats, flipped = both.float().chunk(2)
        return feats, flipped

    return fn


def image_feature_fn(device: torch.device) -> FeatureFn:
    """Normalised images and their flips, for methods whose ``inputs`` is ``"images"``."""
    from dist_seg.data.transforms import normalize

    def fn(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = normalize(batch["image"].to(device))
        return images, images.flip(-1)

    return fn


def cached_feature_fn(device: torch.device) -> FeatureFn:
    """Features read from a feature cache (``feat`` and ``feat_flip`` written by ``dist-seg extract``)."""

    def fn(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "feat_flip" not in batch:
            raise KeyError("this feature cache has no flipped validation features; re-run `dist-seg extract`")
        # The cache's fp16 crosses to the device as it is stored and is expanded there.
        return (batch["feat"].to(device, non_blocking=True).float(),
                batch["feat_flip"].to(device, non_blocking=True).float())

    return fn


@torch.no_grad()
def tta_code(method: Method, feats: torch.Tensor, flipped: Optional[torch.Tensor]) -> torch.Tensor:
    code = method.encode(feats)
    if flipped is not None:
        code = (code + method.encode(flipped).flip(-1)) / 2
    return code


@torch.no_grad()
def evaluate(
    method: Method,
    batches: Iterable[dict],
    feature_fn: FeatureFn,
    *,
    num_classes: int,
    device: torch.device,
    flip_tta: bool = True,
    crf: bool = False,
    crf_workers: int = 0,
    num_overlays: int = 0,
    has_labels: bool = True,
    label_free_score: bool = True,
) -> dict:
    """Run the evaluation protocol over ``batches`` (this rank's slice) and return the scores.

    Args:
        method: a trained (or baseline) method in eval mode.
        batches: dicts with ``label`` [B,H,W] (−1 ignore), ``image`` uint8 [B,3,H,W] (for CRF/overlays) and
            whatever ``feature_fn`` reads.
        feature_fn: returns features of the images and of their flips.
        num_classes: K of the labels.
        crf: refine with the dense CRF (SPEC §6) before scoring.
        num_overlays: keep this many examples (image, label, predictions) for plots.
        has_labels: False for an unlabelled split: only the label-free score is computed.
        label_free_score: compute the label-free selection score (``val/label_free``; see
            :mod:`dist_seg.eval.label_free`) from backbone features and the predicted clusters.

    Returns:
        ``{"cluster": {...scores}, "linear": {...} or None, "examples": {...}}``; scores as in
        :func:`dist_seg.eval.metrics.cluster_scores` / ``linear_scores``; identical on every rank.
    """
    from dist_seg.eval.label_free import LabelFreeMeter

    was_training = method.training
    method.eval()
    label_free = LabelFreeMeter() if label_free_score else None
    cluster_meter: Optional[ConfusionMeter] = None
    linear_meter: Optional[ConfusionMeter] = None
    examples: dict[str, list] = {"image": [], "label": [], "cluster": [], "linear": []}
    pool = None
    if crf:
        from dist_seg.eval.crf import CRFPool

        pool = CRFPool(crf_workers).__enter__()
    try:
        for batch in batches:
            label = batch["label"].to(device, non_blocking=True)
            feats, flipped = feature_fn(batch)
            code = tta_code(method, feats, flipped if flip_tta else None)
            if label_free is not None:
                label_free.update(feats, method.classify(code)["cluster"])
            if not has_labels:
                continue
            code = F.interpolate(code, size=label.shape[-2:], mode="bilinear", align_corners=False)
            out = method.classify(code)
            preds = {}
            for key in ("cluster", "linear"):
                scores = out.get(key)
                if scores is None:
                    continue
                if crf:
                    images = batch["image"].permute(0, 2, 3, 1).cpu().numpy()
                    unary = (F.log_softmax(2 * scores, dim=1) if key == "cluster"
                             else F.log_softmax(scores, dim=1)).float().cpu().numpy()
                    probs = pool.map(list(images), list(unary))
                    preds[key] = torch.from_numpy(np.stack(probs)).argmax(1).to(device)
                else:
                    preds[key] = scores.argmax(1)
            if cluster_meter is None:
                cluster_meter = ConfusionMeter(num_classes, out["cluster"].shape[1], device=device)
                if "linear" in preds:
                    linear_meter = ConfusionMeter(num_classes, num_classes, device=device)
            cluster_meter.update(preds["cluster"], label)
            if linear_meter is not None:
                linear_meter.update(preds["linear"], label)
            if len(examples["image"]) < num_overlays:
                take = min(num_overlays - len(examples["image"]), label.shape[0])
                examples["image"].extend(batch["image"][:take].permute(0, 2, 3, 1).cpu().numpy())
                examples["label"].extend(label[:take].cpu().numpy())
                examples["cluster"].extend(preds["cluster"][:take].cpu().numpy())
                if "linear" in preds:
                    examples["linear"].extend(preds["linear"][:take].cpu().numpy())
    finally:
        if pool is not None:
            pool.__exit__(None, None, None)
        method.train(was_training)
    lf = label_free.compute() if label_free is not None else None  # collective
    if not has_labels:
        return {"cluster": None, "linear": None, "cluster_confusion": None, "label_free": lf, "examples": examples}
    # Every rank must take part in the reductions even if its slice was empty.
    if cluster_meter is None:
        probe = torch.zeros(1, method.feat_dim, 1, 1, device=device)
        num_clusters = method.classify(method.encode(probe))["cluster"].shape[1]
        cluster_meter = ConfusionMeter(num_classes, num_clusters, device=device)
    has_linear = torch.tensor([float(linear_meter is not None)], device=device)
    D.all_reduce_sum(has_linear)
    if has_linear.item() > 0 and linear_meter is None:
        linear_meter = ConfusionMeter(num_classes, num_classes, device=device)
    cluster_meter.all_reduce()
    if linear_meter is not None:
        linear_meter.all_reduce()
    result = {
        "cluster": cluster_scores(cluster_meter.confusion.cpu()),
        "linear": linear_scores(linear_meter.confusion.cpu()) if linear_meter is not None else None,
        "cluster_confusion": cluster_meter.confusion.cpu(),
        "label_free": lf,
        "examples": examples,
    }
    return result


def summary(result: dict, prefix: str = "") -> dict[str, float]:
    """Flat metrics for tracking: ``{prefix}cluster_mIoU``, ``{prefix}cluster_Acc``, the collapse measures
    ``{prefix}cluster_entropy`` (normalised by log K') and ``{prefix}cluster_min_share`` (percent),
    ``{prefix}linear_*``, ``{prefix}label_free``."""
    out = {}
    if result.get("label_free") is not None:
        out[f"{prefix}label_free"] = float(result["label_free"])
    if result.get("cluster") is None:
        return out
    out.update({f"{prefix}cluster_mIoU": result["cluster"]["mIoU"], f"{prefix}cluster_Acc": result["cluster"]["Acc"]})
    for key in ("cluster_entropy", "cluster_min_share"):
        if key in result["cluster"]:
            out[f"{prefix}{key}"] = result["cluster"][key]
    if result.get("linear"):
        out[f"{prefix}linear_mIoU"] = result["linear"]["mIoU"]
        out[f"{prefix}linear_Acc"] = result["linear"]["Acc"]
    return out


def format_table(rows: dict[str, dict], title: str = "") -> str:
    """A fixed-width results table: one row per predictor, cluster and linear mIoU/Acc."""
    header = f"{'model':<28}{'cluster mIoU':>14}{'cluster Acc':>13}{'linear mIoU':>13}{'linear Acc':>12}"
    lines = [title, header, "-" * len(header)] if title else [header, "-" * len(header)]
    for name, res in rows.items():
        lin = res.get("linear")
        lm = f"{lin['mIoU']:13.2f}" if lin else f"{'-':>13}"
        la = f"{lin['Acc']:12.2f}" if lin else f"{'-':>12}"
        lines.append(f"{name:<28}{res['cluster']['mIoU']:14.2f}{res['cluster']['Acc']:13.2f}{lm}{la}")
    return "\n".join(lines)


def save_reports(result: dict, out_dir: str | Path, *, class_names=None, colors=None, name="eval",
                 step: Optional[int] = None, split: Optional[str] = None) -> dict[str, Path]:
    """Write ``{name}.json`` (every number; IoU and accuracy in percent), ``{name}_per_class_iou.csv`` (IoU in
    percent per class name and head), a confusion-matrix figure titled with its head, split and step, and an
    overlay grid with a class-colour legend; return the paths."""
    from dist_seg.eval import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def clean(obj):
        if isinstance(obj, torch.Tensor):
            return obj.tolist()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        if isinstance(obj, float) and not np.isfinite(obj):
            return None
        return obj

    numbers = {k: v for k, v in result.items() if k != "examples"}
    paths["json"] = out_dir / f"{name}.json"
    paths["json"].write_text(json.dumps(clean(numbers), indent=2))
    k = result["cluster_confusion"].shape[0]
    names = list(class_names or [str(i) for i in range(k)])
    split = split or result.get("split") or "validation"
    when = f"step {step}" if step is not None else (f"step {result['step']}" if result.get("step") is not None
                                                    else name)
    paths["per_class_iou"] = out_dir / f"{name}_per_class_iou.csv"
    with paths["per_class_iou"].open("w") as f:
        heads = [h for h in ("cluster", "linear") if result.get(h)]
        f.write("class," + ",".join(f"{h}_IoU_percent" for h in heads) + "\n")
        for i, class_name in enumerate(names):
            f.write(f"{class_name}," + ",".join(f"{result[h]['per_class_iou'][i]:.2f}" for h in heads) + "\n")
    matched = result["cluster"].get("matched_confusion", result["cluster_confusion"][:, :k])
    title = (f"cluster head (Hungarian-matched), {split} split, {when}\n"
             f"mIoU {result['cluster']['mIoU']:.2f}%, Acc {result['cluster']['Acc']:.2f}%; cells: pixels")
    paths["confusion"] = plots.confusion_figure(np.asarray(clean(matched)), names, out_dir / f"{name}_confusion.png",
                                                title=title)
    ex = result["examples"]
    if ex["image"]:
        assignment = np.asarray(result["cluster"]["assignment"])
        cluster = [np.where(assignment[c] >= 0, assignment[c], -1) for c in ex["cluster"]]
        linear = np.stack(ex["linear"]) if ex["linear"] else None
        palette = np.asarray(colors, dtype=np.uint8) if colors is not None else plots.default_palette(k)
        paths["overlays"] = plots.overlay_grid(np.stack(ex["image"]), np.stack(ex["label"]), np.stack(cluster), linear,
                                               palette, out_dir / f"{name}_overlays.png", class_names=names[:k],
                                               title=f"{split} split, {when}")
    return paths


# --------------------------------------------------------------------------------- a run's validation
def validate_run(method: Method, cfg, info, *, device: torch.device, local_batch: int, backbone=None,
                 autocast=None, num_overlays: int = 0, crf: Optional[bool] = None) -> Optional[dict]:
    """Score ``method`` on the validation split of the run ``cfg`` (SPEC §6); ``None`` when it has none.

    Args:
        method: the (unwrapped) method, on ``device``.
        cfg: the run config (data, eval and mode settings).
        info: the run's :class:`dist_seg.features.DataInfo`.
        device: where features and predictions are computed.
        local_batch: this process's share of ``data.batch_size``.
        backbone: the frozen backbone, for features computed from images (not needed when the cache holds
            the validation split or the method reads images).
        autocast: the accelerator's autocast context factory for the backbone.
        num_overlays: examples kept for the overlay figure.
        crf: refine with the dense CRF; ``None`` means ``cfg.eval.crf``.

    Returns:
        :func:`evaluate`'s result, identical on every rank (collective: every rank must call it).
    """
    from dist_seg.data.shards import make_loader

    if not info.has_val or not method.validates:
        return None
    # Validation reads the cache only when it holds the validation split (flipped views at eval_res).
    cached = cfg.train.mode == "cached" and info.val_cached
    loader, _ = make_loader(
        info.cache if cached else cfg.data.root, cfg.data.val_split,
        batch_size=local_batch, res=cfg.data.eval_res, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        shuffle=False, infinite=False, start_batch=0, shuffle_buffer=cfg.data.shuffle_buffer,
        decode="features" if cached else "image", half_features=True, pin_memory=device.type == "cuda",
        num_classes="manifest",  # labels outside the class range: skipped, counted and named
    )
    if method.inputs == "images":
        feature_fn = image_feature_fn(device)
    elif info.val_cached:
        feature_fn = cached_feature_fn(device)
    else:
        feature_fn = backbone_feature_fn(backbone, device, autocast)
    batches = loader
    if cfg.data.max_val_samples:
        limit = max(1, cfg.data.max_val_samples // cfg.data.batch_size)
        batches = (b for i, b in zip(range(limit), loader))
    result = evaluate(method, batches, feature_fn,
                      num_classes=info.num_classes, device=device, flip_tta=cfg.eval.flip_tta,
                      has_labels=info.has_val_labels,
                      crf=cfg.eval.crf if crf is None else crf, crf_workers=cfg.eval.crf_workers,
                      num_overlays=num_overlays)
    from dist_seg.data.shards import gather_damage

    result["damaged"] = gather_damage(loader.skip_counter)
    result["split"] = cfg.data.val_split  # reports title their figures with it
    return result



def evaluate_checkpoint(method: Method, cfg, *, crf: Optional[bool] = None, accelerator=None) -> tuple:
    """Validate a trained method (as rebuilt from its checkpoint) on its run's data, without a trainer.

    Builds what validation needs and nothing else: the data facts, the frozen backbone when features come
    from images, this process's batch. No optimiser, KNN table or tracking run is created.

    Args:
        method: the method with its trained parameters (e.g. from ``load_method_checkpoint``).
        cfg: the checkpoint's run config (with any overrides).
        crf: as in :func:`validate_run`.
        accelerator: an ``accelerate.Accelerator``; one is built (and ended) here when omitted.

    Returns:
        ``(result or None, DataInfo)``.
    """
    from dist_seg.config import ConfigError
    from dist_seg.features import read_data_info
    from dist_seg.runtime import make_accelerator

    own = accelerator is None
    accelerator = accelerator or make_accelerator(cfg)
    try:
        world = accelerator.num_processes
        if cfg.data.batch_size % world:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) must be divisible by "
                              f"the number of processes ({world})")
        info = read_data_info(cfg)
        device = accelerator.device
        backbone = None
        if method.inputs != "images" and info.has_val and not info.val_cached:
            from dist_seg.backbones import backbone_dtype, load_backbone

            backbone = load_backbone(cfg.backbone.name, cfg.backbone.weights,
                                     allow_download=cfg.backbone.allow_download,
                                     dtype=backbone_dtype(cfg.backbone.dtype, cfg.train.mixed_precision)).to(device)
        method = method.to(device).eval()
        result = validate_run(method, cfg, info, device=device, local_batch=cfg.data.batch_size // world,
                              backbone=backbone, autocast=accelerator.autocast,
                              num_overlays=cfg.eval.num_overlays, crf=crf)
        return result, info
    finally:
        if own:
            accelerator.end_training()


# ------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``dist-seg eval`` (run by :mod:`dist_seg.eval_command`)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training checkpoint (.pt) to evaluate, or a run folder (its newest "
                     "checkpoint that passes its checksums)")
    src.add_argument("--baselines", nargs="+", choices=["raw", "pca", "rp"],
                     help="evaluate backbone-feature baselines (probes fit on the training split)")
    parser.add_argument("--recipe", help="recipe file for --baselines (dataset, backbone, resolution)")
    parser.add_argument("--crf", action="store_true", help="refine predictions with the dense CRF")
    parser.add_argument("--out", default=None, help="folder for the JSON report and figures")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="also read a checkpoint that torch.load(weights_only=True) refuses (written before "
                             "safe checkpoints): this unpickles it, which runs any code it holds; only for files "
                             "from a source you trust (`dist-seg convert-checkpoint` re-saves it safely)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")

