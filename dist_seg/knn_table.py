"""The training set's KNN table (SPEC §2, STEGO §3.3): descriptors, provenance, files, ``dist-seg knn``.

``dist-seg knn`` computes GAP descriptors (from the feature cache or from image shards and the frozen
backbone), the exact cross-rank table (:func:`dist_seg.knn.distributed_knn`), and saves it with its
provenance (:func:`save_knn_table`). Training loads it (:func:`ensure_knn_table`) and refuses a table
computed for other data, another split, resolution or backbone (:class:`KnnTableError`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from dist_seg import distributed as D
from dist_seg.knn import BACKENDS, distributed_knn
from dist_seg.runtime import add_recipe_arguments

__all__ = [
    "DEFAULT_K",
    "KnnTableError",
    "build_knn_table",
    "compute_descriptors",
    "fill_missing_rows",
    "gather_descriptors",
    "configure_parser",
    "ensure_knn_table",
    "load_knn_table",
    "run",
    "save_knn_table",
    "table_path",
]

log = logging.getLogger(__name__)

DEFAULT_K = 30
TABLE_FORMAT = "dist_seg-knn-v1"


class KnnTableError(ValueError):
    """A stored KNN table is missing, malformed, or was computed for other data / another backbone."""


# --------------------------------------------------------------------------------------------- files
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def save_knn_table(
    path: Union[str, os.PathLike], sims: torch.Tensor, indices: torch.Tensor, *, provenance: Mapping[str, Any]
) -> Path:
    """Write a KNN table and what it was computed from to an ``.npz`` file (atomically).

    Args:
        path: output file.
        sims: ``[N, k]`` similarities.
        indices: ``[N, k]`` neighbour indices.
        provenance: JSON-serialisable facts that identify the inputs, e.g. ``backbone``, ``weights_id``,
            ``res``, ``split``, ``num_samples``, ``crop``; ``k`` and ``num_samples`` are filled in if absent.

    Returns:
        The path written.
    """
    path = Path(path)
    if sims.shape != indices.shape or indices.ndim != 2:
        raise ValueError(f"sims {tuple(sims.shape)} and indices {tuple(indices.shape)} must both be [N, k]")
    meta = _jsonable(dict(provenance))
    meta.setdefault("k", int(indices.shape[1]))
    meta.setdefault("num_samples", int(indices.shape[0]))
    meta["format"] = TABLE_FORMAT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            similarities=sims.detach().cpu().float().numpy(),
            indices=indices.detach().cpu().long().numpy(),
            provenance=np.array(json.dumps(meta, sort_keys=True)),
        )
    os.replace(tmp, path)
    return path


def load_knn_table(
    path: Union[str, os.PathLike], *, expect: Optional[Mapping[str, Any]] = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read a table written by :func:`save_knn_table`.

    Args:
        path: the ``.npz`` file.
        expect: provenance entries that must match (e.g. ``{"backbone": "dino_vits8", "res": 224,
            "split": "train", "num_samples": 5000}``).

    Returns:
        ``(similarities float32 [N, k], indices int64 [N, k], provenance dict)``.

    Raises:
        KnnTableError: missing or malformed file, or provenance different from ``expect``; the message
            says to re-run ``dist-seg knn``.
    """
    path = Path(path)
    rerun = "run `dist-seg knn` for this dataset split and backbone to (re)build it"
    if not path.is_file():
        raise KnnTableError(f"no KNN table at {path}; {rerun}")
    try:
        with np.load(path, allow_pickle=False) as data:
            sims = torch.from_numpy(data["similarities"].astype(np.float32))
            indices = torch.from_numpy(data["indices"].astype(np.int64))
            meta = json.loads(str(data["provenance"]))
    except (OSError, KeyError, ValueError) as err:
        raise KnnTableError(f"{path} is not a KNN table written by dist-seg ({err}); {rerun}") from None
    if meta.get("format") != TABLE_FORMAT or indices.shape != sims.shape or indices.ndim != 2:
        raise KnnTableError(f"{path} has format {meta.get('format')!r} / shape {tuple(indices.shape)}; {rerun}")
    if meta.get("num_samples") != indices.shape[0]:
        raise KnnTableError(f"{path} says {meta.get('num_samples')} samples but holds {indices.shape[0]} rows; {rerun}")
    if expect:
        wanted = _jsonable(dict(expect))
        wrong = {key: (meta.get(key, "<missing>"), value) for key, value in wanted.items()
                 if meta.get(key, "<missing>") != value}
        if wrong:
            detail = "; ".join(f"{key}: table has {have!r}, expected {want!r}" for key, (have, want) in wrong.items())
            raise KnnTableError(f"KNN table {path} does not match this run ({detail}). Re-run `dist-seg knn` "
                                f"with the current dataset, split, resolution and backbone.")
    return sims, indices, meta


