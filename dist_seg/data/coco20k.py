"""``dist-seg prepare coco20k``: COCO20k (19,817 COCO 2014 train images), 80 thing classes + background.

COCO20k is the object-discovery benchmark of LOST (Siméoni et al. 2021), used by MaskDistill for
class-agnostic mask AP50; it trains and tests on the same images (transductive), so there is one split,
``train``. Source layout (``--src``)::

    train2014/COCO_train2014_<12-digit id>.jpg         (or images/train2014/...)
    annotations/instances_train2014.json
    coco_20k_filenames.txt                              (or datasets/coco_20k_filenames.txt, or --list FILE)

The image list is LOST's ``datasets/coco_20k_filenames.txt`` (github.com/valeoai/LOST; also shipped by
TokenCut and others): 19,817 lines such as ``train2014/COCO_train2014_000000000009.jpg``; only the file
name of each line is used.

Labels are painted from the instance annotations with pycocotools: COCO category ids (1..90, with gaps)
become 1..80 in ascending id order, 0 is background; instances are painted largest first, so a smaller
object lying on a larger one stays visible; crowd regions (``iscrowd=1``) not covered by any single
instance become 255 (ignore). Images keep their original resolution.

The instances themselves go beside the shards as COCO ground truth, ``instances_train.json``
(:mod:`dist_seg.data.instances`): ``image_id`` = the record's global index, ``category_id`` in 1..80,
``segmentation`` as compressed RLE, ``iscrowd`` kept, and each image entry keeps its COCO id
(``coco_id``) and file name. Class-agnostic AP50 is scored with ``pycocotools.cocoeval.COCOeval``
against it (``useCats=0``). Images listed but absent from the annotation file, unreadable, or of
another size than the annotations say are skipped, counted and listed in the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dist_seg.data.classes import DatasetClasses, _bit_interleaved_palette
from dist_seg.data.convert_common import (
    DEFAULT_SAMPLES_PER_SHARD,
    SkipItem,
    SourceItem,
    SplitPlan,
    SplitReport,
    add_common_arguments,
    common_kwargs,
    convert_dataset,
    layout_error,
    read_rgb,
)
from dist_seg.data.instances import encode_rle, instances_path, read_instances, write_instances
from dist_seg.data.manifest import DataError, PathLike, read_manifest, update_split

log = logging.getLogger(__name__)

NAME = "coco20k"
SPLIT = "train"
EXPECTED_IMAGES = 19817
LIST_NAME = "coco_20k_filenames.txt"
LIST_URL = "https://github.com/valeoai/LOST/blob/master/datasets/coco_20k_filenames.txt"
ANNOTATIONS = "annotations/instances_train2014.json"
DOCS = "docs/datasets.md#coco20k-coco20k"


@dataclass(frozen=True, kw_only=True)
class CocoItem(SourceItem):
    """A COCO image with its annotations (JSON text, so the item pickles cheaply to pool workers).

    Attributes:
        annotations: JSON list of the image's COCO annotations.
        height: image height the annotations were made for.
        width: image width.
        category_map: JSON object COCO category id -> label id (1..80).
        coco_id: the COCO image id.
    """

    annotations: str = "[]"
    height: int = 0
    width: int = 0
    category_map: str = "{}"
    coco_id: int = -1


def _find(src: Path, candidates: list[str], what: str, fix: str) -> Path:
    for c in candidates:
        if (src / c).exists():
            return src / c
    raise layout_error(f"{NAME}/{SPLIT}", f"{what} at {' or '.join(str(src / c) for c in candidates)}", fix,
                       docs=DOCS)


def _annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    seg = ann["segmentation"]
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE (crowd annotations)
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode([rle])[:, :, 0].astype(bool)


def label_map(annotations: list[dict[str, Any]], height: int, width: int, category_map: dict[int, int]) -> np.ndarray:
    """The semantic label map of one COCO image (see the module docstring for the painting rules)."""
    label = np.zeros((height, width), dtype=np.uint8)
    crowd = np.zeros((height, width), dtype=bool)
    things = [a for a in annotations if not a.get("iscrowd")]
    for ann in sorted(things, key=lambda a: -float(a.get("area", 0.0))):  # largest first: small ones stay on top
        label[_annotation_mask(ann, height, width)] = category_map[int(ann["category_id"])]
    for ann in annotations:
        if ann.get("iscrowd"):
            crowd |= _annotation_mask(ann, height, width)
    label[crowd & (label == 0)] = 255
    return label


def load_item(item: CocoItem) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a COCO image and paint its label map from the instance annotations."""
    image = read_rgb(item.image)
    if image.shape[:2] != (item.height, item.width):
        raise SkipItem(f"image is {image.shape[1]}×{image.shape[0]} but the annotations say "
                       f"{item.width}×{item.height}")
    cmap = {int(k): v for k, v in json.loads(item.category_map).items()}
    return image, label_map(json.loads(item.annotations), item.height, item.width, cmap)


