"""Object masks mined from the last self-attention block of a frozen ViT (SPEC §8.1): the ``masks`` stage.

:func:`mine_object_mask` turns one image's queries and keys into a patch-grid mask; :func:`mine_image_mask`
runs it on an image at SPEC §8.1's resolution and brings the mask back to pixels; :func:`mine_masks`
does it for every record of a split, sharded across ranks, and writes ``masks_<split>.json``
(:mod:`dist_seg.maskdistill`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TVF
from PIL import Image
from pycocotools import mask as mask_utils

from dist_seg import distributed as D
from dist_seg.maskdistill.files import MaskDistillFileError, masks_path, read_json, write_json_atomic

__all__ = [
    "DegenerateAttentionError",
    "MINERS",
    "configure_parser",
    "dino_attention_mask",
    "encode_mask",
    "lost_object_mask",
    "mine_grid_mask",
    "mine_image_mask",
    "mine_masks",
    "mine_object_mask",
    "mining_provenance",
    "run",
]

log = logging.getLogger(__name__)

MASKS_COMMAND = "dist-seg masks RECIPE"
# The provenance keys a masks file must match to be reused (``name`` adds its own keys beside them).
PROVENANCE_KEYS = ("stage", "split", "method", "backbone", "weights_id", "heads", "topk", "mass", "dino_mass", "lost_k",
                   "short_side", "dataset", "dataset_fingerprint", "num_images")
# What a file written before a key existed means by it (files from before the baselines are MaskDistill's).
PROVENANCE_DEFAULTS = {"method": "maskdistill", "dino_mass": None, "lost_k": None}


class DegenerateAttentionError(ValueError):
    """The attention of an image defines no object (all-zero CLS attention or keys): nothing can be mined."""


def _check_tokens(q: torch.Tensor, k: torch.Tensor, grid_w: int) -> tuple[int, int]:
    """Shapes and values shared by every miner: one image's ``[L, 1+N, d]`` queries and keys on a grid."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        raise ValueError("q and k must be torch tensors [L, 1+N, d]")
    if q.ndim != 3 or k.ndim != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [L, 1+N, d] (one image, CLS first), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}; drop the batch dim and the register tokens first")
    num_patches = q.shape[1] - 1
    if num_patches < 1:
        raise ValueError(f"q and k hold {q.shape[1]} token(s); need the CLS token and at least one patch")
    if not isinstance(grid_w, int) or grid_w < 1 or num_patches % grid_w:
        raise ValueError(f"grid_w={grid_w!r} does not divide the {num_patches} patch tokens into rows")
    if not (torch.isfinite(q).all() and torch.isfinite(k).all()):
        raise ValueError("q and k contain NaN or infinite values")
    return num_patches // grid_w, grid_w


def _check_mass(mass: float, name: str = "mass") -> None:
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"{name}={mass!r} must be in (0, 1]")


def _check_qk(q: torch.Tensor, k: torch.Tensor, grid_w: int, heads: int, topk: float, mass: float) -> tuple[int, int]:
    grid_h, grid_w = _check_tokens(q, k, grid_w)
    num_heads, num_patches = q.shape[0], grid_h * grid_w
    if not isinstance(heads, int) or not 1 <= heads <= num_heads:
        raise ValueError(f"heads={heads!r} must be an int in 1..{num_heads} (the attention has {num_heads} heads)")
    _check_mass(mass)
    if not 0.0 < topk <= 1.0 or int(topk * num_patches) < 1:
        raise ValueError(f"topk={topk!r} selects int(topk * {num_patches}) = {int(topk * num_patches)} patches; "
                         f"choose topk in (0, 1] with topk * N >= 1")
    return grid_h, grid_w


