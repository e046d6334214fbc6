"""Trainable modules on top of frozen backbone features: segmentation heads and evaluation probes."""

from dist_seg.heads.ds2dl import DS2DLHead, Prototypes
from dist_seg.heads.probes import ClusterProbe, LinearProbe
from dist_seg.heads.stego import StegoHead

__all__ = ["ClusterProbe", "DS2DLHead", "LinearProbe", "Prototypes", "StegoHead"]