# ----------------------------------------------------------------------------------------- descriptors
def _local_descriptors(
    batches: Iterable[Mapping[str, torch.Tensor]], *, backbone=None, device: Union[str, torch.device] = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [n], L2-normalised GAP descriptors [n, C]) of the batches this process reads."""
    indices, descs = [], []
    for batch in batches:
        index = torch.as_tensor(batch["index"]).long().reshape(-1)
        if batch.get("gap") is not None:
            desc = F.normalize(torch.as_tensor(batch["gap"]).float(), dim=1, eps=1e-10)
        elif batch.get("image") is not None:
            if backbone is None:
                raise ValueError("image batches need a backbone to compute descriptors")
            desc = backbone.global_descriptor(torch.as_tensor(batch["image"]).to(device))
        else:
            raise ValueError(f"a batch needs 'gap' or 'image' next to 'index'; got keys {sorted(batch)}")
        indices.append(index.to(device))
        descs.append(desc.to(device))
    if not descs:
        width = backbone.embed_dim if backbone is not None else 0
        return torch.empty(0, dtype=torch.long, device=device), torch.empty((0, width), device=device)
    return torch.cat(indices), torch.cat(descs)


def _assemble(index: torch.Tensor, desc: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(descriptors [N, C] in index order, bool [N]: which samples were read)."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_samples):
        raise ValueError(f"sample index out of range 0..{num_samples - 1}: {int(index.min())}..{int(index.max())}")
    full = torch.zeros((num_samples, desc.shape[1]), dtype=torch.float32, device=desc.device)
    seen = torch.zeros(num_samples, dtype=torch.bool, device=desc.device)
    full[index] = desc.float()
    seen[index] = True
    return full, seen


def gather_descriptors(
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    num_samples: int,
    backbone=None,
    device: Union[str, torch.device] = "cpu",
    gather: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`compute_descriptors`, but samples nobody could read are allowed.

    Returns:
        ``(descriptors float32 [num_samples, C], present bool [num_samples])``; rows of absent samples
        (damaged records the loader skipped) are zero.
    """
    index, desc = _local_descriptors(batches, backbone=backbone, device=device)
    if gather:
        index, desc = D.all_gather_variable(index), D.all_gather_variable(desc.float())
    return _assemble(index, desc, num_samples)


def compute_descriptors(
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    num_samples: int,
    backbone=None,
    device: Union[str, torch.device] = "cpu",
    gather: bool = False,
) -> torch.Tensor:
    """GAP descriptors of a split in global index order.

    Args:
        batches: dicts with ``index`` ``[B]`` and either ``gap`` ``[B, C]`` (feature cache) or ``image``
            uint8 ``[B, 3, H, W]`` (then ``backbone`` computes ``norm(mean of patch features)``).
        num_samples: samples in the split; every index ``0..num_samples-1`` must be read (by some rank).
        backbone: a :class:`dist_seg.backbones.Backbone` for image batches.
        device: where the backbone runs and the descriptors are returned.
        gather: combine the batches read by all ranks (each rank reads its own shards).

    Returns:
        float32 ``[num_samples, C]`` L2-normalised descriptors (on every rank when ``gather``).
    """
    full, seen = gather_descriptors(batches, num_samples=num_samples, backbone=backbone, device=device, gather=gather)
    if not bool(seen.all()):
        missing = (~seen).nonzero().squeeze(1)[:10].tolist()
        raise ValueError(f"descriptors missing for {int((~seen).sum())} of {num_samples} samples (first: {missing}); "
                         "every sample of the split must be read once (shuffle=False, infinite=False)")
    return full


