"""DS²DL head and prototypes (SPEC §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_seg.heads.stego import StegoHead

__all__ = ["DS2DLHead", "Prototypes"]


class DS2DLHead(StegoHead):
    """``x = W1·drop(f) + W3·silu(W2·drop(f))``: STEGO's non-linear head with SiLU (paper §4, D = 64).

    Args:
        in_dim: backbone channels C.
        dim: output channels D.
        dropout: Dropout2d probability on the input features.
    """

    def __init__(self, in_dim: int, dim: int = 64, *, dropout: float = 0.1) -> None:
        super().__init__(in_dim, dim, projection_type="nonlinear", dropout=dropout, activation="silu")


class Prototypes(nn.Module):
    """Local prototypes ``P_l`` (trained) and global prototypes ``P_g`` (EMA of ``P_l``).

    Both start from the same L2-normalised random ``[K, D]`` matrix. ``global_`` is a buffer (saved in
    the state dict, never touched by the optimiser). :meth:`ema_update` averages the *raw* local
    parameter, ``P_g ← α·P_g + (1−α)·P_l``, without normalising either side first; every use of the
    prototypes goes through :meth:`normalized_local` / :meth:`normalized_global` (SPEC: "always used
    L2-normalised"), so only directions matter and the closed form of the EMA stays a plain weighted
    sum of the local iterates.

    Args:
        num_prototypes: K.
        dim: D.
        momentum: EMA momentum α.
    """

    def __init__(self, num_prototypes: int, dim: int, *, momentum: float = 0.998) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"prototype EMA momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        init = F.normalize(torch.randn(num_prototypes, dim), dim=1, eps=1e-10)
        self.local = nn.Parameter(init.clone())
        self.register_buffer("global_", init.clone())

    @property
    def num_prototypes(self) -> int:
        return self.local.shape[0]

    def normalized_local(self) -> torch.Tensor:
        """``norm(P_l)`` ``[K, D]`` (differentiable)."""
        return F.normalize(self.local, dim=1, eps=1e-10)

    def normalized_global(self) -> torch.Tensor:
        """``norm(P_g)`` ``[K, D]`` (a constant)."""
        return F.normalize(self.global_, dim=1, eps=1e-10)

    @torch.no_grad()
    def ema_update(self) -> None:
        """``P_g ← α·P_g + (1−α)·P_l`` on the raw (un-normalised) local parameter."""
        self.global_.mul_(self.momentum).add_(self.local.detach().to(self.global_.dtype), alpha=1.0 - self.momentum)

    def extra_repr(self) -> str:
        return f"num_prototypes={self.local.shape[0]}, dim={self.local.shape[1]}, momentum={self.momentum}"
