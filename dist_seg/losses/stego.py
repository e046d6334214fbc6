"""STEGO's contrastive correlation loss (SPEC §3): pure functions of tensors, no collectives.

The loss of a pair of images compares two correlation volumes between S×S sampled points: ``F`` between
the frozen backbone features (the target, never differentiated) and ``Cs`` between the head's codes.
Each element is ``-clamp(Cs) · (F − shift)``: code correlations are pushed up where feature correlation
exceeds the shift and down where it falls below it.

Two details make the term independent of how a global batch is cut up:

* With spatial centring, SPEC's ``m = F.mean()`` is a mean over every row of the call. Callers that split
  a batch (over ranks) or stack several pairings in one call pass ``feature_mean`` explicitly;
  :func:`mean_feature_correlation` gives each row's share of it cheaply, without building ``F``.
* :func:`stacked_correlation_term` evaluates ``n`` pairings of the same anchors (e.g. one per negative
  derangement) with one einsum, each with its own ``m``, equal to ``n`` calls of
  :func:`correlation_term`.

Callers that reuse sampled tensors in several terms (the anchors appear in every term, the negatives
are rows of one gathered tensor) normalise them once and pass ``normalized=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "correlation_term",
    "feature_correlation",
    "mean_feature_correlation",
    "norm",
    "stacked_correlation_term",
    "tensor_correlation",
]

Mean = torch.Tensor | float | None


def norm(t: torch.Tensor) -> torch.Tensor:
    """L2-normalise over the channel dim (dim 1) with eps 1e-10."""
    return F.normalize(t, dim=1, eps=1e-10)


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``einsum("nchw,ncij->nhwij")``: every point of ``a`` against every point of ``b``, per row."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def _stacked_correlation(a: torch.Tensor, bs: torch.Tensor) -> torch.Tensor:
    """``a`` ``[B,C,h,w]`` against each of ``bs`` ``[n,B,C,i,j]`` → ``[n,B,h,w,i,j]`` in one einsum."""
    return torch.einsum("bchw,nbcij->nbhwij", a, bs)


def mean_feature_correlation(fa: torch.Tensor, fb: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
    """Per-row mean of the raw feature correlation, ``F.mean(dim=(1, 2, 3, 4))``, without building F.

    The mean of all dot products between two point sets is the dot product of their means, which costs
    ``O(C·S²)`` instead of ``O(C·S⁴)``. Summing these over a global batch (across ranks) and dividing by
    its size gives the ``feature_mean`` of the whole batch.

    Args:
        fa: ``[..., B, C, S, S]`` features.
        fb: ``[..., B, C, S, S]`` features (broadcast against ``fa``).
        normalized: both are already L2-normalised over channels (skips :func:`norm`).

    Returns:
        ``[..., B]`` means, without gradient.
    """
    with torch.no_grad(), torch.autocast(device_type=fa.device.type, enabled=False):
        fa, fb = _at_least_fp32(fa), _at_least_fp32(fb)
        if not normalized:
            fa, fb = _norm_channels(fa), _norm_channels(fb)
        return (fa.mean(dim=(-2, -1)) * fb.mean(dim=(-2, -1))).sum(-1)


def _norm_channels(t: torch.Tensor) -> torch.Tensor:
    # norm() for tensors with extra leading dims: channels are third from the end.
    return F.normalize(t, dim=-3, eps=1e-10)


def _center(fd: torch.Tensor, feature_mean: torch.Tensor) -> torch.Tensor:
    """Spatial centring of ``[n, B, h, w, i, j]`` correlations; ``feature_mean`` is ``[n]``."""
    fd = fd - fd.mean(dim=(-2, -1), keepdim=True)
    # After the row-wise centring the mean is zero up to rounding; SPEC subtracts it anyway.
    fd = fd - fd.mean(dim=(1, 2, 3, 4, 5), keepdim=True)
    return fd + feature_mean.view(-1, 1, 1, 1, 1, 1)


def _as_group_means(feature_mean: Mean, fd: torch.Tensor) -> torch.Tensor:
    n = fd.shape[0]
    if feature_mean is None:
        return fd.mean(dim=(1, 2, 3, 4, 5))
    m = torch.as_tensor(feature_mean, dtype=fd.dtype, device=fd.device).detach()
    if m.numel() == 1:
        return m.reshape(1).expand(n)
    if m.shape != (n,):
        raise ValueError(f"feature_mean must be a scalar or hold one value per pairing ({n}), got {tuple(m.shape)}")
    return m


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _target_correlation(fa: torch.Tensor, fbs: torch.Tensor, *, spatial_center: bool, feature_mean: Mean = None,
                        normalized: bool = False) -> torch.Tensor:
    """The target ``F`` ``[n, B, S, S, S, S]`` of anchors ``[B, C, S, S]`` against partners ``[n, B, C, S, S]``.

    Always float32, autocast or not: it is a constant (no gradient) that costs one einsum, and under bf16
    autocast its rounding (|ΔF| up to ~2e-3) would shift every pair's target against shifts of 0.02-0.2.
    """
    with torch.no_grad(), torch.autocast(device_type=fa.device.type, enabled=False):
        fa, fbs = _at_least_fp32(fa), _at_least_fp32(fbs)
        if not normalized:
            fa, fbs = norm(fa), _norm_channels(fbs)
        fd = _stacked_correlation(fa, fbs)
        if spatial_center:
            fd = _center(fd, _as_group_means(feature_mean, fd))
    return fd


def stacked_correlation_term(
    fa: torch.Tensor,
    fbs: torch.Tensor,
    ca: torch.Tensor,
    cbs: torch.Tensor,
    shift: float,
    *,
    spatial_center: bool,
    zero_clamp: bool,
    stabilize: bool = False,
    feature_mean: Mean = None,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`correlation_term` of the same anchors against ``n`` partner sets at once.

    Equal to ``[correlation_term(fa, fbs[k], ca, cbs[k], ...) for k in range(n)]`` stacked, but computed
    with one einsum per correlation volume and without repeating the anchors.

    Args:
        fa: anchor features ``[B, C, S, S]``.
        fbs: partner features ``[n, B, C, S, S]``.
        ca: anchor codes ``[B, D, S, S]``.
        cbs: partner codes ``[n, B, D, S, S]``.
        shift: the shift ``b`` subtracted from the feature correlation.
        spatial_center: centre each anchor point's feature correlations (config ``pointwise``).
        zero_clamp: clamp code correlations at 0 from below.
        stabilize: clamp code correlations at 0.8 from above.
        feature_mean: the ``m`` added back after centring, a scalar or one value per pairing ``[n]``;
            default: the mean of each pairing's ``F`` over its ``B`` rows, as :func:`correlation_term`.
        normalized: all four inputs are already L2-normalised over channels (skips :func:`norm`).

    Returns:
        ``(L, Cs)``, both ``[n, B, S, S, S, S]``; ``L`` has gradient only through the codes.
    """
    if fbs.dim() != 5 or cbs.dim() != 5:
        raise ValueError(f"partners must be stacked as [n, B, C, S, S], got {tuple(fbs.shape)} and {tuple(cbs.shape)}")
    fd = _target_correlation(fa, fbs, spatial_center=spatial_center, feature_mean=feature_mean,
                             normalized=normalized)
    if not normalized:
        ca, cbs = norm(ca), _norm_channels(cbs)
    cd = _stacked_correlation(ca, cbs)
    low = 0.0 if zero_clamp else None
    high = 0.8 if stabilize else None
    clamped = cd.clamp(min=low, max=high) if (low is not None or high is not None) else cd
    return -clamped * (fd - shift), cd