def fill_missing_rows(sims: torch.Tensor, indices: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Expand a table over the present samples to all N samples, for damaged (absent) ones.

    ``sims``/``indices`` are ``[M, k]`` over the present samples, indices already in global numbering.
    An absent sample is never a neighbour (it was not searched); its own row points at the ``k`` present
    samples that follow it in index order (cyclically), with similarity ``-inf``, so that any lookup by
    index stays valid although the stream never yields it as an anchor.
    """
    num_samples, k = present.shape[0], indices.shape[1]
    full_idx = torch.empty((num_samples, k), dtype=torch.long, device=indices.device)
    full_sims = torch.full((num_samples, k), float("-inf"), dtype=sims.dtype, device=sims.device)
    valid = present.nonzero().squeeze(1).to(indices.device)
    full_idx[valid] = indices
    full_sims[valid.to(sims.device)] = sims
    absent = (~present).nonzero().squeeze(1).to(indices.device)
    if absent.numel():
        after = torch.searchsorted(valid, absent)  # position of the first present sample past each absent one
        offsets = (after[:, None] + torch.arange(k, device=indices.device)[None, :]) % valid.numel()
        full_idx[absent] = valid[offsets]
    return full_sims, full_idx


# ------------------------------------------------------------------------------------ tables of runs
def default_table_path(root: Union[str, os.PathLike], split: str, backbone: str, res: int) -> Path:
    """Where a table goes when ``data.knn_table`` is not set: ``<root>/knn/<split>_<backbone>_<res>.npz``."""
    return Path(root) / "knn" / f"{split}_{backbone}_{res}.npz"


def table_path(cfg) -> Path:
    """The KNN table file of a run config."""
    return Path(cfg.data.knn_table or default_table_path(cfg.data.root, cfg.data.train_split, cfg.backbone.name,
                                                         cfg.data.res))


def _data_fingerprint(manifest, split: str) -> str:
    """Hash of what the manifest says about the split (shards, sizes, crop) and the dataset's parameters."""
    import dataclasses
    import hashlib

    info = dataclasses.asdict(manifest.split(split))
    text = json.dumps({"name": manifest.name, "split": info, "extra": manifest.extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expected_provenance(cfg, *, weights_id: Optional[str]) -> dict[str, Any]:
    """The provenance a table must carry to serve the run ``cfg`` (compared by :func:`load_knn_table`)."""
    from dist_seg.data.manifest import read_manifest

    manifest = read_manifest(cfg.data.root, dataset=cfg.data.dataset)
    split = cfg.data.train_split
    info = manifest.split(split)
    return {
        "dataset": manifest.name,
        "split": split,
        "num_samples": info.num_samples,
        "crop": info.crop,
        "data_fingerprint": _data_fingerprint(manifest, split),
        "res": cfg.data.res,
        "backbone": cfg.backbone.name,
        "weights_id": weights_id,
    }


def _descriptor_source(cfg, *, backbone=None, cache=None, device="cpu"):
    """(backbone or None, cache or None, weights_id) for computing the run's descriptors."""
    if cache is not None:
        from dist_seg.features import read_cache_info

        info = read_cache_info(cache)
        for key, value in {"backbone": cfg.backbone.name, "res": cfg.data.res}.items():
            if info.get(key) != value:
                raise KnnTableError(f"feature cache {cache} holds {key}={info.get(key)!r} but the run uses {value!r}; "
                                    "point data.feature_cache at a matching cache or re-run `dist-seg extract`")
        return None, cache, info.get("weights_id")
    if backbone is None:
        from dist_seg.backbones import backbone_dtype, load_backbone

        backbone = load_backbone(cfg.backbone.name, cfg.backbone.weights, allow_download=cfg.backbone.allow_download,
                                 dtype=backbone_dtype(cfg.backbone.dtype, cfg.train.mixed_precision)).to(device)
    return backbone, None, backbone.weights_id


def build_knn_table(
    cfg,
    *,
    backbone=None,
    cache: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    k: int = DEFAULT_K,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Compute the run's KNN table on all ranks (collective: every rank must call it).

    Descriptors come from the feature cache ``cache`` (its ``gap`` entries) when given, otherwise from the
    image shards of ``cfg.data.root`` through ``backbone`` (loaded from ``cfg.backbone`` if None). Each
    rank reads its share of the shards; the descriptors are gathered in index order and the search is
    split across ranks (:func:`distributed_knn`).

    Returns:
        ``(similarities [N, k], indices [N, k], provenance)``, identical on every rank.
    """
    from dist_seg.data.manifest import read_manifest
    from dist_seg.data.shards import make_loader
    from dist_seg.features import inference_batch

    # a missing dataset is reported before any model loads
    read_manifest(cfg.data.root, dataset=cfg.data.dataset).split(cfg.data.train_split)
    device = torch.device(device)
    backbone, cache, weights_id = _descriptor_source(cfg, backbone=backbone, cache=cache, device=device)
    provenance = expected_provenance(cfg, weights_id=weights_id)
    provenance["source"] = "feature cache" if cache is not None else "images"
    split, num_samples = cfg.data.train_split, provenance["num_samples"]
    loader, _ = make_loader(cache if cache is not None else cfg.data.root, split,
                            batch_size=inference_batch(cfg), res=cfg.data.res,
                            num_workers=cfg.data.num_workers, seed=cfg.train.seed, shuffle=False, infinite=False,
                            decode="features" if cache is not None else "image")
    start = time.perf_counter()
    full, present = gather_descriptors(loader, num_samples=num_samples, backbone=backbone, device=device, gather=True)
    provenance["descriptor_seconds"] = round(time.perf_counter() - start, 3)
    # Damaged records (skipped by the loader on some rank) are absent: the table is built over the samples that
    # exist, so no sample is ever paired with a missing one (see fill_missing_rows for the absent rows).
    provenance["damaged"] = _absent_records(cache if cache is not None else cfg.data.root, split, present)
    valid = present.nonzero().squeeze(1)
    count = valid.numel()
    if count < 2:
        from dist_seg.data.manifest import DataError

        raise DataError(f"only {count} of {num_samples} samples of '{split}' could be read; repair the data "
                        f"(`dist-seg check-data {cfg.data.root}` lists what is damaged, `dist-seg prepare ... "
                        "--overwrite` rewrites it)")
    if k > count - 1:
        log.warning("only %d readable samples: storing %d neighbours instead of %d", count, count - 1, k)
        k = count - 1
    rank, world = D.get_rank(), D.get_world_size()
    lo, hi = rank * count // world, (rank + 1) * count // world
    start = time.perf_counter()
    # `full` is already on every rank: the search reuses it as its keys instead of gathering it again (C14).
    keys = full[valid]
    sims, indices = distributed_knn(keys[lo:hi], k, exclude_self=True, backend=backend, chunk_size=chunk_size,
                                    keys=keys)
    sims, indices = fill_missing_rows(sims, valid.to(indices.device)[indices], present)
    provenance["search_seconds"] = round(time.perf_counter() - start, 3)
    provenance["world_size"] = world
    return sims.cpu(), indices.cpu(), provenance


def _absent_records(root, split: str, present: torch.Tensor) -> list[dict[str, str]]:
    """(shard, key) of every sample that no rank could read, named from the split's shard sizes."""
    from dist_seg.data.shards import locate_record, resolve_shards

    absent = (~present).nonzero().squeeze(1).tolist()
    if not absent:
        return []
    shards = resolve_shards(root, split)
    out = [{"shard": r.shard, "key": r.key} for r in (locate_record(shards, index) for index in absent)]
    log.warning("KNN table: %d of %d samples could not be read and are left out (never a neighbour): %s",
                len(absent), present.numel(), ", ".join(f"{r['shard']}/{r['key']}" for r in out[:20])
                + (" ..." if len(out) > 20 else ""))
    return out


_VOLATILE = ("source", "descriptor_seconds", "search_seconds", "world_size", "k", "format")


def ensure_knn_table(
    cfg,
    *,
    backbone=None,
    cache: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    k: int = DEFAULT_K,
    backend: str = "auto",
) -> torch.Tensor:
    """The run's KNN indices ``[N, k]``: loaded from :func:`table_path` or, if absent, built and saved.

    Collective: call it on every rank. A table that exists but was computed for other data, another
    split, resolution or backbone raises :class:`KnnTableError` (re-run ``dist-seg knn``) instead of
    being silently replaced.
    """
    path = table_path(cfg)
    exists = D.broadcast_object(path.is_file())  # one decision for all ranks: building is collective
    if exists:
        if cache is not None:
            from dist_seg.features import read_cache_info

            weights_id = read_cache_info(cache).get("weights_id")
        else:
            backbone, _, weights_id = _descriptor_source(cfg, backbone=backbone, device=device)
        _, indices, meta = load_knn_table(path, expect=expected_provenance(cfg, weights_id=weights_id))
        if meta.get("damaged"):
            log.warning("the KNN table %s leaves out %d damaged samples (never used as neighbours); once the data "
                        "is repaired, re-run `dist-seg knn` to include them", path, len(meta["damaged"]))
        return indices
    log.info("no KNN table at %s: mining it now (exact)", path)
    _, indices, _ = _build_and_save(cfg, path, backbone=backbone, cache=cache, device=device, k=k, backend=backend)
    return indices


def _build_and_save(cfg, path: Path, **kwargs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    sims, indices, provenance = build_knn_table(cfg, **kwargs)
    if D.is_main_process():
        save_knn_table(path, sims, indices, provenance=provenance)
        log.info("KNN table of %d samples (k=%d) written to %s", indices.shape[0], indices.shape[1], path)
    D.barrier()
    return sims, indices, provenance


# ------------------------------------------------------------------------------------------------ cli
def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, overrides_help="config overrides (e.g. backbone.weights=PATH data.root=DIR)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"neighbours stored per sample (default {DEFAULT_K})")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="exact search backend (default auto)")
    parser.add_argument("--chunk-size", type=int, default=None, help="queries per block of the torch backend")
    parser.add_argument("--out", default=None, help="table file (default: data.knn_table, else "
                                                     "<data.root>/knn/<split>_<backbone>_<res>.npz)")
    parser.add_argument("--features", action="store_true",
                        help="read descriptors from the feature cache (data.feature_cache, else the default "
                             "cache folder) instead of running the backbone on the images")


def run(args: argparse.Namespace) -> int:
    """``dist-seg knn``: descriptors → exact cross-rank KNN table → ``.npz`` with provenance."""
    from dist_seg.backbones import BackboneWeightsError
    from dist_seg.config import ConfigError
    from dist_seg.data.manifest import DataError
    from dist_seg.runtime import config_from_args, default_cache_dir, make_accelerator, setup_logging

    setup_logging()
    try:
        cfg = config_from_args(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    accelerator = make_accelerator(cfg)
    try:
        cache = (cfg.data.feature_cache or default_cache_dir(cfg)) if args.features else None
        path = Path(args.out) if args.out else table_path(cfg)
        sims, indices, provenance = _build_and_save(cfg, path, cache=cache, device=accelerator.device, k=args.k,
                                                    backend=args.backend, chunk_size=args.chunk_size)
        if D.is_main_process():
            print(f"knn table: {indices.shape[0]} samples x {indices.shape[1]} neighbours -> {path} "
                  f"(descriptors {provenance['descriptor_seconds']:.1f}s, search {provenance['search_seconds']:.1f}s "
                  f"on {provenance['world_size']} process(es))")
            if provenance["damaged"]:
                print(f"skipped {len(provenance['damaged'])} damaged records (left out of the table, listed in its "
                      f"provenance; `dist-seg check-data {cfg.data.root}` shows what is wrong)")
        return 0
    except (BackboneWeightsError, DataError, KnnTableError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        accelerator.end_training()