def _read_list(path: Path) -> list[str]:
    names = [Path(line.strip()).name for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"coco20k: image list {path} is empty")
    return names


def _load_coco(path: Path):
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints timing lines
            return COCO(str(path))
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise DataError(f"coco20k: {path} is not a COCO instances file ({type(err).__name__}: {err}); "
                        "use instances_train2014.json from annotations_trainval2014.zip") from None


def plan(src: PathLike, *, image_list: str | None = None) -> tuple[SplitPlan, DatasetClasses, Any, dict[int, int]]:
    """The split plan, the classes, the loaded ``COCO`` object and the category map.

    Raises:
        DataError: a missing folder or file; the message names it and where to get it.
    """
    src = Path(src)
    img_dir = _find(src, ["train2014", "images/train2014"], "the COCO 2014 train images",
                    "unpack train2014.zip into --src")
    ann_path = _find(src, [ANNOTATIONS], "the instance annotations", "unpack annotations_trainval2014.zip into --src")
    if image_list is not None:
        list_path = Path(image_list)
        if not list_path.is_file():
            raise DataError(f"coco20k: --list {list_path} does not exist; get {LIST_NAME} from {LIST_URL}")
    else:
        list_path = _find(src, [LIST_NAME, f"datasets/{LIST_NAME}"], f"the image list {LIST_NAME}",
                          f"download it from {LIST_URL} into --src, or pass --list FILE")
    names = _read_list(list_path)
    coco = _load_coco(ann_path)
    cat_ids = sorted(coco.getCatIds())
    category_map = {cid: k + 1 for k, cid in enumerate(cat_ids)}
    cats = coco.loadCats(cat_ids)
    classes = DatasetClasses(name=NAME, class_names=("background", *(c["name"] for c in cats)),
                             colors=tuple(_bit_interleaved_palette(len(cat_ids) + 1)))
    by_name = {img["file_name"]: img for img in coco.dataset.get("images", [])}
    cmap_text = json.dumps(category_map)
    items = []
    for name in names:
        info = by_name.get(name)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])) if info else []
        items.append(CocoItem(
            source=f"{img_dir.name}/{name}", image=str(img_dir / name),
            # Not in the annotation file: a counted skip, never a silent one (a missing image file is counted
            # as unreadable when it is read).
            label=f"the {ann_path.name} entry of {name}", label_missing=info is None,
            annotations=json.dumps(anns), height=int(info["height"]) if info else 0,
            width=int(info["width"]) if info else 0, category_map=cmap_text,
            coco_id=int(info["id"]) if info else -1))
    note = f"{len(items)} images from {list_path}"
    if len(items) != EXPECTED_IMAGES:
        note += f" [COCO20k has {EXPECTED_IMAGES}]"
    split_plan = SplitPlan(split=SPLIT, items=items, labelled=True, five_crop=False,
                           details={"converter": __name__, "src": str(src.resolve()), "images": str(img_dir),
                                    "annotations": str(ann_path), "image_list": str(list_path),
                                    "image_list_note": note, "params": {"num_images": len(items)}})
    return split_plan, classes, coco, category_map


