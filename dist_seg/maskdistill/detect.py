"""Mask R-CNN distillation (SPEC §8.3): the detector, its self-supervised ResNet-50 init, its training
data, and the prediction of scored candidates for every training image.

The detector is torchvision's ``MaskRCNN`` on a ResNet-50 FPN with frozen batch norm and ``K + 1``
classes (0 = background, ``cluster + 1`` for the mined masks' clusters). It trains under the project's
trainer as method ``maskrcnn`` (:mod:`dist_seg.methods.maskrcnn`); this module holds everything that
does not need the trainer, so the ``deeplab`` student can share :func:`load_ssl_resnet50`.

Images enter the model as float ``0..1`` RGB: Mask R-CNN normalises them itself (its
``GeneralizedRCNNTransform`` subtracts the ImageNet mean and divides by the std), so they must not be
ImageNet-normalised beforehand.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["DetectError", "build_maskrcnn", "load_ssl_resnet50"]

# Encoders inside self-supervised checkpoints, tried in order: MoCo v1/v2 keep the query encoder under
# ``encoder_q``, MoCo v3 under ``base_encoder``; DINO's ResNet-50 release is a plain torchvision state dict,
# DINO training checkpoints keep the teacher under ``backbone``. ``module.`` comes from DDP.
_ENCODER_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.",
                     "module.backbone.", "backbone.", "module.")
# Wrappers around the state dict in training checkpoints (MoCo: ``state_dict``; others: ``model``; DINO: ``teacher``).
_WRAPPER_KEYS = ("state_dict", "model", "teacher")
# Heads that are not part of the ResNet-50 trunk: classifier / projection MLPs and their predictors.
_HEAD_PREFIXES = ("fc.", "head.", "predictor.")
INIT_CHOICES = ("ssl", "random")


class DetectError(ValueError):
    """A user error in the detect stage (missing or foreign weights, bad inputs): the message names the fix."""


# ------------------------------------------------------------------------------------ ResNet-50 init
def _resnet50_trunk_shapes() -> dict[str, torch.Size]:
    """Key → shape of torchvision's ResNet-50 without its classifier (BN step counters left out)."""
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50(weights=None)
    return {k: v.shape for k, v in model.state_dict().items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def _abbrev(keys: Sequence[str], limit: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_ssl_resnet50(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A self-supervised ResNet-50 checkpoint as a torchvision ``resnet50`` state dict (trunk only).

    Reads MoCo v1/v2 (``module.encoder_q.*``), MoCo v3 (``module.base_encoder.*``), DINO ResNet-50
    (plain torchvision keys, or ``teacher`` with ``backbone.`` prefixes) and ``state_dict`` / ``model``
    wrappers. The momentum encoder, queue, projection heads and classifier are dropped. The file is read
    with ``torch.load(weights_only=True)``: nothing in it is unpickled as code.

    Args:
        path: local checkpoint file.

    Returns:
        ``{key: tensor}`` with exactly the keys of torchvision's ``resnet50().state_dict()`` other than
        ``fc.*`` and ``*.num_batches_tracked``.

    Raises:
        DetectError: the file is missing or unreadable, or holds no ResNet-50 (keys missing or of the wrong
            shape); the message names the file and what was expected.
    """
    path = Path(path)
    expected = ("a self-supervised ResNet-50 state dict (MoCo v2/v3 `module.encoder_q.*`/`module.base_encoder.*`, "
                "or DINO ResNet-50 torchvision keys)")
    if not path.is_file():
        raise DetectError(f"ResNet-50 weights not found: {path} (expected {expected})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes the same one-line error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DetectError(f"{path} is not a readable PyTorch weights file ({first[:160]}); "
                          f"expected {expected}") from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DetectError(f"{path} holds a {type(obj).__name__} without a state dict of tensors; expected {expected}")
    state = dict(obj)
    for prefix in _ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    state = {k: v for k, v in state.items()
             if not k.startswith(_HEAD_PREFIXES) and not k.endswith("num_batches_tracked")}
    shapes = _resnet50_trunk_shapes()
    missing = [k for k in shapes if k not in state]
    if missing:
        raise DetectError(f"{path} is not a ResNet-50 checkpoint: {len(missing)} of {len(shapes)} ResNet-50 keys are "
                          f"missing ({_abbrev(missing)}); found keys such as {_abbrev(sorted(obj), 3)}; "
                          f"expected {expected}")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in shapes.items() if state[k].shape != s]
    if wrong:
        raise DetectError(f"{path}: tensors of the wrong shape for ResNet-50 ({_abbrev(wrong, 2)}); "
                          f"expected {expected}")
    unexpected = sorted(k for k in state if k not in shapes)
    if unexpected:
        log.warning("%s: ignoring %d keys that are not part of the ResNet-50 trunk: %s", path, len(unexpected),
                    _abbrev(unexpected))
    return {k: state[k].float() for k in shapes}


# --------------------------------------------------------------------------------------- the model
def build_maskrcnn(
    num_classes: int,
    *,
    init: str,
    weights: Optional[str | os.PathLike] = None,
    trainable_layers: int = 3,
    min_size: int = 800,
    max_size: int = 1333,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> nn.Module:
    """torchvision Mask R-CNN, ResNet-50 FPN with ``FrozenBatchNorm2d``, backbone from a self-supervised file.

    In training mode the model takes images that are already at their training size (the detection
    stream draws the short side and flip from seeded generators, :func:`augment_sample`), so its own
    random resize is switched off; in eval mode it resizes each image to ``min_size``/``max_size`` and
    returns boxes and mask probabilities at the input image's size. Either way images are float RGB in
    ``0..1`` (the model normalises them itself).

    Args:
        num_classes: classes including background, ``K + 1``.
        init: ``"ssl"`` (``weights`` required) or ``"random"`` (explicitly no pre-training).
        weights: a self-supervised ResNet-50 file (see :func:`load_ssl_resnet50`).
        trainable_layers: ResNet stages that train, counted from the top (3 = layer2..layer4).
        min_size, max_size: the test-time resize.
        score_thresh, nms_thresh, detections_per_img: the box predictor's settings at test time.

    Raises:
        DetectError: ``init="ssl"`` without weights (the message names both fixes), weights with
            ``init="random"``, an unknown ``init``, or unreadable weights.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    if init not in INIT_CHOICES:
        raise DetectError(f"maskdistill.detect.init={init!r}: use one of {INIT_CHOICES}")
    if init == "ssl" and not weights:
        raise DetectError("the Mask R-CNN backbone needs self-supervised ResNet-50 weights: set "
                          "maskdistill.detect.weights=/path/moco_v2_800ep.pth (MoCo v2/v3 or DINO ResNet-50), "
                          "or maskdistill.detect.init=random to train from scratch")
    if init == "random" and weights:
        raise DetectError(f"maskdistill.detect.weights={weights} is given but init=random: set "
                          f"maskdistill.detect.init=ssl to use it, or drop the weights")
    if num_classes < 2:
        raise DetectError(f"Mask R-CNN needs at least one object class besides background (num_classes={num_classes})")
    state = load_ssl_resnet50(weights) if init == "ssl" else None
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=trainable_layers,
                                   norm_layer=FrozenBatchNorm2d)
    if state is not None:
        # The FPN body is the ResNet without avgpool/fc: its keys are the trunk's keys exactly.
        backbone.body.load_state_dict(state, strict=True)
    # ``_skip_resize`` is torchvision's switch (used by its reference recipes) for data pipelines that resize
    # themselves: here the stream's seeded draws decide each training size, which keeps resume exact.
    return MaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                    box_score_thresh=score_thresh, box_nms_thresh=nms_thresh,
                    box_detections_per_img=detections_per_img, _skip_resize=True)
