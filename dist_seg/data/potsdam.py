"""``dist-seg prepare potsdam3``: ISPRS Potsdam as IIC preprocessed it, with 3 merged classes.

Source layout (``--src``), as IIC's ``Potsdam.tar.gz`` (or STEGO's ``potsdam.zip``) unpacks::

    imgs/<id>.mat              key "img": 200×200×4 RGB-IR tile (uint8; float tiles are accepted)
    gt/<id>.mat                key "gt": 200×200 ids of the six ISPRS classes 0..5
    labelled_train.txt         ids of the train split    (STEGO's "train")
    labelled_test.txt          ids of the val split      (STEGO's "val")
    unlabelled_train.txt       ids of the unlabelled tiles (optional split ``unlabelled_train``)

Only the RGB channels are kept (IR is dropped, as in STEGO). Values are checked per tile: uint8
is used as is; other integer types must lie in 0..255; float tiles are scaled by 255 when they lie
in [0, 1] and rounded when they lie in [0, 255] (``float_range`` forces one reading); anything else is
skipped with the reason. Labels: impervious surfaces + car -> roads and cars (0), building +
clutter -> buildings and clutter (1), low vegetation + tree -> vegetation (2); any other value ->
255 (ignore). No five-crop (STEGO trains Potsdam on whole tiles).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from dist_seg.data.classes import POTSDAM3, POTSDAM3_LUT
from dist_seg.data.convert_common import (
    Converter,
    SkipItem,
    SourceItem,
    SplitPlan,
    SplitReport,
    apply_lut,
    common_kwargs,
)
from dist_seg.data.manifest import DataError, PathLike

SPLIT_LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt", "unlabelled_train": "unlabelled_train.txt"}
SPLITS = tuple(SPLIT_LISTS)
DEFAULT_SPLITS = ("train", "val")
FLOAT_RANGES = ("auto", "unit", "byte")
UNPACK = "Unpack IIC's Potsdam.tar.gz (or STEGO's potsdam.zip) into --src"
CONVERTER = Converter(classes=POTSDAM3, splits=SPLITS, default_splits=DEFAULT_SPLITS,
                      docs="docs/datasets.md#potsdam-3-potsdam3")


def plan_split(src: PathLike, split: str) -> SplitPlan:
    """List the tiles of one split from its id list.

    Raises:
        DataError: ``imgs/``, ``gt/`` (labelled splits) or the split's id list is missing or empty.
    """
    src = Path(src)
    img_dir = CONVERTER.require_dir(src / "imgs", split, UNPACK)
    labelled = split != "unlabelled_train"
    gt_dir = CONVERTER.require_dir(src / "gt", split, UNPACK) if labelled else None
    list_path = CONVERTER.require_file(src / SPLIT_LISTS[split], split, UNPACK)
    ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
    if not ids:
        raise CONVERTER.error(split, f"tile ids in {list_path} (the file is empty)", UNPACK)
    gt_names = {p.name for p in gt_dir.iterdir()} if gt_dir is not None else set()
    items = []
    for tile in ids:
        name = f"{tile}.mat"
        items.append(SourceItem(
            source=f"imgs/{name}",
            image=str(img_dir / name),
            label=str(gt_dir / name) if gt_dir is not None else None,
            label_missing=gt_dir is not None and name not in gt_names,
        ))
    return SplitPlan(split=split, items=items, labelled=labelled, five_crop=False,
                     details={"converter": __name__, "src": str(src.resolve()), "id_list": str(list_path),
                              "params": {"id_list": list_path.name}})


def _mat_array(path: str, key: str) -> np.ndarray:
    data = scipy.io.loadmat(path)
    if key not in data:
        keys = sorted(k for k in data if not k.startswith("__"))
        raise SkipItem(f"{Path(path).name} has no '{key}' array (it holds {keys})")
    return np.asarray(data[key])


def to_uint8_rgb(img: np.ndarray, float_range: str = "auto") -> np.ndarray:
    """The RGB channels of an ``H×W×C`` (C >= 3) tile as uint8, after checking the value range.

    Args:
        img: RGB-IR (or RGB) tile, any integer or float dtype.
        float_range: for float tiles: ``"unit"`` (values in [0, 1], scaled by 255), ``"byte"`` (values
            in [0, 255], rounded) or ``"auto"`` (unit if the tile's maximum is <= 1, else byte).

    Raises:
        SkipItem: wrong shape, non-finite values or values outside the range.
    """
    if img.ndim != 3 or img.shape[2] < 3:
        raise SkipItem(f"image array has shape {img.shape}, expected H×W×4 (RGB-IR) or H×W×3")
    rgb = img[..., :3]
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if np.issubdtype(rgb.dtype, np.integer):
        lo, hi = int(rgb.min()), int(rgb.max())
        if lo < 0 or hi > 255:
            raise SkipItem(f"{rgb.dtype} RGB values span {lo}..{hi}, outside 0..255")
        return rgb.astype(np.uint8)
    if np.issubdtype(rgb.dtype, np.floating):
        if not np.isfinite(rgb).all():
            raise SkipItem("RGB values are not all finite")
        lo, hi = float(rgb.min()), float(rgb.max())
        unit = float_range == "unit" or (float_range == "auto" and hi <= 1.0)
        top = 1.0 if unit else 255.0
        if lo < 0.0 or hi > top:
            raise SkipItem(f"float RGB values span {lo:g}..{hi:g}, outside 0..{top:g} (float_range={float_range})")
        return np.rint(rgb * (255.0 if unit else 1.0)).astype(np.uint8)
    raise SkipItem(f"image array has dtype {rgb.dtype}, expected integers or floats")


def _gt_ids(gt: np.ndarray) -> np.ndarray:
    if gt.ndim == 3 and gt.shape[2] == 1:
        gt = gt[..., 0]
    if gt.ndim != 2:
        raise SkipItem(f"gt array has shape {gt.shape}, expected H×W")
    if np.issubdtype(gt.dtype, np.floating):
        if not (np.isfinite(gt).all() and (gt == np.round(gt)).all()):
            raise SkipItem("gt array holds non-integer values")
        gt = gt.astype(np.int64)
    return gt


def load_item(item: SourceItem, *, float_range: str = "auto") -> tuple[np.ndarray, np.ndarray | None]:
    """Read one tile (RGB of ``img``) and merge its ``gt`` into the 3 classes."""
    image = to_uint8_rgb(_mat_array(item.image, "img"), float_range)
    if item.label is None:
        return image, None
    return image, apply_lut(POTSDAM3_LUT, _gt_ids(_mat_array(item.label, "gt")))


def prepare_potsdam3(src: PathLike, out: PathLike, *, splits: Sequence[str] = DEFAULT_SPLITS,
                     float_range: str = "auto", **options: Any) -> dict[str, SplitReport]:
    """Write Potsdam-3 shards.

    Args:
        src: source folder (see the module docstring).
        out: dataset folder to write.
        splits: splits to convert (``train``, ``val``, ``unlabelled_train``).
        float_range: how float tiles are read (see :func:`to_uint8_rgb`).
        **options: the options every converter takes (:meth:`~dist_seg.data.convert_common.Converter.convert`):
            ``workers``, ``samples_per_shard``, ``image_format``, ``crop_ratio``, ``strict``, ``overwrite``,
            ``progress``, ``report``.

    Returns:
        Split name -> :class:`~dist_seg.data.convert_common.SplitReport`.
    """
    if float_range not in FLOAT_RANGES:
        raise DataError(f"float_range must be one of {FLOAT_RANGES}, got {float_range!r}")

    def plan(root: Path, split: str) -> SplitPlan:
        split_plan = plan_split(root, split)
        split_plan.details["params"]["float_range"] = float_range
        return split_plan

    load = functools.partial(load_item, float_range=float_range)
    return CONVERTER.convert(src, out, splits, plan, load, **options)


# ------------------------------------------------------------------------------------------ CLI hook
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-seg prepare potsdam3``."""
    CONVERTER.add_arguments(parser)
    parser.add_argument("--float-range", choices=FLOAT_RANGES, default="auto",
                        help="value range of float tiles: unit = [0,1], byte = [0,255], auto = per tile "
                             "(default auto); uint8 tiles are used as they are")


def convert(args: argparse.Namespace) -> int:
    """Run ``dist-seg prepare potsdam3``."""
    prepare_potsdam3(args.src, args.out, splits=args.splits, float_range=args.float_range, **common_kwargs(args))
    return 0
