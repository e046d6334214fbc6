"""STEGO's segmentation head (SPEC §3), reused by DS²DL with a SiLU activation (SPEC §4)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "StegoHead"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
PROJECTION_TYPES = ("linear", "nonlinear")


class StegoHead(nn.Module):
    """``code = W1·drop(f) + W3·act(W2·drop(f))`` with 1×1 convolutions.

    Args:
        in_dim: backbone channels C.
        dim: code channels D.
        projection_type: ``"nonlinear"`` (both branches) or ``"linear"`` (``W1`` only).
        dropout: probability of :class:`torch.nn.Dropout2d` on the input features (whole channels are
            dropped, once, and both branches see the same dropped features).
        activation: ``"relu"`` (STEGO), ``"silu"`` (DS²DL) or ``"gelu"``.
    """

    def __init__(
        self, in_dim: int, dim: int, *, projection_type: str = "nonlinear", dropout: float = 0.1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if projection_type not in PROJECTION_TYPES:
            raise ValueError(f"projection_type={projection_type!r} is not one of {list(PROJECTION_TYPES)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.in_dim = in_dim
        self.dim = dim
        self.projection_type = projection_type
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.nonlinear = None
        if projection_type == "nonlinear":
            self.nonlinear = nn.Sequential(
                nn.Conv2d(in_dim, in_dim, kernel_size=1),
                ACTIVATIONS[activation](),
                nn.Conv2d(in_dim, dim, kernel_size=1),
            )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` features → ``[B, D, h, w]`` code."""
        if feats.dim() != 4 or feats.shape[1] != self.in_dim:
            raise ValueError(f"expected features [B, {self.in_dim}, h, w], got {tuple(feats.shape)}")
        dropped = self.dropout(feats)
        code = self.linear(dropped)
        if self.nonlinear is not None:
            code = code + self.nonlinear(dropped)
        return code
