"""``dist-seg prepare voc12``: PASCAL VOC 2012 segmentation, 21 classes, splits ``trainaug`` and ``val``.

Source layout (``--src``): the official ``VOCtrainval_11-May-2012.tar`` unpacked, i.e. any of
``SRC/VOCdevkit/VOC2012``, ``SRC/VOC2012`` or ``SRC`` itself holding::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png              palette PNGs: the pixel values are the class ids
    ImageSets/Segmentation/{train,val}.txt  (val: the 1,449 evaluation images)

plus, for ``trainaug``, the SBD-augmented labels (Hariharan et al. 2011, converted to VOC PNGs): the
``SegmentationClassAug`` folder of 12,031 grey PNGs that DeepLab's setup (``SegmentationClassAug.zip``)
and most VOC repositories distribute. It is looked for at ``--sbd DIR`` (``DIR/SegmentationClassAug``
or ``DIR`` itself), else inside the VOC2012 folder. The trainaug image list, first found of:
``--trainaug-list FILE``; ``ImageSets/Segmentation/train_aug.txt`` or ``ImageSets/SegmentationAug/
train_aug.txt`` (where DeepLab-style setups put ``train_aug.txt``); ``train_aug.txt`` beside the SBD
labels; else it is derived as *every SegmentationClassAug label whose id is not in the val list*, which
is exactly the standard 10,582-image list (SBD train+val ∪ VOC train, minus VOC val), and says so.

MaskDistill's own copy (MaskContrast's ``PASCAL_VOC.tgz``: ``images/``, ``SegmentationClass/``,
``SegmentationClassAug/``, ``sets/{trainaug,val}.txt``) is accepted too (``--src`` pointing at it).

Labels: the PNG pixel values (palette indices for ``SegmentationClass``, grey values for
``SegmentationClassAug``; never the RGB colours) are the ids: 0 = background, 1..20 the object
classes, 255 = void (object borders, difficult regions). Anything else becomes 255. Images keep their
original resolution (no crop, no resize): the evaluation of SPEC §8.6 runs at original resolution.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dist_seg.data.classes import VOC12, VOC12_LUT
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

SPLITS = ("trainaug", "val")
EXPECTED_SIZES = {"trainaug": 10582, "val": 1449}
TRAINAUG_LIST_NAMES = ("ImageSets/Segmentation/train_aug.txt", "ImageSets/SegmentationAug/train_aug.txt")
UNPACK = "Unpack VOCtrainval_11-May-2012.tar into --src"
CONVERTER = Converter(classes=VOC12, splits=SPLITS, docs="docs/datasets.md#pascal-voc-2012-voc12")


def find_voc_root(src: Path) -> tuple[Path, str]:
    """The folder holding the VOC 2012 files, and the layout name (``official`` or ``maskcontrast``)."""
    for candidate in (src / "VOCdevkit" / "VOC2012", src / "VOC2012", src):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate, "official"
    if (src / "images").is_dir() and (src / "sets").is_dir():
        return src, "maskcontrast"
    raise CONVERTER.error(None, f"a VOC 2012 tree under {src}: the folders {src / 'VOCdevkit/VOC2012'}/JPEGImages "
                                "and ImageSets/Segmentation", UNPACK)


def _folders(voc: Path, layout: str) -> tuple[Path, Path]:
    images = voc / ("JPEGImages" if layout == "official" else "images")
    return images, voc / "SegmentationClass"


def find_aug_labels(voc: Path, sbd: Path | None) -> Path:
    """The ``SegmentationClassAug`` folder (``--sbd``, else inside the VOC folder)."""
    candidates = [sbd / "SegmentationClassAug", sbd] if sbd is not None else []
    candidates.append(voc / "SegmentationClassAug")
    for c in candidates:
        if c.is_dir() and any(p.suffix == ".png" for p in c.iterdir()):
            return c
    raise CONVERTER.error("trainaug", f"SBD's SegmentationClassAug label PNGs at {' or '.join(map(str, candidates))}",
                          "Pass --sbd DIR (the unpacked SegmentationClassAug.zip), or convert only --splits val")


def _read_ids(path: Path) -> list[str]:
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    # DeepLab-style lists hold "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png" pairs.
    ids = [Path(i).stem for i in ids]
    if not ids:
        raise DataError(f"voc12: image list {path} is empty")
    return ids


def _val_list(voc: Path, layout: str) -> Path:
    path = voc / ("ImageSets/Segmentation/val.txt" if layout == "official" else "sets/val.txt")
    return CONVERTER.require_file(path, "val", f"It ships with VOCtrainval_11-May-2012.tar; {UNPACK}")


def resolve_trainaug_list(voc: Path, layout: str, aug_dir: Path, choice: str | None) -> tuple[list[str], str]:
    """The trainaug image ids and a sentence saying where they came from (see the module docstring)."""
    if choice is not None:
        path = Path(choice)
        if not path.is_file():
            raise DataError(f"voc12/trainaug: --trainaug-list {path} does not exist")
        return _read_ids(path), f"the list {path}"
    names = [*TRAINAUG_LIST_NAMES] if layout == "official" else ["sets/trainaug.txt"]
    for path in [voc / n for n in names] + [aug_dir.parent / "train_aug.txt", aug_dir / "train_aug.txt"]:
        if path.is_file():
            return _read_ids(path), f"the list {path}"
    val = set(_read_ids(_val_list(voc, layout)))
    ids = sorted(p.stem for p in aug_dir.iterdir() if p.suffix == ".png" and p.stem not in val)
    return ids, (f"every label in {aug_dir} not in the val list ({len(ids)} ids; no train_aug.txt found, "
                 "see docs/datasets.md)")


def plan_split(src: PathLike, split: str, *, sbd: PathLike | None = None,
               trainaug_list: str | None = None) -> SplitPlan:
    """List the images of ``trainaug`` or ``val`` with their label files.

    Raises:
        DataError: the layout is not there; the message names the missing folder or file.
    """
    src = Path(src)
    voc, layout = find_voc_root(src)
    img_dir, seg_dir = _folders(voc, layout)
    if split == "val":
        list_path = _val_list(voc, layout)
        ids, note, lab_dir = _read_ids(list_path), f"the list {list_path}", seg_dir
        CONVERTER.require_dir(lab_dir, "val", f"It ships with VOCtrainval_11-May-2012.tar; {UNPACK}")
    else:
        lab_dir = find_aug_labels(voc, None if sbd is None else Path(sbd))
        ids, note = resolve_trainaug_list(voc, layout, lab_dir, trainaug_list)
    label_names = {p.name for p in lab_dir.iterdir()}
    items = [SourceItem(source=f"{img_dir.name}/{i}.jpg", image=str(img_dir / f"{i}.jpg"),
                        label=str(lab_dir / f"{i}.png"), label_missing=f"{i}.png" not in label_names)
             for i in ids]
    if len(items) != EXPECTED_SIZES[split]:
        note += f" [{len(items)} images; the standard {split} split has {EXPECTED_SIZES[split]}]"
    return SplitPlan(split=split, items=items, labelled=True, five_crop=False,
                     details={"converter": __name__, "src": str(src.resolve()), "layout": layout,
                              "images": str(img_dir), "labels": str(lab_dir), "image_list_note": note,
                              "params": {"num_images": len(items)}})


def load_item(item: SourceItem) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a VOC image and its label PNG (palette indices / grey ids; 255 void)."""
    return read_rgb(item.image), read_label_png(item.label, VOC12_LUT)


