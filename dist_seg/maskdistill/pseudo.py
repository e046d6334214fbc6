"""Pseudo-labels from the Mask R-CNN candidates, written as a new prepared dataset (SPEC §8.4).

Rules, per image (:func:`pseudo_label_map`):

1. sort the image's detections by score, descending (stable: equal scores keep their input order);
2. keep those with ``score >= threshold`` (τ = 0.9); if none passes, keep only the best one;
3. paint ``category_id`` (= 1 + cluster) into an all-zero (background) map in that order; a mask that
   overlaps a pixel already painted is dropped **whole** (the most confident mask wins);
4. an image without any detection gets an all-background map, and is counted.

:func:`write_pseudo_shards` turns ``candidates_<split>.json`` (:mod:`dist_seg.maskdistill`) and the
source image shards into an ordinary prepared dataset under ``maskdistill.pseudo.out_root`` (default
``<work_dir>/pseudo``), so the distil stage reads it like any other::

    <out>/manifest.json          name "<source>_pseudo", num_classes K + 1 (0 = background,
                                 1..K = cluster + 1), counts under extra["pseudo"]
    <out>/<train_split>/...      the source images, byte for byte, with the pseudo-labels in label.png
    <out>/<val_split>/...        the source val split with its ground-truth labels (hard links to the
                                 source shards where the filesystem allows, else copies), for validation

When the source trains and validates on the same split (COCO20k is transductive), the ground-truth
copy is written as ``<split>_gt`` and the manifest names it (``extra["pseudo"]["val_split"]``).
Record ``json`` keeps the source record's ``source`` and ``crop`` and adds ``pseudo`` =
``{"detections", "painted", "dropped_overlap", "fallback"}`` for that image.

Both splits are written atomically (temporary folder + rename); a rerun keeps complete splits made
from the same candidates file (same SHA-256) and threshold, and rewrites them otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from dist_seg.data.classes import _bit_interleaved_palette
from dist_seg.data.instances import decode_rle
from dist_seg.data.manifest import (
    DataError,
    DatasetManifest,
    manifest_path,
    read_manifest,
    update_split,
    write_manifest,
)
from dist_seg.data.shards import (
    IMAGE_FORMATS,
    WIDS_INDEX,
    encode_label,
    resolve_shards,
    split_is_complete,
    write_records,
)
from dist_seg.maskdistill.files import MaskDistillFileError, candidates_path, read_json, work_dir

log = logging.getLogger(__name__)

__all__ = ["masks_label_map", "pseudo_label_map", "pseudo_root", "pseudo_up_to_date", "write_pseudo_shards"]

_MAX_CATEGORY = 254  # label PNGs are 8-bit and 255 means ignore


def _check_category(category: Any) -> int:
    if isinstance(category, bool) or not isinstance(category, (int, np.integer)) or not 1 <= category <= _MAX_CATEGORY:
        raise DataError(f"category_id must be an integer in 1..{_MAX_CATEGORY} (cluster + 1; 0 is background), "
                        f"got {category!r}")
    return int(category)


def _paint(masks: Sequence[tuple[np.ndarray, int]], height: int, width: int) -> tuple[np.ndarray, int]:
    """Paint ``(mask, category)`` pairs in order; a mask touching painted pixels is dropped whole."""
    label = np.zeros((height, width), dtype=np.uint8)
    dropped = 0
    for mask, category in masks:
        if (label[mask] != 0).any():
            dropped += 1
            continue
        label[mask] = category
    return label, dropped


def pseudo_label_map(detections: Sequence[dict[str, Any]], height: int, width: int, *,
                     threshold: float = 0.9) -> tuple[np.ndarray, dict[str, Any]]:
    """The pseudo-label map of one image from its scored detections (SPEC §8.4).

    Args:
        detections: the image's candidates, any order: dicts with ``score``, ``category_id`` (1..K =
            cluster + 1) and ``segmentation`` (pycocotools RLE of size ``[height, width]``).
        height: image height.
        width: image width.
        threshold: τ; detections with ``score >= threshold`` are kept, or only the best when none is.

    Returns:
        ``(label, info)``: ``uint8 [height, width]`` map (0 = background, else the detection's
        ``category_id``) and ``{"detections": n given, "kept": n selected by τ or the fallback,
        "fallback": whether only the best was kept because none passed τ, "painted": masks painted,
        "dropped_overlap": selected masks dropped whole for overlapping a more confident one,
        "empty": no detection at all}``.

    Raises:
        ValueError: ``threshold`` outside [0, 1].
        DataError: a detection without score/category/segmentation, a category id outside 1..254, or a
            mask of another size.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    for det in detections:
        missing = {"score", "category_id", "segmentation"} - set(det)
        if missing:
            raise DataError(f"a detection lacks {sorted(missing)}; expected COCO results with RLE segmentations")
    order = sorted(detections, key=lambda d: -float(d["score"]))  # sorted() is stable: ties keep input order
    kept = [d for d in order if float(d["score"]) >= threshold]
    fallback = not kept and bool(order)
    if fallback:
        kept = order[:1]
    masks = [(decode_rle(d["segmentation"], height, width), _check_category(d["category_id"])) for d in kept]
    label, dropped = _paint(masks, height, width)
    info = {"detections": len(detections), "kept": len(kept), "fallback": fallback,
            "painted": len(kept) - dropped, "dropped_overlap": dropped, "empty": not detections}
    return label, info


