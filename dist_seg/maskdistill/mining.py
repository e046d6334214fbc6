"""Object masks mined from the last self-attention block of a frozen ViT (SPEC §8.1): the ``masks`` stage.

:func:`mine_object_mask` turns one image's queries and keys into a patch-grid mask; :func:`mine_image_mask`
runs it on an image at SPEC §8.1's resolution and brings the mask back to pixels; :func:`mine_masks`
does it for every record of a split, sharded across ranks, and writes ``masks_<split>.json``
(:mod:`dist_seg.maskdistill`).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch

__all__ = ["DegenerateAttentionError", "mine_object_mask"]


class DegenerateAttentionError(ValueError):
    """The attention of an image defines no object (all-zero CLS attention or keys): nothing can be mined."""


def _check_qk(q: torch.Tensor, k: torch.Tensor, grid_w: int, heads: int, topk: float, mass: float) -> tuple[int, int]:
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        raise ValueError("q and k must be torch tensors [L, 1+N, d]")
    if q.ndim != 3 or k.ndim != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [L, 1+N, d] (one image, CLS first), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}; drop the batch dim and the register tokens first")
    num_heads, tokens, _ = q.shape
    num_patches = tokens - 1
    if num_patches < 1:
        raise ValueError(f"q and k hold {tokens} token(s); need the CLS token and at least one patch")
    if not isinstance(grid_w, int) or grid_w < 1 or num_patches % grid_w:
        raise ValueError(f"grid_w={grid_w!r} does not divide the {num_patches} patch tokens into rows")
    if not isinstance(heads, int) or not 1 <= heads <= num_heads:
        raise ValueError(f"heads={heads!r} must be an int in 1..{num_heads} (the attention has {num_heads} heads)")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass={mass!r} must be in (0, 1]")
    if not 0.0 < topk <= 1.0 or int(topk * num_patches) < 1:
        raise ValueError(f"topk={topk!r} selects int(topk * {num_patches}) = {int(topk * num_patches)} patches; "
                         f"choose topk in (0, 1] with topk * N >= 1")
    if not (torch.isfinite(q).all() and torch.isfinite(k).all()):
        raise ValueError("q and k contain NaN or infinite values")
    return num_patches // grid_w, grid_w


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
    total = a.sum()
    if total == 0:
        raise DegenerateAttentionError("the CLS attention sums to zero; the mass filter is undefined")
    values, order = torch.sort(a, stable=True)
    keep_sorted = torch.cumsum(values / total, dim=0) > 1 - mass
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    a = a * keep
    proposals = torch.sort(a, descending=True, stable=True).indices[: int(topk * num_patches)]
    source = int(proposals[0])
    graph = torch.einsum("hnd,hmd->nm", keys, keys)
    similar = proposals[graph[source, proposals] > 0]
    diffused = (graph[similar].sum(dim=0) > 0).reshape(grid_h, grid_w).numpy()
    row, col = divmod(source, grid_w)
    if not diffused[row, col]:
        raise DegenerateAttentionError("the source patch's key is zero; no attention component holds it")
    labels, _ = scipy.ndimage.label(diffused)
    return labels == labels[row, col]
