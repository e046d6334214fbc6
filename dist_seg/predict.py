"""``dist-seg predict``: segment a folder of images of any size with a trained checkpoint.

Each image is resized so that its shorter side is ``--res`` and both sides are multiples of the
backbone's patch size, encoded with flip averaging, and the code is upsampled back to the original
size before classification, so every label PNG has the size of its image. Cluster ids are mapped to
class ids through the Hungarian matching stored in the checkpoint when there is one (``--raw-clusters``
keeps the cluster ids).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read(paths: list[Path], skipped: list[str]) -> Iterator[tuple[Path, np.ndarray]]:
    for path in paths:
        try:
            with Image.open(path) as im:
                yield path, np.array(im.convert("RGB"))  # a writable copy: torch refuses read-only arrays
        except (UnidentifiedImageError, OSError) as err:
            skipped.append(f"{path}: {err}")
            log.warning("skipping unreadable image %s (%s)", path, err)


def model_input_size(h: int, w: int, res: int, patch: int) -> tuple[int, int]:
    """Shorter side → ``res``, aspect kept, both sides rounded to a multiple of ``patch`` (at least one patch)."""
    scale = res / min(h, w)
    return (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))


@torch.no_grad()
def predict_image(method, backbone, image: np.ndarray, *, res: int, device: torch.device, crf: bool = False,
                  assignment: Optional[np.ndarray] = None) -> np.ndarray:
    """Label map ``[H, W]`` (int) of one RGB uint8 image."""
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


class Predictor:
    """A checkpoint ready to segment images: what ``dist-seg predict`` and the MLflow model
    (:mod:`dist_seg.serving`) both run, so their label maps are the same.

    Args:
        checkpoint: a training checkpoint, read with ``torch.load(weights_only=True)`` (unless ``trust``).
        device: where the backbone and head run.
        overrides: config overrides (``backbone.weights=/path``).
        raw_clusters: keep cluster ids instead of mapping them to classes.
        trust: also read an old-format pickle (runs any code it holds).

    Raises:
        ValueError: (``CheckpointError``) the checkpoint cannot be used; FileNotFoundError: missing weights.
    """

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device = "cpu", overrides=(),
                 raw_clusters: bool = False, trust: bool = False) -> None:
        from dist_seg.backbones import backbone_dtype, load_backbone
        from dist_seg.trainer import load_method_checkpoint

        self.device = torch.device(device)
        self.method, self.cfg, state = load_method_checkpoint(checkpoint, device=self.device, overrides=overrides,
                                                               trust=trust)
        cfg = self.cfg
        self.backbone = load_backbone(cfg.backbone.name, cfg.backbone.weights,
                                      allow_download=cfg.backbone.allow_download,
                                      dtype=backbone_dtype(cfg.backbone.dtype, cfg.train.mixed_precision)
                                      ).to(self.device)
        assignment = None if raw_clusters else state.get("assignment")
        if assignment is not None:
            assignment = np.asarray(assignment)
            # Unmatched clusters (−1) are written as 255, the usual "void" value of label PNGs.
            assignment = np.where(assignment < 0, 255, assignment)
        self.assignment = assignment
        self.meta = state.get("meta", {})

    def __call__(self, image: np.ndarray, *, res: Optional[int] = None, crf: bool = False) -> np.ndarray:
        """Label map ``[H, W]`` (int64) of one RGB uint8 image ``[H, W, 3]``."""
        return predict_image(self.method, self.backbone, image, res=res or self.cfg.data.eval_res,
                             device=self.device, crf=crf, assignment=self.assignment)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder for label PNGs and overlays")
    parser.add_argument("--res", type=int, default=None, help="shorter side fed to the backbone (default: eval_res)")
    parser.add_argument("--crf", action="store_true", help="refine with the dense CRF")
    parser.add_argument("--raw-clusters", action="store_true", help="write cluster ids, not matched class ids")
    parser.add_argument("--no-overlays", action="store_true", help="write label PNGs only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="also read a checkpoint that torch.load(weights_only=True) refuses (written before "
                             "safe checkpoints): this unpickles it, which runs any code it holds; only for files "
                             "from a source you trust (`dist-seg convert-checkpoint` re-saves it safely)")
    parser.add_argument("overrides", nargs="*", help="config overrides (e.g. backbone.weights=/path)")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from dist_seg.eval.plots import colorize, default_palette
    from dist_seg.runtime import setup_logging

    setup_logging()
    try:
        predictor = Predictor(args.checkpoint, device=args.device, overrides=args.overrides,
                              raw_clusters=args.raw_clusters, trust=args.trust_checkpoint)
        paths = list_images(args.images)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no images found in {args.images}", file=sys.stderr)
        return 2
    colors = predictor.meta.get("colors") or default_palette(256)
    out = Path(args.out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    if not args.no_overlays:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    root = Path(args.images)
    written = 0
    for path, image in tqdm(_read(paths, skipped), total=len(paths), desc="predict", disable=not sys.stderr.isatty()):
        labels = predictor(image, res=args.res, crf=args.crf)
        rel = path.relative_to(root).with_suffix(".png")
        target = out / "labels" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels.astype(np.uint8)).save(target)
        if not args.no_overlays:
            overlay = (0.5 * image + 0.5 * colorize(labels, colors)).astype(np.uint8)
            (out / "overlays" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(overlay).save(out / "overlays" / rel)
        written += 1
    overlays = "" if args.no_overlays else f" and overlays to {out / 'overlays'}"
    print(f"wrote {written} label maps to {out / 'labels'}" + overlays)
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):\n  " + "\n  ".join(skipped), file=sys.stderr)
    return 0