def masks_label_map(annotations: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """The label map of one image's mined object masks after naming (``masks_<split>.json``).

    Used to score the initial masks + K-means on the evaluation protocol (paper Table 1). The masks are
    painted in the given order (the mining stage writes one per image) with the same rule as
    :func:`pseudo_label_map`: a mask that overlaps an earlier one is dropped whole.

    Args:
        annotations: the image's annotations: dicts with ``segmentation`` (RLE) and ``category_id``
            (cluster + 1, set by ``dist-seg name``).
        height: image height.
        width: image width.

    Returns:
        ``uint8 [height, width]``: 0 = background, else the mask's ``category_id``.

    Raises:
        DataError: an annotation without ``category_id`` (the masks were never named), or a bad mask.
    """
    masks = []
    for ann in annotations:
        if "category_id" not in ann:
            raise DataError("mined masks carry no category_id yet; cluster them first with `dist-seg name RECIPE`")
        masks.append((decode_rle(ann["segmentation"], height, width), _check_category(ann["category_id"])))
    return _paint(masks, height, width)[0]


# --------------------------------------------------------------------------------------- the stage
def pseudo_root(cfg) -> Path:
    """Where the pseudo-label dataset goes: ``maskdistill.pseudo.out_root`` or ``<work_dir>/pseudo``."""
    return Path(cfg.maskdistill.pseudo.out_root or work_dir(cfg) / "pseudo")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _group_candidates(candidates: Any, path: Path, num_images: int, num_clusters: int) -> dict[int, list[dict]]:
    fix = "re-run `dist-seg detect RECIPE` for this dataset"
    if isinstance(candidates, dict) and isinstance(candidates.get("candidates"), list):
        # The detect stage's file ({"info", "candidates"}, dist_seg.maskdistill); a bare results list works too.
        candidates = candidates["candidates"]
    if not isinstance(candidates, list):
        raise MaskDistillFileError(f"{path}: expected a JSON list of COCO results; {fix}")
    by_image: dict[int, list[dict]] = defaultdict(list)
    for det in candidates:
        if not isinstance(det, dict) or not {"image_id", "category_id", "score", "segmentation"} <= set(det):
            raise MaskDistillFileError(f"{path}: an entry lacks image_id/category_id/score/segmentation; {fix}")
        image_id = det["image_id"]
        if not isinstance(image_id, int) or not 0 <= image_id < num_images:
            raise MaskDistillFileError(f"{path}: image_id {image_id!r} is not a record of the split "
                                       f"(0..{num_images - 1}): the candidates belong to another dataset; {fix}")
        if not isinstance(det["category_id"], int) or not 1 <= det["category_id"] <= num_clusters:
            raise MaskDistillFileError(f"{path}: category_id {det['category_id']!r} outside 1..{num_clusters} "
                                       f"(K = {num_clusters} clusters); {fix}, or set maskdistill.name.num_clusters")
        by_image[image_id].append(det)
    return by_image


def _source_records(source: Path, split: str) -> Iterator[dict[str, Any]]:
    urls = resolve_shards(source, split).urls
    # One process reads every record in order: no node or worker splitting.
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    yield from dataset


def _image_key(record: dict[str, Any]) -> str:
    for ext in IMAGE_FORMATS:
        if ext in record:
            return ext
    raise DataError(f"record {record.get('__key__')} of the source shards holds no image ({'/'.join(IMAGE_FORMATS)})")


def _link_split(source: Path, split: str, out: Path, out_split: str) -> None:
    """Copy a complete split folder (hard links where possible) atomically to ``out/out_split``."""
    src_dir = source / split
    tmp = out / f".{out_split}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for item in sorted(src_dir.iterdir()):
            if item.name == WIDS_INDEX:
                continue
            try:
                os.link(item, tmp / item.name)
            except OSError:  # another filesystem, or links not allowed
                shutil.copy2(item, tmp / item.name)
        shutil.copy2(src_dir / WIDS_INDEX, tmp / WIDS_INDEX)  # last: it marks the split complete
        final = out / out_split
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve(cfg, split: str | None, out_root) -> tuple[str, Path, Path, DatasetManifest, int, Path]:
    split = split or cfg.data.train_split
    source = Path(cfg.data.root)
    out = Path(out_root) if out_root is not None else pseudo_root(cfg)
    if out.resolve() == source.resolve():
        raise DataError(f"the pseudo-label dataset must not overwrite its source {source}; choose another --out")
    src_manifest = read_manifest(source, dataset=cfg.data.dataset)
    src_manifest.split(split)  # a missing split fails here, naming the available ones
    num_clusters = cfg.maskdistill.name.num_clusters or ((src_manifest.num_classes or 0) - 1)
    if num_clusters < 1:
        raise DataError(f"cannot tell the number of clusters K: {source} has num_classes="
                        f"{src_manifest.num_classes}; set maskdistill.name.num_clusters")
    return split, source, out, src_manifest, num_clusters, candidates_path(cfg, split)


def _params(cfg, split: str, source: Path, num_clusters: int, cand_path: Path) -> dict[str, Any]:
    """What a written pseudo-label dataset must have been made from to be kept."""
    return {"threshold": float(cfg.maskdistill.pseudo.threshold), "candidates_sha256": _sha256(cand_path),
            "source_split": split, "num_clusters": num_clusters, "source": str(source.resolve())}


def pseudo_up_to_date(cfg, *, split: str | None = None, out_root: str | os.PathLike | None = None) -> bool:
    """Whether :func:`write_pseudo_shards` would keep everything as it is (for the all-stages runner).

    True when the output dataset is complete (its pseudo-label split, and the ground-truth copy when the
    source has a val split) and was made from the current candidates file (same SHA-256), threshold,
    K and source. Any missing input makes it False; it never raises for a missing or stale output.
    """
    try:
        split, source, out, src_manifest, num_clusters, cand_path = _resolve(cfg, split, out_root)
        if not cand_path.is_file() or not manifest_path(out).is_file():
            return False
        recorded = read_manifest(out).extra.get("pseudo") or {}
        if recorded.get("params") != _params(cfg, split, source, num_clusters, cand_path) \
                or not recorded.get("counts"):
            return False
        if split_is_complete(out, split) is None:
            return False
        val = recorded.get("val_split")
        return cfg.data.val_split not in src_manifest.splits or (val is not None and
                                                                 split_is_complete(out, val) is not None)
    except (DataError, OSError):
        return False


def write_pseudo_shards(cfg, *, split: str | None = None, out_root: str | os.PathLike | None = None,
                        overwrite: bool = False) -> Path:
    """Write the pseudo-label dataset of ``split`` (SPEC §8.4) and return its folder.

    Args:
        cfg: the run config: ``data.root`` (source dataset), ``data.val_split``,
            ``maskdistill.pseudo.threshold``, ``maskdistill.name.num_clusters`` (K; default: the
            source's ``num_classes - 1``) and the work dir holding ``candidates_<split>.json``.
        split: the source split the candidates were predicted on (default ``data.train_split``).
        out_root: output folder (default :func:`pseudo_root`).
        overwrite: rewrite complete splits even when made from the same candidates and threshold.

    Returns:
        The output dataset folder (``manifest.json`` + splits).

    Raises:
        MaskDistillFileError: missing/broken candidates, or candidates of another dataset.
        DataError: the source dataset is not prepared, or a mask does not fit its image.
    """
    split, source, out, src_manifest, num_clusters, cand_path = _resolve(cfg, split, out_root)
    src_info = src_manifest.split(split)
    threshold = float(cfg.maskdistill.pseudo.threshold)
    candidates = read_json(cand_path, what="Mask R-CNN candidates", made_by="dist-seg detect RECIPE")
    by_image = _group_candidates(candidates, cand_path, src_info.num_samples, num_clusters)
    params = _params(cfg, split, source, num_clusters, cand_path)

    previous = read_manifest(out) if manifest_path(out).is_file() else None
    recorded = (previous.extra.get("pseudo") or {}) if previous is not None else {}
    if recorded.get("params") != params or not recorded.get("counts"):
        # Other candidates or settings, or a run killed before its manifest was written: nothing kept can be
        # trusted, so every split is rewritten.
        if previous is not None:
            log.info("%s was made from other candidates or settings; rewriting it", out)
        overwrite = True
    counts = {"images": 0, "empty_images": 0, "fallback_images": 0, "detections": 0, "kept": 0, "painted": 0,
              "dropped_overlap": 0}
    hist = np.zeros(256, dtype=np.int64)
    stats: dict[str, Any] = {}

    def records() -> Iterator[dict[str, Any]]:
        for index, record in enumerate(_source_records(source, split)):
            ext = _image_key(record)
            with Image.open(io.BytesIO(record[ext])) as img:
                width, height = img.size
            try:
                label, info = pseudo_label_map(by_image.get(index, []), height, width, threshold=threshold)
            except DataError as err:
                raise MaskDistillFileError(f"{cand_path}: image {index}: {err}; "
                                           "re-run `dist-seg detect RECIPE`") from None
            hist[:] += np.bincount(label.ravel(), minlength=256)
            counts["images"] += 1
            counts["empty_images"] += int(info["empty"])
            counts["fallback_images"] += int(info["fallback"])
            for key in ("detections", "kept", "painted", "dropped_overlap"):
                counts[key] += info[key]
            meta = json.loads(record["json"]) if "json" in record else {}
            yield {ext: record[ext], "label.png": encode_label(label),
                   "json": {"source": meta.get("source", record["__key__"]), "crop": meta.get("crop"),
                            "pseudo": {k: info[k] for k in ("detections", "painted", "dropped_overlap", "fallback")}}}
        stats["class_pixels"] = [int(v) for v in hist[: num_clusters + 1]]
        stats["ignore_pixels"] = 0

    val_split = cfg.data.val_split
    out_val = f"{val_split}_gt" if val_split == split else val_split
    fields = dict(name=f"{src_manifest.name}_pseudo", num_classes=num_clusters + 1,
                  class_names=["background"] + [f"cluster{k}" for k in range(num_clusters)],
                  colors=[[0, 0, 0]] + [list(c) for c in _cluster_colors(num_clusters)])
    info = write_records(records(), out, split, samples_per_shard=max(src_info.shard_sizes or [256]),
                         crop=src_info.crop, overwrite=overwrite, stats=stats)
    if counts["images"] == 0:  # the split was complete and kept (same candidates): keep its recorded counts
        counts = dict(recorded["counts"])
    elif counts["images"] != src_info.num_samples:
        shutil.rmtree(out / split, ignore_errors=True)
        raise DataError(f"read {counts['images']} records from {source / split}, its manifest says "
                        f"{src_info.num_samples}; re-run `dist-seg prepare` for the source")
    extra = {"pseudo": {"params": params, "counts": counts, "candidates": str(cand_path), "threshold": threshold,
                        "train_split": split, "val_split": None,
                        "labels": {split: "pseudo-labels (0 = background, 1..K = cluster + 1)"}},
             "source_dataset": {"root": str(source.resolve()), "name": src_manifest.name,
                                "num_classes": src_manifest.num_classes, "class_names": src_manifest.class_names}}
    update_split(out, split, info, **fields, extra=extra)

    if val_split in src_manifest.splits:
        val_info = src_manifest.split(val_split)
        done = split_is_complete(out, out_val)
        if overwrite or done is None or done.num_samples != val_info.num_samples:
            _link_split(source, val_split, out, out_val)
        manifest = read_manifest(out)
        manifest.splits[out_val] = val_info
        manifest.extra["pseudo"]["val_split"] = out_val
        manifest.extra["pseudo"]["labels"][out_val] = f"ground truth of {source}/{val_split}"
        write_manifest(out, manifest)
    else:
        log.warning("%s has no split '%s': the pseudo-label dataset has no validation split", source, val_split)
    log.info("pseudo-labels of %s/%s -> %s: %s", source, split, out, counts)
    return out


def _cluster_colors(num_clusters: int) -> list[tuple[int, int, int]]:
    return _bit_interleaved_palette(num_clusters + 1)[1:]


def format_counts(manifest: DatasetManifest) -> str:
    """One printable line with the pseudo-label counts of a written dataset."""
    p = manifest.extra.get("pseudo") or {}
    c = p.get("counts") or {}
    return (f"pseudo-labels (tau={p.get('threshold')}): {c.get('images', 0)} images, {c.get('empty_images', 0)} "
            f"without detections, {c.get('fallback_images', 0)} kept only their best detection; "
            f"{c.get('detections', 0)} detections, {c.get('kept', 0)} selected, {c.get('painted', 0)} painted, "
            f"{c.get('dropped_overlap', 0)} dropped whole for overlap; val split: {p.get('val_split')}")


# ------------------------------------------------------------------------------------------ CLI hook
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """``dist-seg pseudo RECIPE [key=value ...] [--out DIR] [--split S] [--overwrite]``."""
    from dist_seg.runtime import add_recipe_arguments

    add_recipe_arguments(parser)
    parser.add_argument("--out", default=None,
                        help="output dataset folder (default: maskdistill.pseudo.out_root or <work_dir>/pseudo)")
    parser.add_argument("--split", default=None,
                        help="split the candidates were predicted on (default data.train_split)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite complete splits")


def run(args: argparse.Namespace) -> int:
    """Run ``dist-seg pseudo``."""
    from dist_seg.config import ConfigError
    from dist_seg.runtime import config_from_args, setup_logging

    setup_logging()
    try:
        cfg = config_from_args(args)
        out = write_pseudo_shards(cfg, split=args.split, out_root=args.out, overwrite=args.overwrite)
    except (ConfigError, DataError, MaskDistillFileError) as err:
        print(f"dist-seg pseudo: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    print(format_counts(read_manifest(out)))
    return 0
