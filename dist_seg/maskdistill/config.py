"""Typed configuration of the MaskDistill stages (SPEC §8): the ``maskdistill`` section of a run config.

Each stage reads its own dataclass; defaults are SPEC §8's (the paper's / official code's settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(kw_only=True)
class MineConfig:
    """Object masks from the last self-attention block (SPEC §8.1)."""

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


@dataclass(kw_only=True)
class DetectConfig:
    """Mask R-CNN distillation and candidate prediction (SPEC §8.3)."""

    init: str = "ssl"
    weights: Optional[str] = None


@dataclass(kw_only=True)
class PseudoConfig:
    """Confident candidates → pseudo-label shards (SPEC §8.4)."""

    threshold: float = 0.9


@dataclass(kw_only=True)
class DistilConfig:
    """The final segmentation model trained on the pseudo-labels (SPEC §8.5)."""

    student: str = "deeplab"
    init: str = "ssl"
    weights: Optional[str] = None


@dataclass(kw_only=True)
class MaskDistillConfig:
    """All MaskDistill stages; ``work_dir`` holds their JSON outputs (default ``<data.root>/maskdistill``)."""

    work_dir: Optional[str] = None
    mine: MineConfig = field(default_factory=MineConfig)
    name: NameConfig = field(default_factory=NameConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    distil: DistilConfig = field(default_factory=DistilConfig)
