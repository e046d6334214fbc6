"""``dist-seg prepare cocostuff27``: COCO-Stuff 164k with the 27 coarse classes.

Source layout (``--src``), either as the official archives unpack::

    train2017/*.jpg  val2017/*.jpg                                   (COCO 2017 images)
    stuffthingmaps_trainval2017/{train2017,val2017}/*.png            (fine ids 0..181, 255 = unlabeled)
    curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse*.txt       (optional image lists)

or as IIC's setup script and STEGO's ``cocostuff.zip`` arrange it::

    images/{train2017,val2017}/*.jpg   annotations/{train2017,val2017}/*.png   curated/...

Labels become the 27 COCO-Stuff super-categories through
:data:`dist_seg.data.classes.COCOSTUFF_FINE_TO_COARSE`; 255 stays ignore.

Image lists. STEGO trains on the ids in ``curated/train2017/Coco164kFull_Stuff_Coarse.txt`` and
evaluates on ``curated/val2017/Coco164kFull_Stuff_Coarse_7.txt`` (IIC's curated lists: images of at
least 360 px a side with at least 75 % stuff pixels). Those are the defaults; when the default list
file is absent every image of the split folder is used instead, and the converter says so. Any other
list (a file name under ``curated/<split>2017/``, or a path) or ``all`` can be chosen per split. The
list used is printed and recorded in the manifest (``extra.conversion.<split>.image_list``).

The train split is five-cropped by default (STEGO's recipe); val never is.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dist_seg.data.classes import COCOSTUFF27, COCOSTUFF27_LUT
from dist_seg.data.convert_common import (
    Converter,
    SourceItem,
    SplitPlan,
    SplitReport,
    common_kwargs,
    read_label_png,
    read_rgb,
)
from dist_seg.data.manifest import DataError, PathLike

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
STEGO_IMAGE_LISTS = {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"}
"""The curated list STEGO reads for each split (``src/data.py``: ``Coco``, subset None / 7)."""

CONVERTER = Converter(classes=COCOSTUFF27, splits=SPLITS, five_crop_default=True,
                      docs="docs/datasets.md#coco-stuff-27-cocostuff27")

# (layout name, image folder, label folder), relative to --src; {d} is train2017 / val2017.
LAYOUTS = (
    ("official", "{d}", "stuffthingmaps_trainval2017/{d}"),
    ("iic", "images/{d}", "annotations/{d}"),
)


def find_folders(src: Path, split: str) -> tuple[Path, Path, str]:
    """The image and label folders of ``split`` and the name of the layout they follow.

    Raises:
        DataError: neither layout is present; the message names the expected folders.
    """
    d = SPLIT_DIRS[split]
    for name, images, labels in LAYOUTS:
        img_dir, lab_dir = src / images.format(d=d), src / labels.format(d=d)
        if img_dir.is_dir() and lab_dir.is_dir():
            return img_dir, lab_dir, name
    expected = " and ".join(str(src / p.format(d=d)) for p in LAYOUTS[0][1:])
    found = [str(src / p.format(d=d)) for _, *ps in LAYOUTS for p in ps if (src / p.format(d=d)).is_dir()]
    raise CONVERTER.error(
        split, f"the folders {expected}, or {src / 'images' / d} and {src / 'annotations' / d}",
        "Unpack the COCO 2017 images and the stuffthingmaps_trainval2017 archive into --src; "
        + (f"only found {', '.join(found)}" if found else "found neither"))


def resolve_image_list(src: Path, split: str, choice: str | None) -> tuple[Path | None, str]:
    """Which image list a split uses.

    Args:
        src: source folder.
        split: ``train`` or ``val``.
        choice: None (STEGO's list if present, else all images), ``"all"``, a file name under
            ``src/curated/<split>2017/``, or a path to a list file.

    Returns:
        ``(list file or None for all images, a sentence saying which)``.

    Raises:
        DataError: an explicitly chosen list that does not exist.
    """
    curated = src / "curated" / SPLIT_DIRS[split]
    if choice == "all":
        return None, f"all images of the split folder (--{split}-list all)"
    if choice is None:
        default = curated / STEGO_IMAGE_LISTS[split]
        if default.is_file():
            return default, f"STEGO's curated list {default}"
        return None, (f"all images of the split folder: STEGO's curated list {default} is not there "
                      "(see docs/datasets.md to get it)")
    path = Path(choice)
    for candidate in (curated / choice, path):
        if candidate.is_file():
            return candidate, f"the image list {candidate}"
    raise DataError(f"cocostuff27/{split}: image list {choice!r} not found (looked for {curated / choice} and "
                    f"{path}); pass a file name under {curated}, a path, or 'all'")


def _read_ids(path: Path) -> list[str]:
    ids = []
    for line in path.read_text().splitlines():
        entry = line.strip()
        if entry:
            ids.append(Path(entry).stem if entry.endswith((".jpg", ".png")) else entry)
    if not ids:
        raise DataError(f"image list {path} is empty")
    return ids


def plan_split(src: PathLike, split: str, *, image_list: str | None = None, five_crop: bool = False) -> SplitPlan:
    """List the images of one split with their label files.

    Args:
        src: source folder (see the module docstring).
        split: ``train`` or ``val``.
        image_list: see :func:`resolve_image_list`.
        five_crop: whether the split is written as five-crops.

    Returns:
        The :class:`~dist_seg.data.convert_common.SplitPlan`; images whose label PNG is missing are
        listed with ``label_missing`` (skipped, or an error with ``strict``).
    """
    src = Path(src)
    img_dir, lab_dir, layout = find_folders(src, split)
    list_path, list_note = resolve_image_list(src, split, image_list)
    if list_path is None:
        ids = sorted(p.stem for p in img_dir.iterdir() if p.suffix.lower() == ".jpg")
        if not ids:
            raise CONVERTER.error(split, f".jpg images in {img_dir}")
    else:
        ids = _read_ids(list_path)
    label_names = {p.name for p in lab_dir.iterdir()}
    items = []
    for image_id in ids:
        label_name = f"{image_id}.png"
        items.append(SourceItem(
            source=f"{img_dir.relative_to(src)}/{image_id}.jpg",
            image=str(img_dir / f"{image_id}.jpg"),
            label=str(lab_dir / label_name),
            label_missing=label_name not in label_names,
        ))
    return SplitPlan(
        split=split, items=items, labelled=True, five_crop=five_crop,
        details={
            "converter": __name__,
            "src": str(src.resolve()),
            "layout": layout,
            "images": str(img_dir),
            "labels": str(lab_dir),
            "image_list": None if list_path is None else str(list_path),
            "image_list_note": list_note,
            "params": {"image_list": None if list_path is None else list_path.name},
        },
    )


def load_item(item: SourceItem) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a COCO image and map its stuffthingmaps PNG (fine ids) to the 27 coarse classes."""
    image = read_rgb(item.image)
    return image, None if item.label is None else read_label_png(item.label, COCOSTUFF27_LUT)


def prepare_cocostuff27(src: PathLike, out: PathLike, *, splits: Sequence[str] = SPLITS, five_crop: bool = True,
                        train_list: str | None = None, val_list: str | None = None,
                        **options: Any) -> dict[str, SplitReport]:
    """Write COCO-Stuff-27 shards.

    Args:
        src: source folder (see the module docstring).
        out: dataset folder to write.
        splits: splits to convert (``train``, ``val``).
        five_crop: five-crop the train split (val is never cropped).
        train_list: image list of the train split (see :func:`resolve_image_list`).
        val_list: image list of the val split.
        **options: the options every converter takes (:meth:`~dist_seg.data.convert_common.Converter.convert`):
            ``workers``, ``samples_per_shard``, ``image_format``, ``crop_ratio``, ``strict``, ``overwrite``,
            ``progress``, ``report``.

    Returns:
        Split name -> :class:`~dist_seg.data.convert_common.SplitReport`.
    """
    lists = {"train": train_list, "val": val_list}

    def plan(root: Path, split: str) -> SplitPlan:
        return plan_split(root, split, image_list=lists[split], five_crop=five_crop and split == "train")

    return CONVERTER.convert(src, out, splits, plan, load_item, **options)


# ------------------------------------------------------------------------------------------ CLI hook
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-seg prepare cocostuff27``."""
    CONVERTER.add_arguments(parser)
    for split in SPLITS:
        parser.add_argument(
            f"--{split}-list", default=None, metavar="LIST",
            help=f"image ids of the {split} split: a file name under SRC/curated/{SPLIT_DIRS[split]}/, a path, "
                 f"or 'all' (default: {STEGO_IMAGE_LISTS[split]} if present, else all images)")


def convert(args: argparse.Namespace) -> int:
    """Run ``dist-seg prepare cocostuff27``."""
    kwargs = common_kwargs(args)
    prepare_cocostuff27(args.src, args.out, splits=args.splits, five_crop=args.five_crop,
                        train_list=args.train_list, val_list=args.val_list, **kwargs)
    return 0