def _mass_keep(a: torch.Tensor, mass: float) -> torch.Tensor:
    """Bool mask of the largest entries of ``a`` holding ``mass`` of its total (DINO's attention threshold).

    Ascending sort (stable: equal entries keep their index order), cumulative share of the total, and the
    entries whose cumulative share exceeds ``1 - mass`` are kept.
    """
    values, order = torch.sort(a, stable=True)
    keep_sorted = torch.cumsum(values / a.sum(), dim=0) > 1 - mass
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def _component(diffused: np.ndarray, source: int, grid_w: int) -> np.ndarray:
    """The 4-connected component of the bool grid ``diffused`` holding patch ``source``."""
    row, col = divmod(source, grid_w)
    if not diffused[row, col]:
        raise DegenerateAttentionError("the source patch's key is zero; no attention component holds it")
    labels, _ = scipy.ndimage.label(diffused)
    return labels == labels[row, col]


@torch.no_grad()
def mine_object_mask(q: torch.Tensor, k: torch.Tensor, grid_w: int, *, heads: int = 5, topk: float = 0.4,
                     mass: float = 0.5) -> np.ndarray:
    """The object mask of one image on the patch grid, from its last-block queries and keys (SPEC §8.1).

    ``a`` is the CLS query's dot product with every patch key, averaged over the first ``heads`` heads; the
    smallest entries holding ``1 - mass`` of its total are zeroed (ascending sort, cumulative share
    ``> 1 - mass`` kept). The ``int(topk * N)`` largest entries form the proposal set P, ties broken to the
    lower patch index (a stable descending sort), and the first of them is the source ``s``. With the key
    graph ``G = Σ_h k_h k_hᵀ`` over the patches (all heads), the proposals similar to the source
    (``G[s, j] > 0``) are diffused (``Σ_i G[i, :] > 0``), and the 4-connected component holding ``s``
    is returned. Equal entries in the mass filter's ascending sort keep their index order too.

    Args:
        q: queries ``[L, 1+N, d]``, token 0 = CLS, patches in raster order, no register tokens.
        k: keys, same shape.
        grid_w: patches per row (``N = g_h * g_w``).
        heads: heads averaged for the CLS attention (the first ``heads`` of L).
        topk: share of the patches proposed.
        mass: share of the CLS attention's total kept by the mass filter.

    Returns:
        bool ``[g_h, g_w]`` numpy array, True on the object; never empty.

    Raises:
        ValueError: bad shapes or parameters.
        DegenerateAttentionError: the CLS attention sums to zero (the mass filter is undefined), or the
            source patch's key is zero (no component holds it).
    """
    grid_h, grid_w = _check_qk(q, k, grid_w, heads, topk, mass)
    q, k = q.double(), k.double()
    num_patches = grid_h * grid_w
    keys = k[:, 1:]
    a = torch.einsum("hd,hnd->hn", q[:heads, 0], keys[:heads]).mean(dim=0)
    if a.sum() == 0:
        raise DegenerateAttentionError("the CLS attention sums to zero; the mass filter is undefined")
    a = a * _mass_keep(a, mass)
    proposals = torch.sort(a, descending=True, stable=True).indices[: int(topk * num_patches)]
    source = int(proposals[0])
    graph = torch.einsum("hnd,hmd->nm", keys, keys)
    similar = proposals[graph[source, proposals] > 0]
    diffused = (graph[similar].sum(dim=0) > 0).reshape(grid_h, grid_w).cpu().numpy()
    return _component(diffused, source, grid_w)


@torch.no_grad()
def dino_attention_mask(q: torch.Tensor, k: torch.Tensor, grid_w: int, *, mass: float = 0.75) -> np.ndarray:
    """DINO's attention mask (Caron et al. 2021), as MaskDistill runs it as a baseline (paper 003, A.4).

    The CLS token's self-attention over the patches, ``softmax(q_h[0] · k_hᵀ / √d)`` over all tokens (the
    attention the block computes) restricted to the patch columns, is summed over *all* heads ("we sum
    the attention heads"); the patches holding ``mass`` of the summed attention (the largest entries, as
    DINO's visualisation thresholds each head; MaskDistill sets 0.75) form the mask. No connected component
    is taken: the mask is every kept patch, as DINO's.

    Args:
        q: queries ``[L, 1+N, d]`` (token 0 = CLS), before the d^-½ scale.
        k: keys, same shape.
        grid_w: patches per row.
        mass: share of the summed CLS attention the mask holds.

    Returns:
        bool ``[g_h, g_w]``, never empty.
    """
    grid_h, grid_w = _check_tokens(q, k, grid_w)
    _check_mass(mass, "dino_mass")
    q, k = q.double(), k.double()
    logits = torch.einsum("hd,hnd->hn", q[:, 0], k) * q.shape[-1] ** -0.5
    attention = logits.softmax(dim=-1)[:, 1:].sum(dim=0)
    return _mass_keep(attention, mass).reshape(grid_h, grid_w).cpu().numpy()


