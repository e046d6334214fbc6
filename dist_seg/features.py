"""The feature cache: run the frozen backbone once and train from its output (``dist-seg extract``).

A cache is a dataset folder like the image shards (``manifest.json``, ``<split>/shard-*.tar``,
``<split>/wids.json``) whose records hold ``feat.npy`` (fp16 patch features ``[C, h, w]``), ``gap.npy``
(the fp32 global descriptor of SPEC §1), ``label.png`` (labels at the training resolution) and the
sample's ``json`` meta. Its manifest records the backbone, the weights hash, the resolutions and the
crop type, and training refuses a cache that does not match its recipe.

Extraction maps input shard *i* to feature shard *i*, so ranks split the work by shard, each output is
written under a temporary name and renamed when complete, and a re-run skips finished shards.

:func:`read_data_info` is what a run (training or evaluation) learns from the dataset manifest and, in
``cached`` mode, from the cache it checks (:func:`check_feature_cache`).
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from dist_seg import distributed as D

log = logging.getLogger(__name__)
CACHE_INFO = "cache.json"
DAMAGE_REPORT = "damaged.json"
MISSING = "missing: the shard ends early or cannot be read"


def read_cache_info(cache: str | Path) -> dict:
    """The provenance of a feature cache (backbone, weights_id, res, eval_res, feat_dim, ...)."""
    path = Path(cache) / CACHE_INFO
    if not path.is_file():
        raise FileNotFoundError(f"no feature cache at {cache}: build it with `dist-seg extract RECIPE` "
                                f"(or train with train.mode=online)")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------ a run's data
@dataclass(kw_only=True)
class DataInfo:
    """What a run (the trainer, ``dist-seg eval``) learns from the dataset (and feature-cache) manifests."""

    root: str
    num_classes: int
    class_names: Optional[list]
    colors: Optional[list]
    has_train_labels: bool
    has_val: bool
    has_val_labels: bool
    num_train: int
    cache: Optional[str]
    feat_dim: Optional[int]
    val_cached: bool = False


def read_data_info(cfg) -> DataInfo:
    """The dataset facts of the run ``cfg``; in ``cached`` mode its feature cache is checked too.

    Raises:
        ConfigError: no dataset at ``data.root``, no such split, no class count, or a mismatched cache.
    """
    from dist_seg.config import ConfigError
    from dist_seg.data.manifest import read_manifest
    from dist_seg.runtime import default_cache_dir

    try:
        manifest = read_manifest(cfg.data.root, dataset=cfg.data.dataset)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if cfg.data.train_split not in manifest.splits:
        raise ConfigError(f"{cfg.data.root} has no '{cfg.data.train_split}' split (it has {sorted(manifest.splits)})")
    num_classes = cfg.num_classes or manifest.num_classes
    if num_classes is None:
        raise ConfigError(f"{cfg.data.root} has no classes in its manifest: set num_classes=K (the number of clusters)")
    train = manifest.splits[cfg.data.train_split]
    val = manifest.splits.get(cfg.data.val_split)
    cache, feat_dim, val_cached = None, None, False
    if cfg.train.mode == "cached":
        cache = cfg.data.feature_cache or default_cache_dir(cfg)
        feat_dim = check_feature_cache(cfg, cache)
        val_cached = val is not None and cfg.data.val_split in read_manifest(cache).splits
    return DataInfo(root=cfg.data.root, num_classes=num_classes, class_names=manifest.class_names,
                    colors=manifest.colors, has_train_labels=train.has_labels,
                    has_val=val is not None, has_val_labels=val is not None and val.has_labels,
                    num_train=train.num_samples,
                    cache=cache, feat_dim=feat_dim, val_cached=val_cached)


def check_feature_cache(cfg, cache: str) -> int:
    """Refuse a feature cache built with another backbone or resolution; return its channel count."""
    from dist_seg.config import ConfigError

    info = read_cache_info(cache)
    want = {"backbone": cfg.backbone.name, "res": cfg.data.res, "eval_res": cfg.data.eval_res}
    for key, value in want.items():
        if info.get(key) != value:
            raise ConfigError(
                f"feature cache {cache} was built with {key}={info.get(key)!r} but this run uses {value!r}; "
                f"re-run `dist-seg extract` with this recipe or point data.feature_cache elsewhere")
    return int(info["feat_dim"])


def inference_batch(cfg) -> int:
    """Images per forward pass on this rank for extraction and descriptors: ``extract.batch_size`` split over ranks."""
    return max(1, cfg.extract.batch_size // D.get_world_size())


def _png_bytes(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class _FeatureShardWriter:
    """Writes one feature shard in index order, under a temporary name until :meth:`close`.

    Feature shard *i* mirrors image shard *i* record for record, so the cache's ``wids.json`` positions
    equal the image shards' (KNN partners are fetched by position). A record that could not be read from
    the image shard is written as a placeholder holding only its ``json`` (``{"index", "damaged"}``):
    readers count and name it as damaged, and no position after it shifts.
    """

    def __init__(self, target: Path, first: int, count: int) -> None:
        import webdataset as wds

        self.target, self.first, self.end = target, first, first + count
        self.tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        self.sink = wds.TarWriter(str(self.tmp))
        self.next = first
        self.placeholders: list[int] = []

    def _placeholder(self, index: int, problem: str) -> None:
        self.sink.write({"__key__": f"{index:09d}", "json": json.dumps({"index": index, "damaged": problem}).encode()})
        self.placeholders.append(index)

    def write(self, index: int, record: dict, problems: Callable[[], dict[str, str]]) -> None:
        if not self.next <= index < self.end:
            raise RuntimeError(f"record {index} arrived out of order for {self.target.name} (expected >= {self.next})")
        known = problems() if index > self.next else {}  # the reader names a record as it skips it
        for missing in range(self.next, index):
            self._placeholder(missing, known.get(f"{missing:09d}", MISSING))
        self.sink.write({"__key__": f"{index:09d}", **record})
        self.next = index + 1

    def close(self, problems: dict[str, str]) -> list[int]:
        for missing in range(self.next, self.end):
            self._placeholder(missing, problems.get(f"{missing:09d}", MISSING))
        self.sink.close()
        os.replace(self.tmp, self.target)
        return self.placeholders


@torch.no_grad()
def extract_split(backbone, root: str | Path, split: str, cache: str | Path, *, res: int, batch_size: int,
                  device: torch.device, autocast=None, num_workers: int = 0, evaluation: bool = False,
                  shards_per_worker: int = 8) -> dict:
    """Write this rank's share of ``split``'s feature shards; return counts and the damaged records.

    Ranks take shards round-robin. Shards are read in groups of ``num_workers × shards_per_worker`` by a
    loader with ``num_workers`` worker processes (decoding off the main process); each batch of
    ``batch_size`` images goes through the backbone once and comes back to the host in one copy per
    tensor. A group's shards are renamed into place when the group ends, so a killed extraction resumes
    at the first unfinished group.

    With ``evaluation=True`` (validation splits, at ``eval_res``) each record also holds the features of
    the horizontally flipped crop and the crop itself, which is all the evaluation protocol needs.

    Returns:
        ``{"written", "skipped", "samples", "damaged": [{"shard", "key", "problem"}, ...]}`` (shards
        written and already present, records written with features, records left as placeholders).
    """
    from dist_seg.data.shards import make_loader, resolve_shards, shard_first_indices

    shards = resolve_shards(root, split)
    first = shard_first_indices(shards)
    if first is None:
        raise ValueError(f"{root} split '{split}' has no shard index with sample counts; re-run `dist-seg prepare`")
    out_dir = Path(cache) / split
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = D.get_rank(), D.get_world_size()
    mine = [i for i in range(len(shards.urls)) if i % world == rank]
    todo = [i for i in mine if not (out_dir / Path(shards.urls[i]).name).exists()]
    written = samples = 0
    damaged: list[dict] = []
    group = max(1, num_workers) * max(1, shards_per_worker)
    for g in range(0, len(todo), group):
        ids = todo[g:g + group]
        writers = {}
        for i in ids:
            writers[i] = _FeatureShardWriter(out_dir / Path(shards.urls[i]).name, first[shards.urls[i]],
                                             shards.nsamples[i])
        order = sorted(ids, key=lambda i: first[shards.urls[i]])
        starts = [first[shards.urls[i]] for i in order]
        loader, _ = make_loader([shards.urls[i] for i in ids], split, batch_size=batch_size, res=res,
                                num_workers=min(num_workers, len(ids)), shuffle=False, infinite=False,
                                decode="image", nodesplitter=None)

        def named(counter=loader.skip_counter) -> dict[str, str]:
            return {r.key: r.problem for r in counter.damaged()}

        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            with (autocast() if autocast else torch.autocast(device.type, enabled=False)):
                feats = backbone.patch_features(images).float()
                flipped = backbone.patch_features(images.flip(-1)).float() if evaluation else None
            gap = torch.nn.functional.normalize(feats.mean(dim=(2, 3)), dim=1, eps=1e-10)
            # One device-to-host copy per tensor for the whole batch, then plain numpy slicing per record.
            feats_host = feats.half().cpu().numpy()
            gap_host = gap.float().cpu().numpy()
            flip_host = flipped.half().cpu().numpy() if evaluation else None
            labels = batch["label"].numpy().copy()
            labels[labels < 0] = 255
            images_host = batch["image"].permute(0, 2, 3, 1).numpy() if evaluation else None
            for j, index in enumerate(batch["index"].tolist()):
                record = {
                    "feat.npy": feats_host[j],
                    "gap.npy": gap_host[j],
                    "label.png": _png_bytes(labels[j]),
                    "json": json.dumps({"index": index}).encode(),
                }
                if evaluation:
                    record["feat_flip.npy"] = flip_host[j]
                    record["png"] = _png_bytes(images_host[j])
                writers[order[bisect.bisect_right(starts, index) - 1]].write(index, record, named)
                samples += 1
        problems = {r.key: r.problem for r in loader.skip_counter.damaged()}
        for i in ids:
            for index in writers[i].close(problems):
                key = f"{index:09d}"
                damaged.append({"shard": Path(shards.urls[i]).name, "key": key,
                                "problem": problems.get(key, MISSING)})
            written += 1
    return {"written": written, "skipped": len(mine) - len(todo), "samples": samples, "damaged": damaged}


def extract(cfg, *, splits: Optional[list[str]] = None, cache: Optional[str] = None, accelerator=None) -> Path:
    """Build (or complete) the feature cache of a run config's dataset; returns the cache folder."""
    from dist_seg.backbones import backbone_dtype, load_backbone
    from dist_seg.data.manifest import read_manifest
    from dist_seg.runtime import default_cache_dir, make_accelerator

    own = accelerator is None
    accelerator = accelerator or make_accelerator(cfg)
    try:
        cache_dir = Path(cache or cfg.data.feature_cache or default_cache_dir(cfg))
        manifest = read_manifest(cfg.data.root)
        splits = splits or [cfg.data.train_split]
        backbone = load_backbone(cfg.backbone.name, cfg.backbone.weights, allow_download=cfg.backbone.allow_download,
                                 dtype=backbone_dtype(cfg.backbone.dtype, cfg.train.mixed_precision))
        backbone = backbone.to(accelerator.device)
        provenance = {"backbone": cfg.backbone.name, "weights_id": backbone.weights_id, "res": cfg.data.res,
                      "eval_res": cfg.data.eval_res, "feat_dim": backbone.embed_dim,
                      "patch_size": backbone.patch_size, "dataset_root": str(Path(cfg.data.root).resolve())}
        if (cache_dir / CACHE_INFO).is_file():
            old = read_cache_info(cache_dir)
            clash = {k: (old.get(k), v) for k, v in provenance.items() if k != "dataset_root" and old.get(k) != v}
            if clash:
                raise ValueError(f"{cache_dir} holds features of another configuration {clash}; "
                                 f"remove it or choose data.feature_cache")
        for split in splits:
            if split not in manifest.splits:
                raise ValueError(f"{cfg.data.root} has no split '{split}' (it has {sorted(manifest.splits)})")
            evaluation = split == cfg.data.val_split
            counts = extract_split(backbone, cfg.data.root, split, cache_dir,
                                   res=cfg.data.eval_res if evaluation else cfg.data.res,
                                   batch_size=inference_batch(cfg), num_workers=cfg.data.num_workers,
                                   device=accelerator.device, autocast=accelerator.autocast, evaluation=evaluation)
            log.info("rank %d: split %s: %d shards written, %d already present, %d records", accelerator.process_index,
                     split, counts["written"], counts["skipped"], counts["samples"])
            _report_damage(cache_dir, split, counts["damaged"])
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_cache_manifest(cache_dir, manifest, splits, provenance)
        accelerator.wait_for_everyone()
        return cache_dir
    finally:
        if own:
            accelerator.end_training()