def _write_instances(out: Path, split_plan: SplitPlan, category_map: dict[int, int],
                     skipped_sources: set[str], classes: DatasetClasses) -> None:
    doc: dict[str, Any] = {
        "info": {"dataset": NAME, "split": SPLIT, "params": split_plan.details["params"],
                 "note": "image_id = global record index; category_id = label id 1..80; coco_id = COCO image id"},
        "images": [], "annotations": [],
        "categories": [{"id": k, "name": n} for k, n in enumerate(classes.class_names) if k > 0],
    }
    index = 0
    for item in split_plan.items:
        if item.source in skipped_sources:
            continue
        anns = json.loads(item.annotations)
        doc["images"].append({"id": index, "width": item.width, "height": item.height,
                              "file_name": Path(item.image).name, "coco_id": item.coco_id})
        for ann in anns:
            mask = _annotation_mask(ann, item.height, item.width)
            rle = encode_rle(mask)
            coded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            doc["annotations"].append({
                "id": len(doc["annotations"]) + 1, "image_id": index,
                "category_id": category_map[int(ann["category_id"])], "segmentation": rle,
                "bbox": [float(v) for v in ann["bbox"]], "area": float(mask_utils.area(coded)),
                "iscrowd": int(ann.get("iscrowd", 0)), "coco_id": ann.get("id")})
        index += 1
    write_instances(out, SPLIT, doc)


def prepare_coco20k(src: PathLike, out: PathLike, *, image_list: str | None = None, workers: int | None = None,
                    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, image_format: str = "jpg",
                    strict: bool = False, overwrite: bool = False, progress: bool = True, report: bool = True,
                    crop_ratio: float = 0.5) -> dict[str, SplitReport]:
    """Write COCO20k shards (split ``train``) and ``instances_train.json``.

    Args:
        src: source folder (see the module docstring).
        out: dataset folder to write.
        image_list: the 19,817-name list file (default: ``coco_20k_filenames.txt`` under ``src``).
        workers: pool processes (0 = none, None = usable cores up to 16).
        samples_per_shard: records per shard.
        image_format: ``"jpg"`` or ``"png"``.
        strict: fail instead of skipping images.
        overwrite: rewrite a complete split.
        progress: show a progress bar.
        report: print the verification report.
        crop_ratio: unused (never five-cropped); accepted with the common options.

    Returns:
        ``{"train": SplitReport}``.
    """
    out = Path(out)
    split_plan, classes, _, category_map = plan(src, image_list=image_list)
    note = f"[coco20k/{SPLIT}] {split_plan.details['image_list_note']}"
    if report:
        print(note, flush=True)
    else:
        log.info("%s", note)
    reports = convert_dataset([split_plan], load_item, out, classes, report=report, workers=workers,
                              samples_per_shard=samples_per_shard, image_format=image_format, strict=strict,
                              overwrite=overwrite, progress=progress)
    rep = reports[SPLIT]
    old = read_instances(out, SPLIT)
    if not rep.resumed or old is None or (old.get("info") or {}).get("params") != split_plan.details["params"]:
        manifest = read_manifest(out)
        skipped = {s["source"] for s in (manifest.extra.get("skipped") or {}).get(SPLIT, [])}
        _write_instances(out, split_plan, category_map, skipped, classes)
    manifest = read_manifest(out)
    update_split(out, SPLIT, manifest.split(SPLIT), extra={
        "instances": {SPLIT: instances_path(out, SPLIT).name}, "background_id": 0,
        "category_ids": {str(k): v for k, v in category_map.items()}, "transductive": True})
    return reports


# ------------------------------------------------------------------------------------------ CLI hook
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-seg prepare coco20k``."""
    add_common_arguments(parser, splits=(SPLIT,), default_splits=(SPLIT,), five_crop_default=None)
    parser.add_argument("--list", default=None, metavar="FILE",
                        help=f"the COCO20k image list (default: SRC/{LIST_NAME}; from {LIST_URL})")


def convert(args: argparse.Namespace) -> int:
    """Run ``dist-seg prepare coco20k``."""
    prepare_coco20k(args.src, args.out, image_list=args.list, **common_kwargs(args))
    return 0