@torch.no_grad()
def lost_object_mask(k: torch.Tensor, grid_w: int, *, num_proposals: int = 400) -> np.ndarray:
    """LOST's object (Siméoni et al. 2021) as a patch-grid mask, from the last block's keys.

    Patch similarity ``A = Σ_h k_h k_hᵀ`` (the keys of all heads concatenated); a patch's degree is its
    number of positive correlations ``#{q : A[p, q] > 0}``. The seed is the patch of lowest degree (an
    object is assumed smaller than the background, so its patches correlate with fewer others); the
    ``num_proposals`` patches of lowest degree (LOST's k: 100 in LOST, 400 in MaskDistill's comparison,
    "we take 400 patch proposals") that correlate positively with the seed form the seed set ``S``; a
    patch belongs to the object when ``Σ_{s∈S} A[s, q] > 0``, and the 4-connected component holding the
    seed is returned. LOST boxes this component; MaskDistill scores masks, so the component itself is the
    output (its tight box is LOST's box at patch resolution). Ties in the degree order go to the lower index.

    Args:
        k: keys ``[L, 1+N, d]`` (token 0 = CLS, ignored).
        grid_w: patches per row.
        num_proposals: LOST's k (clipped to N).

    Returns:
        bool ``[g_h, g_w]``, never empty.

    Raises:
        DegenerateAttentionError: the seed's key is zero.
    """
    grid_h, grid_w = _check_tokens(k, k, grid_w)
    if not isinstance(num_proposals, int) or num_proposals < 1:
        raise ValueError(f"lost_k={num_proposals!r} must be a positive int (LOST's number of patch proposals)")
    keys = k.double()[:, 1:]
    graph = torch.einsum("hnd,hmd->nm", keys, keys)
    degree = (graph > 0).sum(dim=1)
    order = torch.sort(degree, stable=True).indices
    seed = int(order[0])
    proposals = order[:num_proposals]
    similar = proposals[graph[seed, proposals] > 0]
    diffused = (graph[similar].sum(dim=0) > 0).reshape(grid_h, grid_w).cpu().numpy()
    return _component(diffused, seed, grid_w)


MINERS = ("maskdistill", "dino", "lost")


def mine_grid_mask(q: torch.Tensor, k: torch.Tensor, grid_w: int, *, method: str = "maskdistill", heads: int = 5,
                   topk: float = 0.4, mass: float = 0.5, dino_mass: float = 0.75, lost_k: int = 400) -> np.ndarray:
    """The patch-grid object mask of one image by ``method`` (:data:`MINERS`; ``maskdistill.mine.method``)."""
    if method == "maskdistill":
        return mine_object_mask(q, k, grid_w, heads=heads, topk=topk, mass=mass)
    if method == "dino":
        return dino_attention_mask(q, k, grid_w, mass=dino_mass)
    if method == "lost":
        return lost_object_mask(k, grid_w, num_proposals=lost_k)
    raise ValueError(f"maskdistill.mine.method={method!r} is not one of {', '.join(MINERS)}")


# ------------------------------------------------------------------------------------------ images
def _to_pil(image) -> Image.Image:
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"image must be a uint8 tensor [3, H, W], got {image.dtype} {tuple(image.shape)}")
        image = image.permute(1, 2, 0).cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 array [H, W, 3], got {image.dtype} {image.shape}")
    return Image.fromarray(np.ascontiguousarray(image))


