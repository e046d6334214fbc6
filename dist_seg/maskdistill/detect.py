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

import functools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from dist_seg import distributed as D

log = logging.getLogger(__name__)

__all__ = ["CANDIDATES_FORMAT", "DetectError", "DetectionData", "augment_sample", "build_maskrcnn",
           "detection_batches", "detector_from_checkpoint", "global_batch_ids", "load_ssl_resnet50", "lr_factor",
           "predict_candidates", "prediction_settings", "read_candidates"]

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
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
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
        rpn_post_nms_top_n_train, rpn_post_nms_top_n_test, box_batch_size_per_image: proposals kept per image
            and ROIs sampled per image (torchvision's defaults; smaller values only make tests cheaper).

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
                    box_detections_per_img=detections_per_img, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
                    rpn_post_nms_top_n_test=rpn_post_nms_top_n_test, box_batch_size_per_image=box_batch_size_per_image,
                    _skip_resize=True)


def lr_factor(step: int, *, num_steps: int, warmup_steps: int, warmup_factor: float, milestones: Sequence[float],
              gamma: float) -> float:
    """Learning-rate multiplier at ``step`` (SPEC §8.3): linear warm-up, then ×``gamma`` at each milestone.

    Warm-up goes linearly from ``warmup_factor`` at step 0 to 1 at ``warmup_steps`` (detectron2's
    ``WarmupMultiStepLR``); ``milestones`` are fractions of ``num_steps`` (0.8333 and 0.9167 give 20k and
    22k of 24k).
    """
    factor = 1.0
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor = warmup_factor * (1 - alpha) + alpha
    passed = sum(step >= round(m * num_steps) for m in milestones)
    return factor * gamma**passed


# ------------------------------------------------------------------------------------ detection data
def _decode_rle(segmentation: dict, height: int, width: int, *, where: str) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise DetectError(f"{where}: expected an RLE segmentation {{'size', 'counts'}}")
    size = [int(v) for v in segmentation["size"]]
    if size != [height, width]:
        raise DetectError(f"{where}: RLE of size {size} for an image of {height}×{width}; the masks file belongs to "
                          f"another dataset: re-run `dist-seg masks RECIPE`")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": size, "counts": counts}, *size)
    else:
        rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def _encode_rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


