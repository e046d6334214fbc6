"""Typed configuration of the MaskDistill stages (SPEC §8): the ``maskdistill`` section of a run config.

Each stage reads its own dataclass; defaults are SPEC §8's (the paper's / official code's settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(kw_only=True)
class MineConfig:
    """Object masks from the last self-attention block (SPEC §8.1)."""

    # "maskdistill" (SPEC §8.1), or Table 3's baselines: "dino" (summed CLS attention holding dino_mass of
    # its mass) or "lost" (LOST's seed expansion over lost_k patch proposals). A baseline writes
    # masks_<method>_<split>.json, so the three can be mined and scored side by side (dist-seg eval-instances).
    method: str = "maskdistill"
    dino_mass: float = 0.75
    lost_k: int = 400
    backbone: str = "dino_vits16"
    weights: Optional[str] = None
    heads: int = 5
    topk: float = 0.4
    mass: float = 0.5
    short_side: int = 640
    chunk_size: int = 64  # images per part file: the unit of work per rank and of resuming


@dataclass(kw_only=True)
class NameConfig:
    """Naming masks with K-means clusters of crop CLS features (SPEC §8.2)."""

    backbone: str = "dino_vits8"
    weights: Optional[str] = None
    num_clusters: Optional[int] = None  # None: the dataset's object classes (manifest num_classes - 1)
    with_gt: bool = False  # parity option: rename clusters to GT classes by Hungarian matching (reads labels)
    support_root: Optional[str] = None  # a prepared dataset whose mined masks are used only for fitting
    support_split: str = "train"
    support_masks: Optional[str] = None  # default <support_root>/maskdistill/masks_<support_split>.json


def _detect_min_sizes() -> list[int]:
    return list(range(480, 801, 32))


@dataclass(kw_only=True)
class DetectConfig:
    """Mask R-CNN distillation and candidate prediction (SPEC §8.3).

    The ``dist-seg detect`` stage trains the detector as method ``maskrcnn`` under the trainer with
    ``data.batch_size = batch_size`` and ``train.num_steps = num_steps`` in ``<train.output_dir>/detect``
    (checkpointing, logging and resume follow the recipe's ``train`` section), then predicts candidates.

    Attributes:
        init: ``"ssl"`` (backbone from the self-supervised ResNet-50 file ``weights``: MoCo v2/v3 or DINO)
            or ``"random"`` (explicitly no pre-training). Supervised ImageNet weights are never used.
        weights: local ResNet-50 file for ``init="ssl"``.
        trainable_layers: ResNet stages trained (3 = layer2..layer4; conv1 and layer1 stay frozen).
        split: split the detector trains and predicts on (default ``data.train_split``).
        batch_size: global batch (images over all ranks).
        num_steps: optimiser steps.
        base_lr: SGD learning rate for a global batch of 16, scaled linearly to ``batch_size``.
        momentum, weight_decay: SGD settings.
        warmup_steps: linear warm-up from ``warmup_factor·lr`` to ``lr`` over this many steps.
        warmup_factor: start of the warm-up, as a fraction of the learning rate.
        milestones: the lr is multiplied by ``gamma`` when the step reaches each of these fractions of
            ``train.num_steps`` (SPEC: 20k and 22k of 24k).
        gamma: decay factor at each milestone.
        min_sizes: training short sides, one drawn uniformly per image and step.
        max_size: cap on the long side (training and prediction).
        flip_prob: probability of a horizontal flip per image and step.
        test_min_size: short side at prediction (the model's own test-time resize).
        score_thresh, nms_thresh, detections_per_img: box predictor settings at prediction.
        mask_thresh: predicted mask probabilities above this are foreground (at image size).
        rpn_post_nms_top_n_train, rpn_post_nms_top_n_test: proposals kept per image after the RPN's NMS.
        box_batch_size_per_image: ROIs sampled per image for the box and mask heads in training.
            (These three are torchvision's defaults; tests and the toy recipe lower them to run in seconds.)
    """

    init: str = "ssl"
    weights: Optional[str] = None
    trainable_layers: int = 3
    split: Optional[str] = None
    batch_size: int = 16
    num_steps: int = 24000
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 1e-3
    milestones: list[float] = field(default_factory=lambda: [20000 / 24000, 22000 / 24000])
    gamma: float = 0.1
    min_sizes: list[int] = field(default_factory=_detect_min_sizes)
    max_size: int = 1333
    flip_prob: float = 0.5
    test_min_size: int = 800
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask_thresh: float = 0.5
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512


@dataclass(kw_only=True)
class PseudoConfig:
    """Confident candidates → pseudo-label shards (SPEC §8.4).

    Attributes:
        threshold: τ: detections with ``score >= threshold`` are kept (only the best when none is).
        out_root: the pseudo-label dataset folder (default ``<work_dir>/pseudo``).
    """

    threshold: float = 0.9
    out_root: Optional[str] = None


@dataclass(kw_only=True)
class DistilConfig:
    """The final segmentation model trained on the pseudo-labels (SPEC §8.5)."""

    student: str = "deeplab"
    init: str = "ssl"
    weights: Optional[str] = None
    # OHEM loss: share of the local batch's pixels whose losses are averaged.
    top_fraction: float = 0.2
    # deeplab: SGD; lr ×0.1 once the 0-based epoch exceeds lr_drop_after (the official step scheduler).
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 45
    lr_drop_after: int = 40
    batch_size: int = 16
    # Training/inference side of the deeplab student (images are resized to size × size).
    size: int = 512
    hflip: bool = True
    rotate: float = 5.0
    scale_min: float = 0.75
    scale_max: float = 1.25
    # "auto": SyncBatchNorm when world > 1 on GPUs (torch's SyncBN has no CPU kernel); "off": never.
    sync_bn: str = "auto"
    # head [ours]: a §3-style head (code dim head_dim) and a 1×1 classifier on frozen features, Adam.
    head_dim: int = 70
    head_lr: float = 5e-4
    # CRF rounds (SPEC §8.5): relabel the training set with CRF-refined predictions and retrain R times.
    crf_rounds: int = 0
    # Linear protocol (SPEC §8.6): re-train only the last 1×1 conv of the student checkpoint
    # `linear_from` on ground-truth labels; lr ×0.1 once the 0-based epoch exceeds linear_drop_after.
    linear_from: Optional[str] = None
    linear_lr: float = 0.1
    linear_epochs: int = 45
    linear_drop_after: int = 25
    linear_batch_size: int = 24
    # Optimiser steps per epoch; default ceil(training images / data.batch_size) from the manifest.
    steps_per_epoch: Optional[int] = None


@dataclass(kw_only=True)
class MaskDistillConfig:
    """All MaskDistill stages; ``work_dir`` holds their JSON outputs (default ``<data.root>/maskdistill``)."""

    work_dir: Optional[str] = None
    mine: MineConfig = field(default_factory=MineConfig)
    name: NameConfig = field(default_factory=NameConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    distil: DistilConfig = field(default_factory=DistilConfig)
