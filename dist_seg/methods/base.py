"""The interface between the trainer and a method.

A method owns its trainable modules (head, prototypes, probes), builds its optimiser, turns a batch of
frozen features into a loss, updates any non-gradient state after an optimiser step, and predicts soft
labels for evaluation. The trainer knows methods only through :class:`Method`.

Randomness that must not depend on how the global batch is split over ranks (sampling coordinates,
derangements) is drawn from generators seeded by ``(seed, step, purpose)`` for the *global* batch;
each rank then takes its own slice (``StepContext.local``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_seg import distributed as D
from dist_seg.config import RunConfig


@dataclass(kw_only=True)
class StepContext:
    """What a method needs to know about the step besides the batch.

    Attributes:
        step: global optimiser step (0-based).
        seed: run seed.
        rank, world_size: this process and the number of processes.
        local_batch: rows of the batch on this rank (equal on every rank).
    """

    step: int
    seed: int
    rank: int
    world_size: int
    local_batch: int

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.world_size

    def generator(self, purpose: str, *keys: int) -> torch.Generator:
        return D.seeded_generator(self.seed, self.step, purpose, *keys)

    def local(self, global_tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor built for the global batch."""
        start = self.rank * self.local_batch
        return global_tensor[start : start + self.local_batch]


@dataclass(kw_only=True)
class Batch:
    """A training batch on one rank.

    Attributes:
        feats: anchor patch features ``[b, C, h, w]`` (frozen backbone output, no gradient), or None
            for a method whose ``inputs`` is ``"images"``.
        partner_feats: features of each anchor's KNN partner ``[b, C, h, w]``, or None if the method
            needs none.
        label: pixel labels ``[b, H, W]`` (−1 = ignore) for the linear probe, or None without labels.
        index: global sample indices ``[b]``.
        images: ImageNet-normalised images ``[b, 3, H, W]`` (``inputs == "images"``), or a list of
            ``[3, H_i, W_i]`` tensors when a method's own stream yields images of different sizes.
        targets: per-image dicts of a method's own stream (e.g. boxes, labels and masks for Mask R-CNN).
    """

    feats: Optional[torch.Tensor] = None
    partner_feats: Optional[torch.Tensor] = None
    label: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor | list[torch.Tensor]] = None
    targets: Optional[list[dict]] = None


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a tensor made on the host to ``device`` without making the host wait for the device.

    Draws that must not depend on the device (coordinates, derangements: CPU generators seeded by
    ``(seed, step)``) are made on the host; a copy from pageable memory would synchronise the stream, so
    the tensor is pinned first when it goes to a GPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def sample_coords(ctx: StepContext, num_samples: int, purpose: str, device: torch.device) -> torch.Tensor:
    """Uniform coordinates in [-1, 1]² for this rank's images: ``[b, S, S, 2]`` (drawn for the global batch)."""
    gen = ctx.generator(purpose)
    coords = torch.rand((ctx.global_batch, num_samples, num_samples, 2), generator=gen) * 2 - 1
    return to_device(ctx.local(coords).contiguous(), device)