def prepare_voc12(src: PathLike, out: PathLike, *, splits: Sequence[str] = SPLITS, sbd: PathLike | None = None,
                  trainaug_list: str | None = None, **options: Any) -> dict[str, SplitReport]:
    """Write PASCAL VOC 2012 shards (``trainaug`` and/or ``val``, original resolution).

    Args:
        src: VOC source folder (see the module docstring).
        out: dataset folder to write.
        splits: splits to convert.
        sbd: folder with the SBD ``SegmentationClassAug`` labels (trainaug only).
        trainaug_list: explicit trainaug image list file.
        **options: the options every converter takes (:meth:`~dist_seg.data.convert_common.Converter.convert`):
            ``workers``, ``samples_per_shard``, ``image_format``, ``crop_ratio``, ``strict``, ``overwrite``,
            ``progress``, ``report``.

    Returns:
        Split name -> :class:`~dist_seg.data.convert_common.SplitReport`.
    """
    def plan(root: Path, split: str) -> SplitPlan:
        return plan_split(root, split, sbd=sbd, trainaug_list=trainaug_list)

    reports = CONVERTER.convert(src, out, splits, plan, load_item, **options)
    for split, split_report in reports.items():
        write_object_instances(out, plan(Path(src), split), resumed=split_report.resumed)
    return reports