@torch.no_grad()
def mine_image_mask(backbone, image, *, heads: int = 5, topk: float = 0.4, mass: float = 0.5,
                    short_side: int = 640, method: str = "maskdistill", dino_mass: float = 0.75,
                    lost_k: int = 400) -> np.ndarray:
    """SPEC §8.1 on one image: the object mask at the image's own size.

    The image's short side is resized to ``short_side`` (PIL bilinear, small images are upscaled), it is
    ImageNet-normalised and zero-padded bottom/right to a multiple of the patch size; the patch-grid mask of
    :func:`mine_object_mask` is upsampled (nearest, ×p), the padding cropped, and resized to the original
    size with PIL bicubic, keeping every pixel > 0 (as the official masks, dilated by 1–2 px).

    Args:
        backbone: a :class:`dist_seg.backbones.Backbone` (any ViT; register tokens are dropped).
        image: uint8 ``[3, H, W]`` tensor or ``[H, W, 3]`` array, RGB.
        heads, topk, mass: as for :func:`mine_object_mask`.
        short_side: side the short image side is resized to.
        method: the miner (:func:`mine_grid_mask`): ``maskdistill`` (SPEC §8.1), ``dino`` or ``lost``.
        dino_mass: attention share of the ``dino`` mask (:func:`dino_attention_mask`).
        lost_k: patch proposals of ``lost`` (:func:`lost_object_mask`).

    Returns:
        bool ``[H, W]`` numpy array.

    Raises:
        DegenerateAttentionError: see :func:`mine_object_mask`.
    """
    pil = _to_pil(image)
    width, height = pil.size
    resized = TVF.resize(pil, short_side, interpolation=TVF.InterpolationMode.BILINEAR)
    x = TVF.to_tensor(resized)
    p = backbone.patch_size
    rh, rw = x.shape[-2:]
    ph, pw = -(-rh // p) * p, -(-rw // p) * p
    # Padding with the ImageNet mean (in [0, 1]) is exactly zero once the backbone normalises the input,
    # which is the official code's zero padding of the normalised image.
    padded = backbone.mean.reshape(3, 1, 1).expand(3, ph, pw).clone().cpu()
    padded[:, :rh, :rw] = x
    q, k = backbone.last_attention_qk(padded[None])
    prefix = backbone.num_prefix_tokens
    # Token 0 is the CLS token; the register tokens (DINOv2-reg) sit between it and the patches.
    keep = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(prefix, q.shape[2])]).to(q.device)
    # Mined where the backbone runs: the N×N key graph is the costly part at 640 px.
    grid = mine_grid_mask(q[0][:, keep], k[0][:, keep], pw // p, method=method, heads=heads, topk=topk, mass=mass,
                          dino_mass=dino_mass, lost_k=lost_k)
    up = F.interpolate(torch.from_numpy(grid)[None, None].float(), scale_factor=p, mode="nearest")[0, 0, :rh, :rw]
    mask = Image.fromarray(up.numpy().astype(np.uint8) * 255).resize((width, height), Image.BICUBIC)
    return np.asarray(mask) > 0


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A bool ``[H, W]`` mask as a COCO annotation body: RLE ``segmentation`` (counts as str), ``area``, ``bbox``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    area = int(mask_utils.area(rle))
    return {"segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": area, "bbox": bbox}