def grid_sample(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Sample ``t`` ``[b, C, h, w]`` at ``coords`` ``[b, S, S, 2]`` → ``[b, C, S, S]`` (SPEC §3).

    Bilinear, border padding, ``align_corners=True``. When deterministic algorithms are on
    (``train.deterministic``) and ``t`` needs a gradient, the same interpolation runs as a product with
    separable weight matrices: ``F.grid_sample``'s CUDA backward accumulates with atomics and has no
    deterministic kernel, a matrix product's backward is deterministic.
    """
    if torch.are_deterministic_algorithms_enabled() and t.requires_grad:
        return _grid_sample_matmul(t, coords)
    return F.grid_sample(t, coords.to(t.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def _axis_weights(x: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Bilinear weights ``[..., size]`` of normalised coordinates ``x`` (align_corners=True, border)."""
    pos = ((x.to(torch.promote_types(x.dtype, torch.float32)) + 1) / 2 * (size - 1)).clamp(0, size - 1)
    low = pos.floor().clamp(max=size - 1)
    frac = pos - low
    high = (low + 1).clamp(max=size - 1)
    weights = F.one_hot(low.long(), size) * (1 - frac)[..., None] + F.one_hot(high.long(), size) * frac[..., None]
    return weights.to(dtype)


def _grid_sample_matmul(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    b, _, h, w = t.shape
    s1, s2 = coords.shape[1:3]
    flat = coords.reshape(b, s1 * s2, 2)
    wx, wy = _axis_weights(flat[..., 0], w, t.dtype), _axis_weights(flat[..., 1], h, t.dtype)
    return torch.einsum("bchw,bph,bpw->bcp", t, wy, wx).reshape(b, -1, s1, s2)


class Method(nn.Module):
    """Base class of a training method. Subclasses set ``name`` and implement the abstract methods.

    Args:
        cfg: the full run config (the method reads its own section).
        feat_dim: channels C of the backbone features.
        num_classes: K, the number of clusters (and linear-probe classes).
        has_labels: whether training labels exist (the linear probe is built only then).
    """

    name: str = "base"
    # "features": batches carry frozen backbone features (the trainer runs the backbone or reads the
    # feature cache). "images": batches carry ImageNet-normalised images and the method owns its whole
    # network (no frozen backbone is loaded; ``feat_dim`` is the 3 image channels).
    inputs: str = "features"
    # False for a method without a segmentation output to score (e.g. a detector): the trainer then
    # skips validation.
    validates: bool = True
    # Whether DDP must look for parameters that got no gradient in a step (a graph traversal per step). A
    # method whose loss involves every trainable parameter at every step sets False; True is the safe default.
    find_unused_parameters: bool = True

    def __init__(self, cfg: RunConfig, *, feat_dim: int, num_classes: int, has_labels: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.has_labels = has_labels

    @classmethod
    def inputs_of(cls, cfg: RunConfig) -> str:
        """``inputs`` of this method under ``cfg`` (a method whose variants differ overrides this)."""
        return cls.inputs

    def build_optimizer(self) -> torch.optim.Optimizer:
        """One optimiser with a parameter group per component (each group has a ``name`` key)."""
        raise NotImplementedError

    def training_loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Total loss of this rank's part of the global batch, and scalar logs (per-term losses, ...).

        The loss is a mean over this rank's anchors, so DDP's gradient averaging yields the gradient of
        the mean over the global batch. Logs are detached 0-dim tensors left on the device (or floats known
        on the host): reading a device value waits for the device, so the trainer reads them at logging
        steps only.
        """
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self) -> None:
        """Update non-gradient state (e.g. EMA prototypes) after each optimiser step."""

    def train_batches(self, *, start_step: int, local_batch: int, device: torch.device) -> Optional[Iterator[Batch]]:
        """This rank's training stream when the method reads its data itself, else None (the default).

        A method that needs more than the trainer's stream of crops (variable-size images with instance
        targets, say) returns an endless iterator of :class:`Batch` here. It must be a deterministic function
        of ``(cfg.train.seed, step, rank)`` that begins with the batch of step ``start_step``, so a resumed
        run sees exactly the batches an uninterrupted one would.
        """
        return None

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called before each optimiser step's forward pass (e.g. to set a learning-rate schedule)."""

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """Code (head output) ``[b, D, h, w]`` of backbone features ``[b, C, h, w]``."""
        raise NotImplementedError

    def classify(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """Soft predictions from a code at any resolution (evaluation upsamples the code first).

        Returns:
            ``{"cluster": [b, K', H, W] scores whose argmax is the cluster and whose
            ``log_softmax(2·scores)`` is the CRF unary, "linear": [b, K, H, W] logits when a linear probe
            exists}``.
        """
        raise NotImplementedError

    def predict(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """``classify(encode(feats))`` on the feature grid, with the code under ``"code"``."""
        code = self.encode(feats)
        out = dict(self.classify(code))
        out["code"] = code
        return out

    def forward(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        # DDP synchronises gradients only for work done through forward(), so training goes through here.
        return self.training_loss(batch, ctx)

    def extra_logs(self) -> dict[str, float]:
        """Scalars worth tracking besides the losses (e.g. learnable bias); called on the main process."""
        return {}