def write_object_instances(out: PathLike, plan: SplitPlan, *, resumed: bool = False) -> Path | None:
    """``instances_<split>.json``: VOC 2012's object segmentation set (``SegmentationObject``) within a split.

    The images of the split that VOC annotates with instances (listed in ``ImageSets/Segmentation/
    trainval.txt``, 2,913 images, and holding a ``SegmentationObject`` PNG: val's 1,449 and the 1,464 VOC
    train images inside trainaug) become COCO ground truth (:mod:`dist_seg.data.instances`): ``image_id`` =
    the record's index in the split, one RLE annotation per instance id, its class read from
    ``SegmentationClass`` at the same pixels. A resumed split keeps an existing file; a layout without
    ``SegmentationObject`` (MaskContrast's copy) gets none, and says so.
    """
    from dist_seg.data.instances import instances_path, write_object_png_instances
    from dist_seg.data.manifest import read_manifest

    voc = Path(plan.items[0].image).parent.parent if plan.items else None
    obj_dir = voc / "SegmentationObject" if voc is not None else None
    if obj_dir is None or not obj_dir.is_dir():
        log.info("voc12/%s: no SegmentationObject folder: no instance ground truth written", plan.split)
        return None
    if resumed and instances_path(out, plan.split).is_file():
        return instances_path(out, plan.split)
    listed = voc / "ImageSets/Segmentation/trainval.txt"
    object_set = set(_read_ids(listed)) if listed.is_file() else None
    skipped = {x["source"] for x in (read_manifest(out).extra.get("skipped") or {}).get(plan.split, [])}
    written = [item for item in plan.items if item.source not in skipped]
    images = [(index, Path(item.image).name, obj_dir / f"{Path(item.image).stem}.png",
               voc / "SegmentationClass" / f"{Path(item.image).stem}.png") for index, item in enumerate(written)]
    images = [im for im in images if (object_set is None or im[2].stem in object_set) and im[2].is_file()
              and im[3].is_file()]
    path = write_object_png_instances(out, plan.split, images, category_names=VOC12.class_names[1:], info={
        "dataset": "voc12", "split": plan.split, "source": str(obj_dir),
        "note": "VOC2012 object segmentation set (ImageSets/Segmentation/trainval) within this split; image_id = "
                "global record index; category_id = VOC class 1..20"})
    log.info("voc12/%s: instance ground truth of %d images -> %s", plan.split, len(images), path)
    return path


# ------------------------------------------------------------------------------------------ CLI hook
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-seg prepare voc12``."""
    CONVERTER.add_arguments(parser)
    parser.add_argument("--sbd", default=None, metavar="DIR",
                        help="folder with SBD's SegmentationClassAug label PNGs (for trainaug; default: "
                             "SegmentationClassAug inside the VOC2012 folder)")
    parser.add_argument("--trainaug-list", default=None, metavar="FILE",
                        help="trainaug image list (default: train_aug.txt under ImageSets/, else derived from "
                             "SegmentationClassAug minus val)")


def convert(args: argparse.Namespace) -> int:
    """Run ``dist-seg prepare voc12``."""
    prepare_voc12(args.src, args.out, splits=args.splits, sbd=args.sbd, trainaug_list=args.trainaug_list,
                  **common_kwargs(args))
    return 0
