"""Training-free baselines of paper 002 (SPEC §5): raw features, PCA and Gaussian random projection.

Each maps backbone patch features ``[B, C, h, w]`` to a code ``[B, D, h, w]`` with a fixed linear map,
so the cluster and linear probes can be evaluated on them exactly as on a trained head. The maps are
computed by scikit-learn and stored as buffers: ``state_dict()`` saves a fitted baseline and
``load_state_dict()`` restores it into a freshly built one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.random_projection import GaussianRandomProjection
from torch import nn

__all__ = ["BASELINES", "IdentityBaseline", "PCABaseline", "RandomProjectionBaseline", "build_baseline"]


def _project(features: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``(x - mean) @ weight.T`` along the channel axis of ``[B, C, h, w]`` features."""
    if features.ndim != 4:
        raise ValueError(f"baselines take features [B, C, h, w], got shape {tuple(features.shape)}")
    if features.shape[1] != weight.shape[1]:
        raise ValueError(f"features have {features.shape[1]} channels but the baseline expects {weight.shape[1]}")
    x = features.to(weight.dtype)
    if mean is not None:
        x = x - mean.view(1, -1, 1, 1)
    return torch.einsum("bchw,dc->bdhw", x, weight).to(features.dtype)


def _rows(features: Any) -> np.ndarray:
    """Features as a float64 ``[N, C]`` array; ``[B, C, h, w]`` maps are flattened to pixels."""
    if isinstance(features, torch.Tensor):
        if features.ndim == 4:
            features = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim == 4:
        array = array.transpose(0, 2, 3, 1).reshape(-1, array.shape[1])
    if array.ndim != 2:
        raise ValueError(f"fit needs features [N, C] or [B, C, h, w], got shape {array.shape}")
    return array


class IdentityBaseline(nn.Module):
    """Raw backbone features: the code is the input (``D = C``)."""

    needs_fit = False

    def __init__(self, in_dim: int | None = None):
        super().__init__()
        self.out_dim = in_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class _FittedBuffers(nn.Module):
    """Buffers whose shapes are only known after fitting: loading a state dict adopts its shapes."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name, buffer in self._buffers.items():
            key = prefix + name
            if (key in state_dict and buffer is not None and state_dict[key].shape != buffer.shape
                    and buffer.numel() == 0):
                self._buffers[name] = torch.empty_like(state_dict[key], device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PCABaseline(_FittedBuffers):
    """Projection onto the first ``dim`` principal components of the features (no whitening).

    ``fit`` runs :class:`sklearn.decomposition.PCA`; ``forward`` computes sklearn's ``transform``,
    ``(x - mean) @ components.T``, at every pixel.

    Args:
        dim: number of components ``D``.
        seed: ``random_state`` for sklearn's randomized SVD (used on large inputs).
    """

    needs_fit = True

    def __init__(self, dim: int, *, in_dim: int | None = None, seed: int = 0):
        super().__init__()
        if dim < 1:
            raise ValueError(f"PCA dim must be >= 1, got {dim}")
        self.out_dim = int(dim)
        self.in_dim = in_dim
        self.seed = int(seed)
        # With in_dim known the buffers have their final shapes from the start, so fitting writes in
        # place (device and wrappers such as DDP keep seeing the same tensors).
        channels = 0 if in_dim is None else int(in_dim)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("components", torch.zeros(self.out_dim if channels else 0, channels))
        self.register_buffer("is_fitted", torch.tensor(False))

    @property
    def fitted(self) -> bool:
        return bool(self.is_fitted)

    @torch.no_grad()
    def fit(self, features: Any) -> PCABaseline:
        """Fit on sample features ``[N, C]`` (or feature maps ``[B, C, h, w]``, one row per pixel).

        Returns:
            ``self``.
        """
        rows = _rows(features)
        if self.in_dim is not None and rows.shape[1] != self.in_dim:
            raise ValueError(f"features have {rows.shape[1]} channels but this PCA was built for {self.in_dim}")
        if rows.shape[0] < self.out_dim or rows.shape[1] < self.out_dim:
            raise ValueError(
                f"PCA to {self.out_dim} dims needs at least that many samples and channels, got {rows.shape}"
            )
        pca = PCA(n_components=self.out_dim, random_state=self.seed).fit(rows)
        mean = torch.as_tensor(pca.mean_, dtype=torch.float32)
        components = torch.as_tensor(pca.components_, dtype=torch.float32)
        if self.components.shape == components.shape:
            self.mean.copy_(mean)
            self.components.copy_(components)
        else:
            device = self.components.device
            self.mean = mean.to(device)
            self.components = components.to(device)
        self.is_fitted.fill_(True)
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("PCABaseline is not fitted: call fit(features) or load a fitted state_dict")
        return _project(features, self.components, self.mean)


class RandomProjectionBaseline(_FittedBuffers):
    """Gaussian random projection to ``dim`` channels, a fixed 1×1 convolution without bias.

    The matrix is sklearn's :class:`~sklearn.random_projection.GaussianRandomProjection` for
    ``random_state=seed`` (entries ``N(0, 1/dim)``), so the same seed gives the same projection.

    Args:
        in_dim: feature channels ``C``.
        dim: output channels ``D``.
        seed: random state.
    """

    needs_fit = False

    def __init__(self, in_dim: int, dim: int, seed: int = 0):
        super().__init__()
        if in_dim < 1 or dim < 1:
            raise ValueError(f"in_dim and dim must be >= 1, got in_dim={in_dim}, dim={dim}")
        self.out_dim = int(dim)
        self.seed = int(seed)
        projection = GaussianRandomProjection(n_components=dim, random_state=seed)
        # sklearn draws the matrix in fit() from the number of features alone; the values are unused.
        projection.fit(np.zeros((1, in_dim)))
        self.register_buffer("components", torch.as_tensor(projection.components_, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _project(features, self.components)


BASELINES = ("raw", "pca", "rp")


def build_baseline(name: str, in_dim: int, dim: int, seed: int = 0) -> nn.Module:
    """Build a baseline by name.

    Args:
        name: ``"raw"`` (identity; ``dim`` ignored), ``"pca"`` (call ``fit`` before use) or ``"rp"``.
        in_dim: backbone feature channels ``C``.
        dim: code channels ``D``.
        seed: random state (PCA's randomized solver, the random projection).

    Returns:
        The module; its ``out_dim`` attribute is the code dimension and ``needs_fit`` says whether
        ``fit(features)`` must be called first.
    """
    if name == "raw":
        return IdentityBaseline(in_dim)
    if name == "pca":
        return PCABaseline(dim, in_dim=in_dim, seed=seed)
    if name == "rp":
        return RandomProjectionBaseline(in_dim, dim, seed)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
