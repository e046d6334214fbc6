"""Mask R-CNN as a training method (SPEC §8.3): the detector of MaskDistill's detect stage.

It trains under the project's trainer like every other method (Accelerate DDP, checkpoints, exact
resume, MLflow) but reads its own data: full-resolution training images with the named object masks as
targets (:class:`dist_seg.maskdistill.detect.DetectionData`), a deterministic function of
``(seed, step, rank)``. Images are fed as float ``0..1`` RGB, not ImageNet-normalised: torchvision's
Mask R-CNN normalises them itself. It has no segmentation output to validate (``validates = False``).

Losses: torchvision's loss dict (RPN objectness and box, ROI classifier and box, mask), summed. Each
term is normalised over this rank's sampled anchors / proposals / positive masks, as in torchvision and
detectron2, so under DDP the gradient is the mean of the ranks' per-rank losses: the same as a single
process only when every rank samples the same numbers (see the report of ``tests/test_method_maskrcnn.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch

from dist_seg.config import RunConfig
from dist_seg.maskdistill import detect as det
from dist_seg.maskdistill.files import masks_path
from dist_seg.methods.base import Batch, Method, StepContext


class MaskRCNNMethod(Method):
    """torchvision Mask R-CNN R50-FPN (FrozenBN, ``K + 1`` classes) on the mined, named masks.

    ``num_classes`` from the trainer (the dataset's) is not used: the detector's K is the number of
    clusters in ``masks_<split>.json``.
    """

    name = "maskrcnn"
    inputs = "images"
    validates = False
    needs_partners = False

    def __init__(self, cfg: RunConfig, *, feat_dim: int, num_classes: int, has_labels: bool) -> None:
        super().__init__(cfg, feat_dim=feat_dim, num_classes=num_classes, has_labels=has_labels)
        d = cfg.maskdistill.detect
        self.split = d.split or cfg.data.train_split
        self.data = det.DetectionData(cfg.data.root, self.split, masks_path(cfg, self.split))
        self.num_classes = self.data.num_clusters
        self.model = det.build_maskrcnn(self.data.num_clusters + 1, init=d.init, weights=d.weights,
                                        trainable_layers=d.trainable_layers, min_size=d.test_min_size,
                                        max_size=d.max_size, score_thresh=d.score_thresh, nms_thresh=d.nms_thresh,
                                        detections_per_img=d.detections_per_img, **det.model_sizes(d))
        # Linear scaling rule: base_lr is for a global batch of 16 images.
        self.lr = d.base_lr * cfg.data.batch_size / 16
        self._last_lr = self.lr

    def build_optimizer(self) -> torch.optim.Optimizer:
        d = self.cfg.maskdistill.detect
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.SGD([{"params": params, "name": "maskrcnn", "lr": self.lr}], lr=self.lr,
                               momentum=d.momentum, weight_decay=d.weight_decay)

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        d = self.cfg.maskdistill.detect
        self._last_lr = self.lr * det.lr_factor(step, num_steps=self.cfg.train.num_steps,
                                                warmup_steps=d.warmup_steps, warmup_factor=d.warmup_factor,
                                                milestones=d.milestones, gamma=d.gamma)
        for group in optimizer.param_groups:
            group["lr"] = self._last_lr

    def train_batches(self, *, start_step: int, local_batch: int, device: torch.device) -> Optional[Iterator[Batch]]:
        d = self.cfg.maskdistill.detect
        from dist_seg import distributed as D

        stream = det.detection_batches(self.data, seed=self.cfg.train.seed, start_step=start_step,
                                       local_batch=local_batch, rank=D.get_rank(), world_size=D.get_world_size(),
                                       min_sizes=d.min_sizes, max_size=d.max_size, flip_prob=d.flip_prob,
                                       device=device)
        return (Batch(images=images, targets=targets, index=index) for images, targets, index in stream)

    def training_loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        losses = self.model(batch.images, batch.targets)
        total = sum(losses.values())
        return total, {k: v.detach() for k, v in sorted(losses.items())}

    def extra_logs(self) -> dict[str, float]:
        return {"lr": self._last_lr, "skipped_images": float(self.data.num_skipped)}

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("maskrcnn predicts candidates (dist_seg.maskdistill.detect.predict_candidates), "
                                  "not segmentation codes")