# ------------------------------------------------------------------------------------------ stage
def _dataset_fingerprint(manifest, split: str) -> str:
    """Hash of what the manifest says about the split (shards, sizes) and the dataset's parameters."""
    info = dataclasses.asdict(manifest.split(split))
    text = json.dumps({"name": manifest.name, "split": info, "extra": manifest.extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mining_provenance(cfg, *, split: str, weights_id: str) -> dict[str, Any]:
    """What a masks file of ``split`` must record to serve ``cfg`` (compared on :data:`PROVENANCE_KEYS`)."""
    from dist_seg.data.manifest import read_manifest

    manifest = read_manifest(cfg.data.root, dataset=cfg.data.dataset)
    mine = cfg.maskdistill.mine
    # Only the settings the miner reads are recorded: a baseline's file does not depend on §8.1's settings.
    own = mine.method == "maskdistill"
    return {"stage": "masks", "split": split, "method": mine.method, "backbone": mine.backbone,
            "weights_id": weights_id, "heads": mine.heads if own else None, "topk": mine.topk if own else None,
            "mass": mine.mass if own else None, "dino_mass": mine.dino_mass if mine.method == "dino" else None,
            "lost_k": mine.lost_k if mine.method == "lost" else None, "short_side": mine.short_side,
            "dataset": manifest.name, "dataset_fingerprint": _dataset_fingerprint(manifest, split),
            "num_images": manifest.split(split).num_samples}


def _differences(found: dict, expected: dict) -> list[str]:
    def value(key):
        return found.get(key, PROVENANCE_DEFAULTS.get(key))

    return [f"{key}={value(key)!r} (this run: {expected[key]!r})" for key in PROVENANCE_KEYS
            if value(key) != expected[key]]


def _check_existing(path: Path, expected: dict) -> bool:
    """True when ``path`` is a finished masks file for ``expected``; refuse one from another config."""
    data = read_json(path, what="mined object masks", made_by=MASKS_COMMAND)
    info = data.get("info") if isinstance(data, dict) else None
    if not isinstance(info, dict) or not isinstance(data.get("images"), list):
        raise MaskDistillFileError(f"{path} is not a masks file written by `{MASKS_COMMAND}`; delete it or pass "
                                   f"--overwrite")
    diff = _differences(info, expected)
    if diff:
        raise MaskDistillFileError(f"{path} holds masks mined with another configuration ({'; '.join(diff)}); "
                                   f"pass --overwrite to mine again or set maskdistill.work_dir to another folder")
    if len(data["images"]) != expected["num_images"]:
        raise MaskDistillFileError(f"{path} lists {len(data['images'])} images, the split has "
                                   f"{expected['num_images']}; pass --overwrite to mine again")
    return True


def _parts_dir(path: Path) -> Path:
    return path.with_name(f".{path.stem}.parts")


def _load_part(path: Path, fingerprint: str, start: int, stop: int) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        part = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s is unreadable; mining its images again", path)
        return None
    if part.get("fingerprint") != fingerprint or (part.get("start"), part.get("stop")) != (start, stop):
        log.warning("%s is from another configuration; mining its images again", path)
        return None
    return part


def _mine_chunk(backbone, records, start: int, stop: int, mine, shards=None) -> dict:
    from dist_seg.data.manifest import DataError
    from dist_seg.data.shards import locate_record

    images, annotations, empty, damaged = [], [], [], []
    for index in range(start, stop):
        try:
            image = records[index]["image"]
        except (DataError, IndexError, OSError, ValueError) as err:
            # A damaged record (truncated shard, undecodable image): no mask, counted and named; the run goes on.
            where = locate_record(shards, index) if shards is not None else None
            damaged.append({"id": index, "shard": where.shard if where else "?", "key": f"{index:09d}",
                            "problem": f"{type(err).__name__}: {err}"})
            log.warning("image %d (%s/%09d) is damaged and gets no mask: %s", index,
                        where.shard if where else "?", index, err)
            images.append({"id": index, "key": f"{index:09d}", "width": 0, "height": 0, "damaged": True})
            empty.append(index)
            continue
        height, width = int(image.shape[1]), int(image.shape[2])
        images.append({"id": index, "key": f"{index:09d}", "width": width, "height": height})
        try:
            mask = mine_image_mask(backbone, image, heads=mine.heads, topk=mine.topk, mass=mine.mass,
                                   short_side=mine.short_side, method=mine.method, dino_mass=mine.dino_mass,
                                   lost_k=mine.lost_k)
        except DegenerateAttentionError as err:
            log.warning("image %d: no object mask (%s)", index, err)
            empty.append(index)
            continue
        annotations.append({"image_id": index, "category_id": 1, "iscrowd": 0, **encode_mask(mask)})
    return {"start": start, "stop": stop, "images": images, "annotations": annotations, "empty": empty,
            "damaged": damaged}


def mine_masks(cfg, *, split: Optional[str] = None, accelerator=None, overwrite: bool = False,
               stop_after_chunks: Optional[int] = None) -> Optional[Path]:
    """The ``masks`` stage: one object mask per record of ``split``, written to ``masks_<split>.json``.

    Records are read at their stored (full) resolution. Chunks of ``maskdistill.mine.chunk_size`` records go
    to the ranks in turn (chunk c to rank c mod W); each finished chunk is saved as a part file beside the
    output, so a killed run continues where it stopped. Rank 0 gathers every chunk, writes the COCO-style
    JSON atomically (the same file whatever the number of ranks or interruptions) and removes the parts.
    Images whose attention is degenerate get no annotation; they are counted in ``info["empty_image_ids"]``.

    Args:
        cfg: the run config (``data.root``, ``maskdistill.mine``, ``maskdistill.work_dir``).
        split: the split to mine (default ``data.train_split``).
        accelerator: an ``accelerate`` Accelerator / PartialState for the device; default CUDA if available.
        overwrite: mine again even if a finished file for this configuration exists (else it is kept).
        stop_after_chunks: stop after this many new chunks on each rank and return None, leaving the part
            files (tests use it to interrupt a run).

    Returns:
        The masks file, or None when stopped early.

    Raises:
        MaskDistillFileError: an existing masks file from another configuration (without ``overwrite``).
        DataError: the dataset or split is missing.
    """
    from dist_seg.backbones import load_backbone
    from dist_seg.data.manifest import read_manifest
    from dist_seg.data.shards import IndexedShards, resolve_shards

    split = split or cfg.data.train_split
    mine = cfg.maskdistill.mine
    if mine.chunk_size < 1:
        raise ValueError(f"maskdistill.mine.chunk_size must be >= 1, got {mine.chunk_size}")
    path = masks_path(cfg, split)
    # a missing dataset or split is named before any model is loaded
    read_manifest(cfg.data.root, dataset=cfg.data.dataset).split(split)
    device = accelerator.device if accelerator is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(mine.backbone, weights=mine.weights, allow_download=cfg.backbone.allow_download,
                             weights_key="maskdistill.mine.weights")
    backbone.to(device)
    num_heads = int(backbone.model.blocks[-1].attn.num_heads)
    if mine.method not in MINERS:
        raise ValueError(f"maskdistill.mine.method={mine.method!r} is not one of {', '.join(MINERS)}")
    if mine.method == "maskdistill" and not 1 <= mine.heads <= num_heads:
        raise ValueError(f"maskdistill.mine.heads={mine.heads} but backbone {mine.backbone!r} has {num_heads} "
                         f"attention heads; set maskdistill.mine.heads to 1..{num_heads}")
    expected = mining_provenance(cfg, split=split, weights_id=backbone.weights_id)
    if path.exists() and not overwrite and _check_existing(path, expected):
        log.info("%s is already mined for this configuration; kept (pass --overwrite to mine again)", path)
        return path
    parts = _parts_dir(path)
    D.barrier()  # every rank has checked the old file before rank 0 clears stale parts
    if overwrite and D.is_main_process() and parts.exists():
        shutil.rmtree(parts)
    D.barrier()
    fingerprint = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    num_images = expected["num_images"]
    rank, world = D.get_rank(), D.get_world_size()
    records = IndexedShards(cfg.data.root, split, res=None, decode="image")
    shards = resolve_shards(cfg.data.root, split)
    mine_chunks, new_chunks, started, stopped = [], 0, time.time(), False
    try:
        for chunk, start in enumerate(range(0, num_images, mine.chunk_size)):
            if chunk % world != rank:
                continue
            stop = min(start + mine.chunk_size, num_images)
            part_path = parts / f"part-{chunk:06d}.json"
            part = _load_part(part_path, fingerprint, start, stop)
            if part is None:
                if stop_after_chunks is not None and new_chunks >= stop_after_chunks:
                    stopped = True
                    break
                part = {"fingerprint": fingerprint, **_mine_chunk(backbone, records, start, stop, mine, shards)}
                write_json_atomic(part, part_path)
                new_chunks += 1
                log.info("rank %d: mined images %d..%d of %d (%.1fs)", rank, start, stop - 1, num_images,
                         time.time() - started)
            mine_chunks.append(part)
    finally:
        records.close()
    if any(D.all_gather_object(stopped)):  # every rank stops together, none waits in the gather below
        return None
    gathered = [part for rank_parts in D.all_gather_object(mine_chunks) for part in rank_parts]
    if D.is_main_process():
        gathered.sort(key=lambda part: part["start"])
        images = [image for part in gathered for image in part["images"]]
        if [image["id"] for image in images] != list(range(num_images)):  # pragma: no cover - a logic error
            raise RuntimeError("mined chunks do not cover the split exactly once")
        annotations = [ann for part in gathered for ann in part["annotations"]]
        for number, ann in enumerate(annotations, start=1):
            ann["id"] = number
        empty = [index for part in gathered for index in part["empty"]]
        damaged = [record for part in gathered for record in part.get("damaged", [])]
        info = {**expected, "description": f"object masks mined by {mine.method!r} (SPEC 8.1), one per image",
                "num_annotations": len(annotations), "empty_image_ids": empty, "damaged": damaged}
        if damaged:
            log.warning("%s: %d damaged images got no mask (listed under info.damaged): %s", path, len(damaged),
                        ", ".join(f"{r['shard']}/{r['key']}" for r in damaged[:20]))
        write_json_atomic({"info": info, "images": images, "annotations": annotations,
                           "categories": [{"id": 1, "name": "object", "supercategory": ""}]}, path)
        shutil.rmtree(parts, ignore_errors=True)
        log.info("%s: %d masks for %d images (%d without a mask)", path, len(annotations), num_images, len(empty))
    D.barrier()
    return path


# ------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dist-seg masks RECIPE [key=value ...]``."""
    from dist_seg.runtime import add_recipe_arguments

    add_recipe_arguments(parser, overrides_help="config overrides, e.g. maskdistill.mine.short_side=320")
    parser.add_argument("--split", default=None, help="split to mine (default: data.train_split)")
    parser.add_argument("--overwrite", action="store_true", help="mine again even if a finished file exists")


def load_stage_config(args: argparse.Namespace):
    """Set up logging and resolve the recipe plus ``--config`` files and overrides (shared by the stages)."""
    from dist_seg import runtime as rt

    rt.setup_logging()
    return rt, rt.config_from_args(args)


def run(args: argparse.Namespace) -> int:
    """``dist-seg masks RECIPE``: mine the object masks of a split (launch with torchrun/accelerate for ranks)."""
    from dist_seg.backbones import BackboneWeightsError
    from dist_seg.config import ConfigError
    from dist_seg.data.manifest import DataError

    try:
        rt, cfg = load_stage_config(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    accelerator = rt.make_accelerator(cfg)
    try:
        path = mine_masks(cfg, split=args.split, accelerator=accelerator, overwrite=args.overwrite)
        if D.is_main_process():
            info = json.loads(path.read_text())["info"]
            print(f"masks: {info['num_annotations']} object masks for {info['num_images']} images -> {path}")
            if info.get("damaged"):
                print(f"skipped {len(info['damaged'])} damaged images (no mask; listed under info.damaged in {path}; "
                      f"`dist-seg check-data {cfg.data.root}` shows what is wrong)")
        return 0
    except (BackboneWeightsError, DataError, MaskDistillFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        accelerator.end_training()
