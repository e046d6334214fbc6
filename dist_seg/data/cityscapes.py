"""``dist-seg prepare cityscapes27``: Cityscapes fine annotations with 27 classes.

Source layout (``--src``), as ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``
unpack side by side::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Labels: ``label id - 7`` for ids 7..33 (road .. bicycle, STEGO's 27 classes); ids 0..6 (void
categories) and anything above 33 become 255 (ignore). cityscapesScripts never draws the license
plate (id -1) into ``*_labelIds.png``, so 0..33 is the full range of the official files.
Images are ordered by city, then file name. The train split is five-cropped by default (STEGO's
recipe); val never is.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dist_seg.data.classes import CITYSCAPES27, CITYSCAPES27_LUT
from dist_seg.data.convert_common import (
    Converter,
    SourceItem,
    SplitPlan,
    SplitReport,
    common_kwargs,
    read_label_png,
    read_rgb,
)
from dist_seg.data.manifest import PathLike

SPLITS = ("train", "val")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
CONVERTER = Converter(classes=CITYSCAPES27, splits=SPLITS, five_crop_default=True,
                      docs="docs/datasets.md#cityscapes-27-cityscapes27")


def plan_split(src: PathLike, split: str, *, five_crop: bool = False) -> SplitPlan:
    """List the images of one split with their ``*_gtFine_labelIds.png``.

    Raises:
        DataError: ``leftImg8bit/<split>`` or ``gtFine/<split>`` is missing, or holds no images.
    """
    src = Path(src)
    img_root = CONVERTER.require_dir(src / "leftImg8bit" / split, split,
                                     "Unpack leftImg8bit_trainvaltest.zip into --src")
    lab_root = CONVERTER.require_dir(src / "gtFine" / split, split, "Unpack gtFine_trainvaltest.zip into --src")
    items = []
    for city in sorted(p for p in img_root.iterdir() if p.is_dir()):
        lab_city = lab_root / city.name
        label_names = {p.name for p in lab_city.iterdir()} if lab_city.is_dir() else set()
        for img in sorted(city.glob(f"*{IMAGE_SUFFIX}")):
            label_name = img.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX
            items.append(SourceItem(
                source=str(img.relative_to(src)),
                image=str(img),
                label=str(lab_city / label_name),
                label_missing=label_name not in label_names,
            ))
    if not items:
        raise CONVERTER.error(split, f"*{IMAGE_SUFFIX} files under {img_root}/<city>/")
    return SplitPlan(
        split=split, items=items, labelled=True, five_crop=five_crop,
        details={"converter": __name__, "src": str(src.resolve()), "images": str(img_root),
                 "labels": str(lab_root), "params": {}},
    )


def load_item(item: SourceItem) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a ``leftImg8bit`` image and map its label ids to the 27 classes."""
    image = read_rgb(item.image)
    return image, None if item.label is None else read_label_png(item.label, CITYSCAPES27_LUT)


def prepare_cityscapes27(src: PathLike, out: PathLike, *, splits: Sequence[str] = SPLITS, five_crop: bool = True,
                         **options: Any) -> dict[str, SplitReport]:
    """Write Cityscapes-27 shards.

    Args:
        src: source folder holding ``leftImg8bit/`` and ``gtFine/``.
        out: dataset folder to write.
        splits: splits to convert (``train``, ``val``).
        five_crop: five-crop the train split (val is never cropped).
        **options: the options every converter takes (:meth:`~dist_seg.data.convert_common.Converter.convert`):
            ``workers``, ``samples_per_shard``, ``image_format``, ``crop_ratio``, ``strict``, ``overwrite``,
            ``progress``, ``report``.

    Returns:
        Split name -> :class:`~dist_seg.data.convert_common.SplitReport`.
    """
    def plan(root: Path, split: str) -> SplitPlan:
        return plan_split(root, split, five_crop=five_crop and split == "train")

    return CONVERTER.convert(src, out, splits, plan, load_item, **options)


# ------------------------------------------------------------------------------------------ CLI hook
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-seg prepare cityscapes27``."""
    CONVERTER.add_arguments(parser)


def convert(args: argparse.Namespace) -> int:
    """Run ``dist-seg prepare cityscapes27``."""
    prepare_cityscapes27(args.src, args.out, splits=args.splits, five_crop=args.five_crop, **common_kwargs(args))
    return 0