def _report_damage(cache_dir: Path, split: str, damaged: list[dict]) -> None:
    """Gather every rank's damaged records, log them and write ``<cache>/<split>/damaged.json`` (collective)."""
    from dist_seg.data.shards import DamagedRecord, describe_damage

    everything = sorted((r for part in D.all_gather_object(damaged) for r in part),
                        key=lambda r: (r["shard"], r["key"]))
    if not D.is_main_process():
        return
    path = cache_dir / split / DAMAGE_REPORT
    if everything:
        log.warning("split %s: %d damaged records written as placeholders (skipped by every reader): %s; the list is "
                    "in %s", split, len(everything), describe_damage([DamagedRecord(**r) for r in everything]), path)
        path.write_text(json.dumps({"split": split, "damaged": everything}, indent=1) + "\n")
    else:
        path.unlink(missing_ok=True)


def _write_cache_manifest(cache_dir: Path, manifest, splits: list[str], provenance: dict) -> None:
    from dist_seg.data.manifest import SplitInfo, write_manifest
    from dist_seg.data.shards import write_wids_index

    new_splits = {}
    for split in splits:
        src = manifest.splits[split]
        missing = [s for s in src.shards if not (cache_dir / split / s).is_file()]
        if missing:
            raise RuntimeError(f"feature shards missing after extraction: {missing[:3]}")
        write_wids_index(cache_dir / split, src.shards)
        new_splits[split] = SplitInfo(num_samples=src.num_samples, shards=list(src.shards),
                                      has_labels=src.has_labels, crop=src.crop)
    old = {}
    try:
        from dist_seg.data.manifest import read_manifest

        old = read_manifest(cache_dir).splits
    except FileNotFoundError:
        pass
    cache_manifest = type(manifest)(name=manifest.name, num_classes=manifest.num_classes,
                                    class_names=manifest.class_names, colors=manifest.colors,
                                    splits={**old, **new_splits}, extra={"features": provenance})
    write_manifest(cache_dir, cache_manifest)
    (cache_dir / CACHE_INFO).write_text(json.dumps(provenance, indent=2))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from dist_seg.runtime import add_recipe_arguments

    add_recipe_arguments(parser)
    parser.add_argument("--splits", nargs="+", default=None,
                        help="splits to extract (default: the training split; add the validation split, e.g. "
                             "`--splits train val`, to evaluate from the cache too)")
    parser.add_argument("--cache", default=None, help="cache folder (default: <data.root>/features/<backbone>_<res>)")


def run(args: argparse.Namespace) -> int:
    from dist_seg.config import ConfigError
    from dist_seg.runtime import config_from_args, setup_logging

    setup_logging()
    try:
        cfg = config_from_args(args)
        cache = extract(cfg, splits=args.splits, cache=args.cache)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if D.is_main_process():
        print(f"feature cache ready: {cache} (train with train.mode=cached data.feature_cache={cache})")
        for report in sorted(Path(cache).glob(f"*/{DAMAGE_REPORT}")):
            count = len(json.loads(report.read_text())["damaged"])
            print(f"skipped {count} damaged records of split '{report.parent.name}' (placeholders in the cache, "
                  f"listed in {report}; `dist-seg check-data {cfg.data.root}` shows what is wrong)")
    return 0
