"""MaskDistill's final model (SPEC §8.5) as a :class:`~dist_seg.methods.base.Method`: ``name="maskdistill"``.

Two students, chosen by ``maskdistill.distil.student``:

* ``deeplab`` (the paper's): torchvision ``deeplabv3_resnet50`` (output stride 8: torchvision dilates
  layer3 and layer4), backbone initialised from a self-supervised ResNet-50 file (SPEC §8.3), conv1, bn1,
  layer1 and layer2 frozen with their BatchNorms in eval mode (re-applied after every ``train()``),
  SyncBatchNorm elsewhere across GPU ranks. Trains on images (``inputs = "images"``) with the
  pseudo-labels of the batch, augmented per image (h-flip, rotation, scale, border label 0) and resized
  to ``size × size``; the augmentation parameters are drawn for the *global* batch from generators
  seeded by ``(seed, step)``, so a resumed run and any split over ranks see the same images.
* ``head`` [ours]: a §3-style head (:class:`~dist_seg.heads.stego.StegoHead`) and a 1×1 classifier on
  frozen §1 features (``inputs = "features"``: online backbone or feature cache), the pseudo-labels
  downsampled (nearest) to the feature grid. A cheap variant, never the paper's number.

Both are trained with :func:`~dist_seg.losses.maskdistill.ohem_cross_entropy` on the pseudo-labels (the
trainer's ignore label −1 becomes ``ignore_index`` 255). ``encode`` returns the K+1 class logits (class 0
= background), so the §6 cluster scores (Hungarian over all K+1 classes) apply unchanged.

With ``maskdistill.distil.linear_from`` set, the method is the linear protocol of SPEC §8.6 instead:
the student is loaded from that checkpoint and frozen whole (BatchNorm and dropout in eval mode), only
its last 1×1 convolution is re-initialised (N(0, 0.01), zero bias) and trained with plain cross-entropy
on ground-truth labels (SGD ``linear_lr``, ×0.1 after epoch ``linear_drop_after``).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from dist_seg import distributed as D
from dist_seg.config import ConfigError, RunConfig
from dist_seg.data.transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from dist_seg.heads.stego import StegoHead
from dist_seg.losses.maskdistill import ohem_cross_entropy
from dist_seg.methods.base import Batch, Method, StepContext

__all__ = ["FROZEN_STAGES", "MaskDistillMethod", "build_deeplab", "use_sync_bn"]

log = logging.getLogger(__name__)

FROZEN_STAGES = ("conv1", "bn1", "layer1", "layer2")


def use_sync_bn(mode: str, *, world_size: int, cuda: bool) -> bool:
    """Whether the deeplab student converts its trainable BatchNorms to SyncBatchNorm.

    torch's SyncBatchNorm has no CPU kernel (its training forward raises on CPU tensors once a process
    group exists), so CPU ranks (gloo) keep per-rank BatchNorm statistics.
    """
    return mode == "auto" and world_size > 1 and cuda


def build_deeplab(num_classes: int, *, init: str, weights: Optional[str]) -> nn.Module:
    """torchvision DeepLab-v3 R50 (OS 8, no aux head) with its backbone initialised as SPEC §8.3 says.

    Raises:
        ConfigError: ``init="ssl"`` without a weights file (the message names both fixes).
    """
    from torchvision.models.segmentation import deeplabv3_resnet50

    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    if init == "ssl":
        if not weights:
            raise ConfigError("the deeplab student starts from a self-supervised ResNet-50: set "
                              "maskdistill.distil.weights=PATH (a MoCo or DINO ResNet-50 file), or "
                              "maskdistill.distil.init=random to train from scratch")
        from dist_seg.maskdistill.detect import load_ssl_resnet50

        state = {k: v for k, v in load_ssl_resnet50(weights).items() if not k.startswith("fc.")}
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{weights} does not fit torchvision's ResNet-50 (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); give a ResNet-50 file in maskdistill.distil.weights")
    return model


class MaskDistillMethod(Method):
    """The distilled segmentation model (deeplab or head student), or its linear protocol.

    Args:
        cfg: the run config; reads ``cfg.maskdistill.distil``.
        feat_dim: 3 for the deeplab student (images), backbone channels C for the head.
        num_classes: K+1 (background and the K pseudo-classes).
        has_labels: must be True: the student learns from the label slot of the shards.
    """

    name = "maskdistill"
    needs_partners = False

    @classmethod
    def inputs_of(cls, cfg: RunConfig) -> str:
        return "images" if cfg.maskdistill.distil.student == "deeplab" else "features"

    def __init__(self, cfg: RunConfig, *, feat_dim: int, num_classes: int, has_labels: bool) -> None:
        super().__init__(cfg, feat_dim=feat_dim, num_classes=num_classes, has_labels=has_labels)
        dc = cfg.maskdistill.distil
        if not has_labels:
            raise ConfigError(f"{cfg.data.root} has no labels in split '{cfg.data.train_split}': the maskdistill "
                              "student trains on pseudo-label shards (`dist-seg pseudo RECIPE`) and its linear "
                              "protocol on ground-truth labels")
        self.student = dc.student
        self.linear = dc.linear_from is not None
        self.inputs = self.inputs_of(cfg)
        if self.student == "deeplab":
            init = "random" if self.linear else dc.init  # the linear protocol loads the student's weights
            self.model = build_deeplab(num_classes, init=init, weights=dc.weights)
            if not self.linear and use_sync_bn(dc.sync_bn, world_size=D.get_world_size(),
                                               cuda=torch.cuda.is_available()):
                for stage in ("layer3", "layer4"):
                    setattr(self.model.backbone, stage,
                            nn.SyncBatchNorm.convert_sync_batchnorm(getattr(self.model.backbone, stage)))
                self.model.classifier = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.classifier)
            for stage in FROZEN_STAGES:
                getattr(self.model.backbone, stage).requires_grad_(False)
        else:
            self.head = StegoHead(feat_dim, dc.head_dim)
            self.classifier = nn.Conv2d(dc.head_dim, num_classes, kernel_size=1)
        if self.linear:
            self._load_student(dc.linear_from)
            self.requires_grad_(False)
            last = self.last_conv()
            nn.init.normal_(last.weight, mean=0.0, std=0.01)
            nn.init.zeros_(last.bias)
            last.requires_grad_(True)
        # The head student (and the linear protocol, one trained conv) uses every trainable parameter at every
        # step; torchvision's DeepLab-v3 is left to DDP's search (its optional aux classifier is not in the loss).
        self.find_unused_parameters = self.student == "deeplab" and not self.linear
        self._steps_per_epoch = dc.steps_per_epoch or self._default_steps_per_epoch(cfg)
        self.train()

    @staticmethod
    def _default_steps_per_epoch(cfg: RunConfig) -> int:
        from dist_seg.data.manifest import read_manifest

        num = read_manifest(cfg.data.root, dataset=cfg.data.dataset).splits[cfg.data.train_split].num_samples
        return max(1, math.ceil(num / cfg.data.batch_size))

    def _load_student(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"maskdistill.distil.linear_from={path}: no such checkpoint; train the student "
                              "first (`dist-seg maskdistill RECIPE`)") from None
        if not isinstance(state, dict) or "method" not in state:
            raise ConfigError(f"{path} is not a dist_seg checkpoint of the maskdistill student")
        if state.get("meta", {}).get("method") not in (None, "maskdistill"):
            raise ConfigError(f"{path} is a {state['meta']['method']} checkpoint, not a maskdistill student")
        try:
            self.load_state_dict(state["method"])
        except RuntimeError as err:
            raise ConfigError(f"{path} does not match this student ({self.student}, {self.num_classes} classes): "
                              f"{str(err).splitlines()[0]}") from None

    def last_conv(self) -> nn.Conv2d:
        """The final 1×1 convolution (the one the linear protocol re-trains)."""
        return self.model.classifier[-1] if self.student == "deeplab" else self.classifier

    def train(self, mode: bool = True) -> MaskDistillMethod:
        super().train(mode)
        if self.linear:
            # The linear protocol freezes the whole model, BatchNorm statistics and dropout included.
            super().train(False)
        elif self.student == "deeplab":
            for stage in FROZEN_STAGES:
                getattr(self.model.backbone, stage).eval()
        return self

    # ------------------------------------------------------------------------------------ optimiser
    def build_optimizer(self) -> torch.optim.Optimizer:
        """SGD on the trainable parameters (deeplab, linear protocol); Adam for the head [ours]."""
        dc = self.cfg.maskdistill.distil
        params = [p for p in self.parameters() if p.requires_grad]
        if self.linear:
            return torch.optim.SGD([{"name": "linear", "params": params, "lr": dc.linear_lr}],
                                   lr=dc.linear_lr, momentum=dc.momentum, weight_decay=dc.weight_decay)
        if self.student == "deeplab":
            return torch.optim.SGD([{"name": "student", "params": params, "lr": dc.lr}],
                                   lr=dc.lr, momentum=dc.momentum, weight_decay=dc.weight_decay)
        return torch.optim.Adam([{"name": "head", "params": params, "lr": dc.head_lr}], lr=dc.head_lr)

    def lr_at(self, step: int) -> float:
        """Learning rate of ``step``: ×0.1 once the 0-based epoch exceeds the drop epoch (official step rule)."""
        dc = self.cfg.maskdistill.distil
        epoch = step // self._steps_per_epoch
        if self.linear:
            return dc.linear_lr * (0.1 if epoch > dc.linear_drop_after else 1.0)
        base = dc.lr if self.student == "deeplab" else dc.head_lr
        return base * (0.1 if epoch > dc.lr_drop_after else 1.0)

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------------------------- training
    def augment(self, images: torch.Tensor, label: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """h-flip, rotation, scale (border: black image, label 0) and resize to ``size × size`` (SPEC §8.5).

        ``images`` are normalised ``[b, 3, H, W]``, ``label`` ``[b, H, W]`` with −1 = ignore; returns the
        augmented images and labels with ``ignore_index`` 255.
        """
        dc = self.cfg.maskdistill.distil
        gen = ctx.generator("maskdistill-augment")
        g = ctx.global_batch
        flip = ctx.local(torch.rand(g, generator=gen) < 0.5)
        angle = ctx.local((torch.rand(g, generator=gen) * 2 - 1) * dc.rotate)
        scale = ctx.local(dc.scale_min + torch.rand(g, generator=gen) * (dc.scale_max - dc.scale_min))
        black = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
        label = torch.where(label < 0, torch.full_like(label, IGNORE_INDEX), label).to(torch.uint8)
        out_images, out_labels = [], []
        for i in range(images.shape[0]):
            img, lab = images[i], label[i][None]
            if dc.hflip and flip[i]:
                img, lab = img.flip(-1), lab.flip(-1)
            a, s = float(angle[i]), float(scale[i])
            img = TF.affine(img, angle=a, translate=[0, 0], scale=s, shear=[0.0, 0.0],
                            interpolation=InterpolationMode.BILINEAR, fill=black)
            lab = TF.affine(lab, angle=a, translate=[0, 0], scale=s, shear=[0.0, 0.0],
                            interpolation=InterpolationMode.NEAREST, fill=0)
            out_images.append(TF.resize(img, [dc.size, dc.size], interpolation=InterpolationMode.BILINEAR,
                                        antialias=True))
            out_labels.append(TF.resize(lab, [dc.size, dc.size], interpolation=InterpolationMode.NEAREST_EXACT)[0])
        return torch.stack(out_images), torch.stack(out_labels).long()

    def training_loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """OHEM cross-entropy on the pseudo-labels (plain cross-entropy in the linear protocol)."""
        dc = self.cfg.maskdistill.distil
        if batch.label is None:
            raise ConfigError("maskdistill batches need labels (pseudo-labels; ground truth for the linear protocol)")
        if self.student == "deeplab":
            if not isinstance(batch.images, torch.Tensor):
                raise ValueError("the deeplab student expects batch.images as one [b, 3, H, W] tensor")
            images, target = self.augment(batch.images, batch.label, ctx)
            logits = self.model(images)["out"]
        else:
            logits = self.encode(batch.feats)
            target = F.interpolate(batch.label[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
            target = torch.where(target < 0, torch.full_like(target, IGNORE_INDEX), target)
        if self.linear:
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
            if not (target != IGNORE_INDEX).any():
                loss = logits.sum() * 0.0
            return loss, {"loss_linear": loss.detach()}
        loss = ohem_cross_entropy(logits, target, top_fraction=dc.top_fraction, ignore_index=IGNORE_INDEX)
        return loss, {"loss_ohem": loss.detach()}

    # ----------------------------------------------------------------------------------- prediction
    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """K+1 class logits at the input's size (deeplab: the image resized to ``size × size`` and back)."""
        if self.student == "head":
            return self.classifier(self.head(feats))
        size = self.cfg.maskdistill.distil.size
        h, w = feats.shape[-2:]
        x = feats if (h, w) == (size, size) else F.interpolate(feats, size=(size, size), mode="bilinear",
                                                               align_corners=False)
        logits = self.model(x)["out"]
        if (h, w) != (size, size):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits

    def classify(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"cluster": logits / 2}`` (the evaluation's CRF unary is ``log_softmax(2·cluster)`` = log-softmax
        of the logits), plus ``"linear": logits`` in the linear protocol."""
        out = {"cluster": code * 0.5}
        if self.linear:
            out["linear"] = code
        return out
