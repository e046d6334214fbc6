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
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from dist_seg import distributed as D

log = logging.getLogger(__name__)
CACHE_INFO = "cache.json"


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


def _png_bytes(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def extract_split(backbone, root: str | Path, split: str, cache: str | Path, *, res: int, batch_size: int,
                  device: torch.device, autocast=None, num_workers: int = 0, evaluation: bool = False) -> dict:
    """Write this rank's share of ``split``'s feature shards; return counts (written / skipped shards).

    With ``evaluation=True`` (validation splits, at ``eval_res``) each record also holds the features of
    the horizontally flipped crop and the crop itself, which is all the evaluation protocol needs.
    """
    import webdataset as wds

    from dist_seg.data.manifest import read_manifest
    from dist_seg.data.shards import make_loader

    info = read_manifest(root).splits[split]
    out_dir = Path(cache) / split
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = D.get_rank(), D.get_world_size()
    written = skipped = samples = 0
    for i, shard in enumerate(info.shards):
        if i % world != rank:
            continue
        target = out_dir / shard
        if target.exists():
            skipped += 1
            continue
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        loader, _ = make_loader([str(Path(root) / split / shard)], split, batch_size=batch_size, res=res,
                                num_workers=num_workers, shuffle=False, infinite=False, decode="image",
                                nodesplitter=None)
        with wds.TarWriter(str(tmp)) as sink:
            for batch in loader:
                images = batch["image"].to(device)
                with (autocast() if autocast else torch.autocast(device.type, enabled=False)):
                    feats = backbone.patch_features(images).float()
                    flipped = backbone.patch_features(images.flip(-1)).float() if evaluation else None
                gap = torch.nn.functional.normalize(feats.mean(dim=(2, 3)), dim=1, eps=1e-10)
                labels = batch["label"].clone()
                labels[labels < 0] = 255
                for j in range(images.shape[0]):
                    index = int(batch["index"][j])
                    record = {
                        "__key__": f"{index:09d}",
                        "feat.npy": feats[j].half().cpu().numpy(),
                        "gap.npy": gap[j].cpu().numpy().astype(np.float32),
                        "label.png": _png_bytes(labels[j].numpy()),
                        "json": json.dumps({"index": index}).encode(),
                    }
                    if evaluation:
                        record["feat_flip.npy"] = flipped[j].half().cpu().numpy()
                        record["png"] = _png_bytes(batch["image"][j].permute(1, 2, 0).numpy())
                    sink.write(record)
                    samples += 1
        os.replace(tmp, target)
        written += 1
    return {"written": written, "skipped": skipped, "samples": samples}


def extract(cfg, *, splits: Optional[list[str]] = None, cache: Optional[str] = None, accelerator=None) -> Path:
    """Build (or complete) the feature cache of a run config's dataset; returns the cache folder."""
    from dist_seg.backbones import load_backbone
    from dist_seg.data.manifest import read_manifest
    from dist_seg.runtime import default_cache_dir, make_accelerator

    own = accelerator is None
    accelerator = accelerator or make_accelerator(cfg)
    try:
        cache_dir = Path(cache or cfg.data.feature_cache or default_cache_dir(cfg))
        manifest = read_manifest(cfg.data.root)
        splits = splits or [cfg.data.train_split]
        backbone = load_backbone(cfg.backbone.name, cfg.backbone.weights, allow_download=cfg.backbone.allow_download,
                                 dtype=cfg.train.mixed_precision).to(accelerator.device)
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
                                   batch_size=max(1, cfg.data.batch_size // accelerator.num_processes),
                                   device=accelerator.device, autocast=accelerator.autocast, evaluation=evaluation)
            log.info("rank %d: split %s: %s", accelerator.process_index, split, counts)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_cache_manifest(cache_dir, manifest, splits, provenance)
        accelerator.wait_for_everyone()
        return cache_dir
    finally:
        if own:
            accelerator.end_training()


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
    return 0