class DetectionData:
    """The detector's training set: full-resolution images read by global index, with the named masks.

    Targets come from ``masks_<split>.json`` after ``dist-seg name`` (``category_id = cluster + 1``, RLE
    masks); images from the split's shards through :class:`~dist_seg.data.shards.IndexedShards` (random
    access, so the stream is a pure function of seed, step and rank). Images without a mask are skipped
    (counted in ``num_skipped`` and logged).

    Args:
        root: prepared dataset folder (the shards).
        split: split name.
        masks_file: the named masks JSON.
    """

    def __init__(self, root: str | os.PathLike, split: str, masks_file: str | os.PathLike) -> None:
        from dist_seg.maskdistill.files import read_json

        self.root, self.split, self.masks_file = str(root), split, Path(masks_file)
        doc = read_json(masks_file, what="named object masks", made_by="dist-seg masks RECIPE && dist-seg name RECIPE")
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
                doc.get("annotations"), list):
            raise DetectError(f"{masks_file} is not a COCO-style masks file (no images/annotations lists); "
                              f"re-run `dist-seg masks RECIPE`")
        self.sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in doc["images"]}
        self.annotations: dict[int, list[dict]] = {}
        unnamed = 0
        for ann in doc["annotations"]:
            if ann.get("category_id") is None:
                unnamed += 1
                continue
            self.annotations.setdefault(int(ann["image_id"]), []).append(ann)
        if unnamed:
            raise DetectError(f"{masks_file}: {unnamed} masks have no category_id (not clustered yet); "
                              f"run `dist-seg name RECIPE` first")
        category_ids = [int(a["category_id"]) for anns in self.annotations.values() for a in anns]
        if any(c < 1 for c in category_ids):
            raise DetectError(f"{masks_file}: category ids must be cluster + 1 >= 1 (0 is the background)")
        categories = doc.get("categories") or []
        self.num_clusters = max([len(categories), *(int(c["id"]) for c in categories), *category_ids, 0])
        if self.num_clusters < 1:
            raise DetectError(f"{masks_file} holds no named masks; re-run `dist-seg masks RECIPE` and `dist-seg name`")
        unknown = sorted(set(self.annotations) - set(self.sizes))
        if unknown:
            raise DetectError(f"{masks_file}: annotations for images {unknown[:3]} that are not in its image list")
        self.ids = sorted(self.annotations)
        self.num_images = len(self.sizes)
        self.num_skipped = self.num_images - len(self.ids)
        if not self.ids:
            raise DetectError(f"{masks_file}: none of its {self.num_images} images has a mask; nothing to train on")
        if self.num_skipped:
            log.info("detection data: %d of %d images of '%s' have no mined mask and are skipped",
                     self.num_skipped, self.num_images, split)
        self._shards = None

    @property
    def shards(self):
        if self._shards is None:
            from dist_seg.data.shards import IndexedShards

            self._shards = IndexedShards(self.root, self.split, decode="full")
        return self._shards

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image uint8 ``[3, H, W]``, masks bool ``[n, H, W]`` and labels int64 ``[n]`` (cluster + 1) of one image."""
        image = self.shards[image_id]["image"]
        height, width = image.shape[-2:]
        if self.sizes[image_id] != (height, width):
            raise DetectError(f"{self.masks_file}: image {image_id} is {self.sizes[image_id]} there but "
                              f"{(height, width)} in the shards of {self.root}; re-run `dist-seg masks RECIPE`")
        anns = self.annotations.get(image_id, [])
        masks = [_decode_rle(a["segmentation"], height, width, where=f"{self.masks_file} annotation {a.get('id')}")
                 for a in anns]
        masks_t = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.bool)
        labels = torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64)
        return image, masks_t, labels


def augment_sample(image: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, *, short_side: int,
                   max_size: int, flip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training view: resize so the short side is ``short_side`` (long side ≤ ``max_size``), maybe h-flip.

    Args:
        image: uint8 ``[3, H, W]``.
        masks: bool ``[n, H, W]``.
        labels: int64 ``[n]``.

    Returns:
        The float ``0..1`` image and Mask R-CNN's target ``{"boxes" [m, 4] x1y1x2y2, "labels" [m],
        "masks" uint8 [m, h, w]}``; masks that vanish at the new size are dropped with their labels.
    """
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    scale = min(short_side / min(height, width), max_size / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    # Bilinear without antialias, as torchvision's own detection resize; masks nearest.
    out = F.interpolate(image[None].float() / 255.0, size=size, mode="bilinear", align_corners=False)[0]
    m = F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5 if len(masks) else \
        torch.zeros((0, *size), dtype=torch.bool)
    if flip:
        out, m = out.flip(-1), m.flip(-1)
    keep = m.flatten(1).any(1)
    m, labels = m[keep], labels[keep]
    rows, cols = m.any(2), m.any(1)
    ar_h, ar_w = torch.arange(size[0]), torch.arange(size[1])
    # Pixel-extent boxes (x2 = last column + 1), as COCO's [x, y, w, h] of the same mask.
    boxes = torch.stack([torch.where(cols, ar_w, size[1]).amin(1), torch.where(rows, ar_h, size[0]).amin(1),
                         torch.where(cols, ar_w, -1).amax(1) + 1, torch.where(rows, ar_h, -1).amax(1) + 1],
                        dim=1).float() if len(m) else torch.zeros((0, 4))
    return out, {"boxes": boxes, "labels": labels, "masks": m.to(torch.uint8)}


def global_batch_ids(ids: Sequence[int], step: int, global_batch: int, *, seed: int) -> list[int]:
    """Image ids of the global batch of ``step``: epochs of seeded permutations of ``ids``, read in order."""
    out = []
    for p in range(step * global_batch, (step + 1) * global_batch):
        epoch, i = divmod(p, len(ids))
        perm = _epoch_permutation(len(ids), seed, epoch)
        out.append(int(ids[perm[i]]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=D.seeded_generator(seed, "detect-order", epoch)).tolist()


def detection_batches(data: DetectionData, *, seed: int, start_step: int, local_batch: int, rank: int,
                      world_size: int, min_sizes: Sequence[int], max_size: int, flip_prob: float,
                      device: torch.device | str = "cpu") -> Iterator[tuple[list, list, torch.Tensor]]:
    """This rank's endless stream of ``(images, targets, image_ids)``, starting with the batch of ``start_step``.

    Step ``s`` takes the global batch :func:`global_batch_ids`; each image's short side and flip are drawn
    for the whole global batch from a generator seeded by ``(seed, s, "detect-augment")``; rank ``r``
    keeps rows ``r·b .. (r+1)·b``. Nothing depends on the number of ranks or on earlier steps, so a
    resumed run sees exactly the batches of an uninterrupted one.
    """
    if not min_sizes:
        raise DetectError("maskdistill.detect.min_sizes is empty: give at least one training short side")
    global_batch = local_batch * world_size
    step = start_step
    while True:
        ids = global_batch_ids(data.ids, step, global_batch, seed=seed)
        gen = D.seeded_generator(seed, step, "detect-augment")
        size_index = torch.randint(len(min_sizes), (global_batch,), generator=gen)
        flips = torch.rand(global_batch, generator=gen) < flip_prob
        images, targets = [], []
        rows = range(rank * local_batch, (rank + 1) * local_batch)
        for j in rows:
            image, masks, labels = data.load(ids[j])
            view, target = augment_sample(image, masks, labels, short_side=int(min_sizes[int(size_index[j])]),
                                          max_size=max_size, flip=bool(flips[j]))
            images.append(view.to(device))
            targets.append({k: v.to(device) for k, v in target.items()})
        yield images, targets, torch.tensor([ids[j] for j in rows], dtype=torch.int64)
        step += 1


# ------------------------------------------------------------------------------------------ prediction
CANDIDATES_FORMAT = "dist_seg-candidates-v1"


def detector_from_checkpoint(path: str | os.PathLike, cfg) -> tuple[nn.Module, dict]:
    """The trained Mask R-CNN of a ``maskrcnn`` checkpoint (read with ``weights_only=True``) and its info."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - one-line error for any unreadable file
        raise DetectError(f"{path} is not a readable detector checkpoint ({type(err).__name__}); re-run "
                          f"`dist-seg detect RECIPE`") from None
    weights = state.get("method") if isinstance(state, dict) else None
    key = "model.roi_heads.box_predictor.cls_score.weight"
    if not isinstance(weights, dict) or key not in weights:
        raise DetectError(f"{path} is not a Mask R-CNN checkpoint of method maskrcnn; re-run `dist-seg detect RECIPE`")
    model = _predictor(cfg, num_classes=int(weights[key].shape[0]))
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    return model, {"checkpoint": str(path), "step": int(state.get("step", -1))}


def _predictor(cfg, *, num_classes: int) -> nn.Module:
    d = cfg.maskdistill.detect
    return build_maskrcnn(num_classes, init="random", trainable_layers=d.trainable_layers, min_size=d.test_min_size,
                          max_size=d.max_size, score_thresh=d.score_thresh, nms_thresh=d.nms_thresh,
                          detections_per_img=d.detections_per_img, **model_sizes(d))


def model_sizes(d) -> dict[str, int]:
    """DetectConfig's proposal / ROI sampling sizes as :func:`build_maskrcnn` keywords."""
    return {"rpn_post_nms_top_n_train": d.rpn_post_nms_top_n_train,
            "rpn_post_nms_top_n_test": d.rpn_post_nms_top_n_test,
            "box_batch_size_per_image": d.box_batch_size_per_image}


def prediction_settings(cfg, split: str) -> dict[str, Any]:
    """What decides the candidates besides the checkpoint (kept in the file's ``info``)."""
    d = cfg.maskdistill.detect
    return {"split": split, "data_root": str(cfg.data.root), "score_thresh": d.score_thresh,
            "nms_thresh": d.nms_thresh, "detections_per_img": d.detections_per_img, "mask_thresh": d.mask_thresh,
            "test_min_size": d.test_min_size, "max_size": d.max_size,
            "rpn_post_nms_top_n_test": d.rpn_post_nms_top_n_test}


@torch.no_grad()
def predict_image(model: nn.Module, image: torch.Tensor, *, image_id: int, mask_thresh: float) -> list[dict]:
    """Candidates of one uint8 ``[3, H, W]`` image as COCO results, sorted by score (highest first)."""
    device = next(model.parameters()).device
    out = model([image.to(device).float() / 255.0])[0]
    order = torch.argsort(out["scores"], descending=True, stable=True)
    rows = []
    for i in order.tolist():
        mask = (out["masks"][i, 0] > mask_thresh).cpu().numpy()
        x1, y1, x2, y2 = (float(v) for v in out["boxes"][i].tolist())
        rows.append({"image_id": int(image_id), "category_id": int(out["labels"][i]),
                     "score": float(out["scores"][i]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "segmentation": _encode_rle(mask)})
    return rows


def predict_candidates(cfg, checkpoint_or_method, split: Optional[str] = None, *,
                       device: torch.device | str | None = None) -> Path:
    """Predict scored candidates for every image of ``split`` and write ``candidates_<split>.json`` (SPEC §8.3).

    Each image at full resolution goes through the model's own test-time resize
    (``maskdistill.detect.test_min_size``, ``max_size``); detections with score ≥ ``score_thresh`` after NMS
    at ``nms_thresh``, at most ``detections_per_img``, masks > ``mask_thresh`` at image size, sorted by
    score. Ranks split the images (rank ``r`` takes every ``world``-th one), write their part beside the
    output, and rank 0 merges them into the final file atomically. The file is
    ``{"info": {...}, "candidates": [COCO results]}`` (see :mod:`dist_seg.maskdistill`).

    Args:
        cfg: the run config (data root, ``maskdistill`` section).
        checkpoint_or_method: a ``maskrcnn`` checkpoint path (the model is rebuilt with this config's
            test-time settings), or the trained method or Mask R-CNN module, used as built.
        split: split to predict (default ``maskdistill.detect.split`` or ``data.train_split``).
        device: where the model runs (default: where its parameters are; checkpoints load on CPU or
            ``cuda:<local rank>`` when CUDA is available).

    Returns:
        The path of the candidates file (on every rank).
    """
    from dist_seg.data.shards import IndexedShards
    from dist_seg.maskdistill.files import candidates_path, write_json_atomic

    split = split or cfg.maskdistill.detect.split or cfg.data.train_split
    if isinstance(checkpoint_or_method, (str, os.PathLike)):
        model, source = detector_from_checkpoint(checkpoint_or_method, cfg)
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    else:
        model = getattr(checkpoint_or_method, "model", checkpoint_or_method)
        # Used as built: its test-time settings are those of the config it was built from.
        source = {"checkpoint": None, "step": None}
    if device is not None:
        model = model.to(device)
    was_training = model.training
    model.eval()
    rank, world = D.get_rank(), D.get_world_size()
    shards = IndexedShards(cfg.data.root, split, decode="full")
    out = candidates_path(cfg, split)
    part = out.with_name(f".{out.name}.part-{rank:04d}-of-{world:04d}")
    rows = []
    try:
        for image_id in range(rank, len(shards), world):
            rows.extend(predict_image(model, shards[image_id]["image"], image_id=image_id,
                                      mask_thresh=cfg.maskdistill.detect.mask_thresh))
    finally:
        shards.close()
        model.train(was_training)
    write_json_atomic(rows, part)
    D.barrier()
    if rank == 0:
        parts = [out.with_name(f".{out.name}.part-{r:04d}-of-{world:04d}") for r in range(world)]
        merged = []
        for p in parts:
            with open(p) as f:
                merged.extend(json.load(f))
        merged.sort(key=lambda r: (r["image_id"], -r["score"]))
        info = {"format": CANDIDATES_FORMAT, "stage": "detect", **source, **prediction_settings(cfg, split),
                "num_images": len(shards), "num_candidates": len(merged), "world_size": world, "complete": True}
        write_json_atomic({"info": info, "candidates": merged}, out)
        for p in parts:
            p.unlink(missing_ok=True)
        log.info("wrote %d candidates for %d images to %s", len(merged), len(shards), out)
    D.barrier()
    return out


def read_candidates(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """``(info, candidates)`` of a candidates file (also accepts a bare COCO results list: info is then ``{}``).

    Raises:
        MaskDistillFileError: missing or unreadable file (the message names ``dist-seg detect``).
    """
    from dist_seg.maskdistill.files import MaskDistillFileError, read_json

    doc = read_json(path, what="Mask R-CNN candidates", made_by="dist-seg detect RECIPE")
    if isinstance(doc, list):
        return {}, doc
    if not isinstance(doc, dict) or not isinstance(doc.get("candidates"), list):
        raise MaskDistillFileError(f"{path} is not a candidates file; delete it and re-run `dist-seg detect RECIPE`")
    return dict(doc.get("info") or {}), doc["candidates"]
