"""MaskDistill's distillation loss (SPEC §8.5): cross-entropy with online hard pixel mining.

A pure function of tensors, no collectives: the hard pixels are chosen within the local batch, as the
official code does on each GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ohem_cross_entropy"]


def ohem_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, top_fraction: float = 0.2, ignore_index: int = 255
) -> torch.Tensor:
    """Mean cross-entropy of the hardest pixels of a batch (SPEC §8.5).

    The per-pixel losses of the non-ignored pixels are pooled over the whole (local) batch; the
    ``n = min(int(top_fraction · B·H·W), #non-ignored)`` largest are averaged. ``n`` counts *all* pixels,
    ignored ones included, as the official ``CrossEntropyOHEM`` does, so a batch with many ignored pixels
    keeps a larger share of its valid ones.

    Defined behaviour where the official code gives NaN (a mean of nothing): when ``n == 0`` (every pixel
    ignored, or ``top_fraction · B·H·W < 1``) the loss is a zero that still depends on ``logits``, so the
    backward pass runs and yields zero gradients (DDP needs every rank to take part).

    Args:
        logits: ``[B, C, H, W]`` class scores.
        target: ``[B, H, W]`` integer labels in ``[0, C)`` or ``ignore_index``.
        top_fraction: share of the batch's pixels kept (``0 < top_fraction <= 1``).
        ignore_index: label value of pixels that carry no loss.

    Returns:
        A 0-dim tensor.
    """
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] \
            or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"expected logits [B, C, H, W] and target [B, H, W], got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    target = target.long()
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = losses[target != ignore_index]
    n = min(int(top_fraction * losses.numel()), valid.numel())
    if n == 0:
        return logits.sum() * 0.0
    return torch.topk(valid, n, sorted=False).values.mean()