def correlation_term(
    fa: torch.Tensor,
    fb: torch.Tensor,
    ca: torch.Tensor,
    cb: torch.Tensor,
    shift: float,
    *,
    spatial_center: bool,
    zero_clamp: bool,
    stabilize: bool = False,
    feature_mean: Mean = None,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """STEGO's correlation term for a pair of sampled images (SPEC §3), without reduction.

    ``F = <norm(fa), norm(fb)>`` (no gradient), optionally spatially centred and shifted back to its mean
    ``m``; ``Cs = <norm(ca), norm(cb)>``; ``L = -clamp(Cs) · (F − shift)``.

    Args:
        fa, fb: sampled features ``[B, C, S, S]``.
        ca, cb: sampled codes ``[B, D, S, S]``.
        shift: the shift ``b``.
        spatial_center: centre each anchor point's feature correlations over the partner's points and
            restore the mean ``m`` (config ``pointwise``).
        zero_clamp: clamp code correlations at 0 from below.
        stabilize: clamp code correlations at 0.8 from above.
        feature_mean: ``m``; default ``F.mean()`` over the whole input. Pass the mean over the global batch
            (see :func:`mean_feature_correlation`) when the batch is split over ranks.
        normalized: all four inputs are already L2-normalised over channels (skips :func:`norm`).

    Returns:
        ``(L, Cs)``, both ``[B, S, S, S, S]``.
    """
    if feature_mean is not None and torch.as_tensor(feature_mean).numel() != 1:
        raise ValueError("feature_mean of correlation_term must be a scalar")
    loss, cd = stacked_correlation_term(
        fa, fb.unsqueeze(0), ca, cb.unsqueeze(0), shift,
        spatial_center=spatial_center, zero_clamp=zero_clamp, stabilize=stabilize, feature_mean=feature_mean,
        normalized=normalized,
    )
    return loss[0], cd[0]


def feature_correlation(
    fa: torch.Tensor, fb: torch.Tensor, *, spatial_center: bool, feature_mean: Mean = None
) -> torch.Tensor:
    """The target ``F`` of :func:`correlation_term` alone, ``[B, S, S, S, S]``, without gradient."""
    return _target_correlation(fa, fb.unsqueeze(0), spatial_center=spatial_center, feature_mean=feature_mean)[0]
