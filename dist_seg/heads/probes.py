"""Cluster and linear probes on a head's code (SPEC §3 "Probes").

Callers hand the probes ``code.detach()`` so that the probes train beside the head without any label (or
cluster assignment) ever reaching it; the probes have their own parameters and optimiser group.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClusterProbe", "LinearProbe"]


def _norm(t: torch.Tensor, dim: int) -> torch.Tensor:
    return F.normalize(t, dim=dim, eps=1e-10)


@functools.lru_cache(maxsize=32)
def _bilinear_matrix(n_out: int, n_in: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[n_out, n_in]`` weights of 1-D linear resampling with ``align_corners=False``.

    Built by resampling the identity with :func:`torch.nn.functional.interpolate`, so the weights are
    exactly the ones ``F.interpolate(..., mode="bilinear", align_corners=False)`` applies along one axis.
    """
    # Cached and shared: never an inference-mode tensor, which autograd could not save for backward later.
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # n_in signals of length n_in
        weights = F.interpolate(eye, size=n_out, mode="linear", align_corners=False).squeeze(1).T
        return weights.to(device=device, dtype=dtype).contiguous()


def upsample_bilinear(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(t, size, mode="bilinear", align_corners=False)`` as two small matrix products.

    Bilinear resampling is separable: ``A_H · t · A_Wᵀ``. For the probes' few channels and large output
    sizes the two products (and their backward) are faster on CPU than the interpolation kernel; results
    agree with it to float rounding.
    """
    a_h = _bilinear_matrix(size[0], t.shape[-2], t.device, t.dtype)
    a_w = _bilinear_matrix(size[1], t.shape[-1], t.device, t.dtype)
    return torch.matmul(torch.matmul(a_h, t), a_w.T)


class ClusterProbe(nn.Module):
    """K unit centres; a pixel belongs to the centre of highest cosine similarity.

    Args:
        dim: code channels D.
        num_clusters: K.
    """

    def __init__(self, dim: int, num_clusters: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_clusters = num_clusters
        self.clusters = nn.Parameter(torch.randn(num_clusters, dim))

    def inner(self, code: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each pixel to each centre: ``[B, D, h, w]`` → ``[B, K, h, w]``."""
        return torch.einsum("bchw,kc->bkhw", _norm(code, 1), _norm(self.clusters, 1))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.inner(code)

    def loss(self, code: torch.Tensor) -> torch.Tensor:
        """``-(onehot(argmax inner) · inner).sum(1).mean()``: pull each pixel's nearest centre towards it."""
        # Reduced in float32: under autocast (or with bf16 weights) the inner products come out in bf16.
        inner = self.inner(code).float()
        assignment = F.one_hot(inner.argmax(dim=1), self.num_clusters).permute(0, 3, 1, 2).to(inner.dtype)
        return -(assignment * inner).sum(dim=1).mean()

    def predict(self, code: torch.Tensor) -> torch.Tensor:
        """Hard cluster index per pixel ``[B, h, w]``."""
        return self.inner(code).argmax(dim=1)

    def log_probs(self, code: torch.Tensor) -> torch.Tensor:
        """Soft form for the CRF: ``log_softmax(2·inner)`` over clusters."""
        return torch.log_softmax(2 * self.inner(code), dim=1)


class LinearProbe(nn.Module):
    """A 1×1 convolution D→K trained with cross-entropy on labelled pixels.

    Args:
        dim: code channels D.
        num_classes: K.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, h, w]`` on the code's grid."""
        return self.conv(code)

    def loss(self, code: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the pixels whose label is in ``[0, K)``.

        Logits are upsampled bilinearly (``align_corners=False``, :func:`upsample_bilinear`) to the label's
        size. Every other label value (−1, 255, ...) is ignored; a batch without any valid pixel gives a loss
        of 0 (and zero gradients) instead of NaN.

        Args:
            code: ``[B, D, h, w]``.
            label: ``[B, H, W]`` integer labels.
        """
        if label.dim() != 3 or label.shape[0] != code.shape[0]:
            raise ValueError(f"labels must be [B, H, W] with B={code.shape[0]}, got {tuple(label.shape)}")
        logits = upsample_bilinear(self(code), tuple(label.shape[-2:]))
        label = label.long()
        valid = (label >= 0) & (label < self.num_classes)
        target = torch.where(valid, label, torch.full_like(label, -1))
        total = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum")
        return total / valid.sum().clamp_min(1).to(total.dtype)
