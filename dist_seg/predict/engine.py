"""The model side of prediction: a checkpoint ready to segment, batched encoding, label maps in bands or tiles.

An image is resized so that its shorter side is ``res`` and both sides are multiples of the backbone's patch
size, encoded with flip averaging (``tta_code``, as evaluation does), and the code is upsampled back to the
image's size and classified a band of rows at a time (:mod:`dist_seg.predict.bands`), so peak memory is the
image, its label map and one band. Cluster ids map to class ids through the Hungarian matching stored in
the checkpoint when there is one (``raw_clusters`` keeps the cluster ids).

:func:`predict_image` is the whole-image reference (the code upsampled to the full size at once, as
``dist-seg predict`` did before bands): the bounded path's labels equal its labels, and the benchmark
compares against it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dist_seg.predict.bands import BAND_ELEMENTS, blend_window, classify_bands, tile_grid

log = logging.getLogger(__name__)


def model_input_size(h: int, w: int, res: int, patch: int) -> tuple[int, int]:
    """Shorter side → ``res``, aspect kept, both sides rounded to a multiple of ``patch`` (at least one patch)."""
    scale = res / min(h, w)
    return (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))


def _resized(image: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``[1, 3, *size]`` float in [0, 1]: the uint8 image crosses to ``device`` as uint8 and is expanded there
    (in place, so a huge image costs one float copy, not two)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float().div_(255)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def predict_image(method, backbone, image: np.ndarray, *, res: int, device: torch.device, crf: bool = False,
                  assignment: Optional[np.ndarray] = None) -> np.ndarray:
    """Label map ``[H, W]`` (int64) of one RGB uint8 image, the code upsampled to the whole image at once.

    The reference path: memory grows as ``C x H x W`` floats. :class:`Predictor` gives the same labels in bands.
    """
    from dist_seg.eval.evaluate import tta_code

    h, w = image.shape[:2]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(device).float() / 255
    x = F.interpolate(x, size=model_input_size(h, w, res, backbone.patch_size), mode="bilinear",
                      align_corners=False, antialias=True)
    feats = backbone.patch_features(torch.cat([x, x.flip(-1)])).float()
    code = tta_code(method, feats[:1], feats[1:])
    code = F.interpolate(code, size=(h, w), mode="bilinear", align_corners=False)
    scores = method.classify(code)["cluster"][0]
    if crf:
        from dist_seg.eval.crf import dense_crf

        probs = dense_crf(image, F.log_softmax(2 * scores, dim=0).float().cpu().numpy())
        labels = probs.argmax(0)
    else:
        labels = scores.argmax(0).cpu().numpy()
    if assignment is not None:
        labels = np.asarray(assignment)[labels]
    return labels.astype(np.int64)


def label_dtype(max_label: int) -> np.dtype:
    """uint8 for label ids up to 255, uint16 above (PNG's two integer depths)."""
    if max_label > 65535:
        raise ValueError(f"{max_label + 1} labels do not fit a 16-bit PNG")
    return np.dtype(np.uint8) if max_label <= 255 else np.dtype(np.uint16)


class Predictor:
    """A checkpoint ready to segment images: what ``dist-seg predict``, its Ray Data actors and the MLflow
    model (:mod:`dist_seg.serving`) all run, so their label maps are the same.

    Args:
        checkpoint: a training checkpoint, read with ``torch.load(weights_only=True)`` (unless ``trust``).
        device: where the backbone and head run (the backbone runs in its configured dtype on CUDA).
        overrides: config overrides (``backbone.weights=/path``).
        raw_clusters: keep cluster ids instead of mapping them to classes.
        trust: also read an old-format pickle (runs any code it holds).
        band_elements: code elements (channels x rows x width) upsampled at once; bounds the memory of a band.

    Raises:
        ValueError: (``CheckpointError``) the checkpoint cannot be used; FileNotFoundError: missing weights.
    """

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device = "cpu", overrides=(),
                 raw_clusters: bool = False, trust: bool = False, band_elements: int = BAND_ELEMENTS) -> None:
        from dist_seg.backbones import backbone_dtype, load_backbone
        from dist_seg.trainer import load_method_checkpoint

        self.device = torch.device(device)
        self.method, self.cfg, state = load_method_checkpoint(checkpoint, device=self.device, overrides=overrides,
                                                               trust=trust)
        self.method.eval()
        cfg = self.cfg
        self.backbone = load_backbone(cfg.backbone.name, cfg.backbone.weights,
                                      allow_download=cfg.backbone.allow_download,
                                      dtype=backbone_dtype(cfg.backbone.dtype, cfg.train.mixed_precision)
                                      ).to(self.device)
        self.patch = self.backbone.patch_size
        self.band_elements = band_elements
        probe = torch.zeros(1, self.method.feat_dim, 1, 1, device=self.device)
        with torch.no_grad():
            self.num_clusters = int(self.method.classify(self.method.encode(probe))["cluster"].shape[1])
        assignment = None if raw_clusters else state.get("assignment")
        if assignment is not None:
            assignment = np.asarray(assignment).astype(np.int64)
            # Unmatched clusters (−1) are written as 255, the usual "void" value of label PNGs.
            assignment = np.where(assignment < 0, 255, assignment)
        self.assignment = assignment
        top = int(assignment.max()) if assignment is not None else self.num_clusters - 1
        self.dtype = label_dtype(top)
        # Cluster id -> written id, as a table in the written dtype (identity for raw clusters).
        self.lut = (assignment if assignment is not None else np.arange(self.num_clusters)).astype(self.dtype)
        self.meta = state.get("meta", {})
        self.default_res = cfg.data.eval_res
        self.tile_res = cfg.data.res

    # ------------------------------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray], res: int) -> torch.Tensor:
        """Flip-averaged codes ``[B, D, h, w]`` of RGB uint8 images that share a model input size.

        Each image is resized on the device on its own (its float copy is the largest buffer of a huge
        image); the small resized images are encoded together, in the backbone's dtype.
        """
        from dist_seg.eval.evaluate import tta_code

        sizes = {model_input_size(*im.shape[:2], res, self.patch) for im in images}
        if len(sizes) != 1:
            raise ValueError(f"images of one batch must share a model input size, got {sorted(sizes)}")
        size = sizes.pop()
        x = torch.cat([_resized(im, size, self.device) for im in images])
        feats = self.backbone.patch_features(torch.cat([x, x.flip(-1)])).float()
        feats, flipped = feats.chunk(2)
        return tta_code(self.method, feats, flipped)

    # ----------------------------------------------------------------------------------- label maps
    def _scores(self, code: torch.Tensor) -> torch.Tensor:
        return self.method.classify(code)["cluster"]

    @torch.no_grad()
    def clusters(self, code: torch.Tensor, size: tuple[int, int], *, image: Optional[np.ndarray] = None,
                 crf: bool = False) -> np.ndarray:
        """Cluster ids ``[H, W]`` (uint8/uint16/int32, the smallest that holds them) of one code ``[1, D, h, w]``.

        Without CRF the code is upsampled and classified in bands; the dense CRF needs every pixel's scores
        at once (use tiles for huge images with CRF).
        """
        dtype = label_dtype(self.num_clusters - 1)
        if crf:
            from dist_seg.eval.crf import dense_crf

            code = F.interpolate(code, size=size, mode="bilinear", align_corners=False)
            scores = self._scores(code)[0]
            probs = dense_crf(image, F.log_softmax(2 * scores, dim=0).float().cpu().numpy())
            return probs.argmax(0).astype(dtype)
        out = np.empty(size, dtype=dtype)
        for start, stop, scores in classify_bands(code, size, self._scores, band_elements=self.band_elements):
            out[start:stop] = scores[0].argmax(0).cpu().numpy()
        return out

    @torch.no_grad()
    def tiled_clusters(self, image: np.ndarray, *, tile: int, stride: int, res: int, crf: bool = False,
                       batch_size: int = 8) -> np.ndarray:
        """Cluster ids ``[H, W]`` from overlapping ``tile`` x ``tile`` windows every ``stride`` source pixels.

        Each tile is encoded at ``res`` (as a training crop was), its code upsampled to the tile and
        classified (refined by the dense CRF when asked, tile by tile); overlapping tiles' scores (CRF
        probabilities) are summed with :func:`blend_window` weights. Scores are accumulated for one row of
        tiles at a time (``K x tile x W`` floats), never for the whole image.
        """
        h, w = image.shape[:2]
        th, tw = min(tile, h), min(tile, w)
        ys, xs = tile_grid(h, tile, stride), tile_grid(w, tile, stride)
        window = blend_window(th, tw, self.device)
        k = self.num_clusters
        out = np.empty((h, w), dtype=label_dtype(k - 1))
        acc = torch.zeros(k, th, w, device=self.device)
        for r, y in enumerate(ys):
            crops = [image[y:y + th, x:x + tw] for x in xs]
            for first in range(0, len(crops), batch_size):
                codes = self.encode(crops[first:first + batch_size], res)
                for j, code in enumerate(codes):
                    x = xs[first + j]
                    code = F.interpolate(code[None], size=(th, tw), mode="bilinear", align_corners=False)
                    scores = self._scores(code)[0]
                    if crf:
                        from dist_seg.eval.crf import dense_crf

                        unary = F.log_softmax(2 * scores, dim=0).float().cpu().numpy()
                        crop = np.ascontiguousarray(crops[first + j])
                        scores = torch.from_numpy(dense_crf(crop, unary)).to(self.device)
                    acc[:, :, x:x + tw] += window * scores
            # Rows above the next tile row receive nothing more: classify them and slide the accumulator.
            done = (ys[r + 1] - y) if r + 1 < len(ys) else th
            out[y:y + done] = acc[:, :done].argmax(0).cpu().numpy()
            acc = torch.cat([acc[:, done:], torch.zeros(k, done, w, device=self.device)], dim=1)
        return out

    def to_labels(self, clusters: np.ndarray) -> np.ndarray:
        """Written ids (class ids through the stored matching, or cluster ids) in :attr:`dtype`."""
        return self.lut[clusters]

    def __call__(self, image: np.ndarray, *, res: Optional[int] = None, crf: bool = False,
                 tile: Optional[int] = None, stride: Optional[int] = None) -> np.ndarray:
        """Label map ``[H, W]`` (int64) of one RGB uint8 image ``[H, W, 3]``.

        Args:
            image: the image.
            res: the shorter side fed to the backbone (default: the run's ``eval_res``; with ``tile``, ``data.res``).
            crf: refine with the dense CRF.
            tile, stride: sliding-window inference in source pixels (:meth:`tiled_clusters`); stride
                defaults to half the tile.
        """
        if tile:
            clusters = self.tiled_clusters(image, tile=tile, stride=stride or max(1, tile // 2),
                                           res=res or self.tile_res, crf=crf)
        else:
            code = self.encode([image], res or self.default_res)
            clusters = self.clusters(code, image.shape[:2], image=image, crf=crf)
        return self.to_labels(clusters).astype(np.int64)
