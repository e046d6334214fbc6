"""``dist-seg prepare folder``: shards from a folder of images, with optional label PNGs.

Images are every file with an image extension directly in ``src_images`` (sorted by name, so the
global index order is reproducible). Labels, if given, are 8-bit PNGs (grayscale or palette: the pixel
values are the class ids, 255 = ignore) in ``labels_dir`` with the same file stem as their image.

Problems a user can fix are reported before anything is written: images without a label, labels whose
size differs from their image (each listed). Images that cannot be decoded are skipped, counted,
listed in a warning and recorded in the manifest (``extra["unreadable"][split]``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from dist_seg.data.manifest import (
    DataError,
    DatasetManifest,
    PathLike,
    manifest_path,
    read_manifest,
    update_split,
)
from dist_seg.data.shards import Sample, decode_label_png, write_split
from dist_seg.data.shards import five_crop as five_crop_sample
from dist_seg.data.toy import palette

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
_LIST_LIMIT = 20


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:_LIST_LIMIT])
    more = f"\n  ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"\n  {shown}{more}"


def list_images(src_images: PathLike) -> list[Path]:
    """Image files directly inside ``src_images``, sorted by name."""
    src = Path(src_images)
    if not src.is_dir():
        raise DataError(f"image folder {src} does not exist")
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {src}")
    return files


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # PIL raises many types for broken files; any of them means "unreadable"
        return None


def prepare_folder(
    src_images: PathLike,
    out_root: PathLike,
    *,
    labels_dir: PathLike | None = None,
    split: str = "train",
    num_classes: int | None = None,
    five_crop: bool = False,
    crop_ratio: float = 0.5,
    samples_per_shard: int = 256,
    image_format: str = "jpg",
    overwrite: bool = False,
) -> DatasetManifest:
    """Write one split of shards from a folder of images.

    Args:
        src_images: folder of images.
        out_root: dataset folder (other splits already there are kept).
        labels_dir: folder of label PNGs named ``<image stem>.png``, or None for unlabelled data.
        split: split name to write.
        num_classes: number of classes; label ids must be below it (or 255). Inferred from the labels
            (largest id + 1) when None.
        five_crop: write STEGO's five crops of every image instead of the image.
        crop_ratio: five-crop side ratio.
        samples_per_shard: records per shard.
        image_format: ``"jpg"`` or ``"png"``.
        overwrite: rewrite the split if it was already written.

    Returns:
        The updated :class:`DatasetManifest`.

    Raises:
        DataError: images without labels, label/image size mismatches, label ids >= ``num_classes``.
    """
    images = list_images(src_images)
    label_paths: dict[Path, Path] = {}
    if labels_dir is not None:
        labels = Path(labels_dir)
        if not labels.is_dir():
            raise DataError(f"label folder {labels} does not exist")
        missing = []
        for img in images:
            lab = labels / f"{img.stem}.png"
            if lab.is_file():
                label_paths[img] = lab
            else:
                missing.append(img.name)
        if missing:
            raise DataError(f"{len(missing)} of {len(images)} images in {src_images} have no label "
                            f"<stem>.png in {labels}:{_listing(missing)}\nAdd the labels, or move these "
                            "images out of the folder.")

    unreadable: list[str] = []
    readable: list[Path] = []
    mismatched: list[str] = []
    for img in images:
        size = _header_size(img)
        if size is None:
            unreadable.append(img.name)
            continue
        readable.append(img)
        if img in label_paths:
            lab_size = _header_size(label_paths[img])
            if lab_size != size:
                got = "unreadable" if lab_size is None else f"{lab_size[0]}×{lab_size[1]}"
                mismatched.append(f"{label_paths[img].name}: {got}, image {img.name}: {size[0]}×{size[1]}")
    if mismatched:
        raise DataError(f"{len(mismatched)} labels do not match their image's size:{_listing(mismatched)}")

    state = {"max_id": -1}

    def samples() -> Iterator[Sample]:
        for img_path in readable:
            try:
                with Image.open(img_path) as img:
                    image = np.array(img.convert("RGB"), dtype=np.uint8)
            except Exception as err:  # a file whose header parsed may still fail to decode
                log.warning("skipping unreadable image %s (%s)", img_path, err)
                unreadable.append(img_path.name)
                continue
            label = None
            if img_path in label_paths:
                label = decode_label_png(label_paths[img_path].read_bytes())
                valid = label[label != 255]
                if valid.size:
                    top = int(valid.max())
                    if num_classes is not None and top >= num_classes:
                        raise DataError(f"{label_paths[img_path]} holds class id {top} but num_classes={num_classes} "
                                        "(ids must be < num_classes, 255 = ignore)")
                    state["max_id"] = max(state["max_id"], top)
            sample = Sample(image=image, label=label, source=str(img_path))
            if five_crop:
                yield from five_crop_sample(sample, crop_ratio)
            else:
                yield sample

    info = write_split(samples(), out_root, split, samples_per_shard=samples_per_shard, image_format=image_format,
                       crop="five" if five_crop else "none", overwrite=overwrite)
    if unreadable:
        log.warning("skipped %d unreadable images in %s:%s", len(unreadable), src_images, _listing(unreadable))
    k = num_classes
    if k is None and labels_dir is not None:
        k = len(info.class_pixels or []) or (state["max_id"] + 1) or None
        if k is not None and manifest_path(out_root).is_file():
            k = max(k, read_manifest(out_root).num_classes or 0)
    source = {"images": str(src_images), "labels": None if labels_dir is None else str(labels_dir)}
    fields: dict = {"name": "folder", "extra": {"sources": {split: source}, "unreadable": {split: unreadable}}}
    if k:
        # An unlabelled split leaves the class description of labelled splits alone.
        fields.update(num_classes=k, class_names=[f"class{i}" for i in range(k)], colors=palette(k))
    manifest = update_split(out_root, split, info, **fields)
    return manifest


# ------------------------------------------------------------------------------------------ CLI hook
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-seg prepare folder``."""
    parser.add_argument("--images", required=True, help="folder of images (jpg, png, ...)")
    parser.add_argument("--labels", default=None, help="folder of label PNGs named <image stem>.png (optional)")
    parser.add_argument("--split", default="train", help="split to write (default train)")
    parser.add_argument("--num-classes", type=int, default=None, help="number of classes (default: inferred)")
    parser.add_argument("--five-crop", action="store_true", help="write STEGO's five crops of each image")
    parser.add_argument("--crop-ratio", type=float, default=0.5, help="five-crop side ratio (default 0.5)")
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="shard image format")


def convert(args: argparse.Namespace) -> int:
    """Run ``dist-seg prepare folder``."""
    prepare_folder(
        args.images,
        args.out,
        labels_dir=args.labels,
        split=args.split,
        num_classes=args.num_classes,
        five_crop=args.five_crop,
        crop_ratio=args.crop_ratio,
        samples_per_shard=args.samples_per_shard or 256,
        image_format=args.image_format,
        overwrite=args.overwrite,
    )
    return 0
