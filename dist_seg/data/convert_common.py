"""The conversion driver shared by the benchmark converters (COCO-Stuff, Cityscapes, Potsdam).

A converter lists its source files as :class:`SourceItem` s (one per image, with the label file it
expects) and supplies a *load function* ``load(item) -> (image, label)`` that reads one image and maps
its label to the target classes. This module does the rest, the same way for every dataset:

* reads, maps, five-crops and encodes images in a ``multiprocessing`` pool (``imap``, ordered,
  chunked), so the record order, and hence every global index, does not depend on ``--workers``;
* writes the records with :func:`dist_seg.data.shards.write_records` (atomic: a split only appears
  once all its shards and its ``wids.json`` exist; a complete split is kept, so re-running the same
  command resumes at the first unfinished split);
* never drops a file silently: an image without its label, a file that cannot be read and a label of
  the wrong size are *skipped*, counted, printed with the reason, and listed in the manifest
  (``extra["skipped"][split]`` and ``extra["unreadable"][split]``); ``strict=True`` turns any of
  them into an error instead;
* verifies what it wrote: records written = (source images − skipped) × crops per image, the tar
  members of every shard match the split index, and prints per-class pixel counts of the written
  labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dist_seg.data.classes import IGNORE, DatasetClasses
from dist_seg.data.manifest import (
    DataError,
    DatasetManifest,
    PathLike,
    SplitInfo,
    manifest_path,
    read_manifest,
    update_split,
)
from dist_seg.data.shards import (
    IMAGE_FORMATS,
    Sample,
    encode_image,
    encode_label,
    five_crop,
    split_is_complete,
    write_records,
)

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 256
_PRINT_LIMIT = 20


class SkipItem(Exception):
    """Raised by a load function for a source file that must be skipped (the message says why)."""


@dataclass(frozen=True, kw_only=True)
class SourceItem:
    """One source image and the label file it should have.

    Attributes:
        source: name recorded in the record's metadata (path relative to the source folder).
        image: image file.
        label: label file, or None for an unlabelled split.
        label_missing: the label file the layout promises does not exist (the item is skipped, or
            the conversion fails with ``strict``).
    """

    source: str
    image: str
    label: str | None = None
    label_missing: bool = False


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """A source image that was not written, and why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source} ({self.reason})"


@dataclass(kw_only=True)
class SplitPlan:
    """What a converter wants written as one split.

    Attributes:
        split: split name in the output folder.
        items: source images in the order they are written.
        labelled: whether the split carries labels (every item then has a ``label`` path).
        five_crop: write STEGO's five crops of every image instead of the image.
        details: JSON-able notes recorded in the manifest (source folders, image list used, ...).
            Its ``params`` entry must match on resume: a complete split written with other
            parameters is an error unless ``overwrite``.
    """

    split: str
    items: list[SourceItem]
    labelled: bool
    five_crop: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class SplitReport:
    """What :func:`convert_split` did for one split.

    Attributes:
        split: split name.
        info: the split's :class:`SplitInfo` as recorded in the manifest.
        num_source_images: images listed in the source for this split.
        skipped: images not written, with reasons (empty when the split was resumed).
        resumed: the split was already complete and nothing was read.
    """

    split: str
    info: SplitInfo
    num_source_images: int
    skipped: list[Skipped]
    resumed: bool = False


# ------------------------------------------------------------------------------------- helpers
def apply_lut(lut: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Map raw label values through a 256-entry lookup table; values outside 0..255 become ignore.

    Args:
        lut: ``uint8[256]`` table (source value -> target class or 255).
        label: integer label map of any integer dtype.

    Returns:
        ``uint8`` label map of the same shape.
    """
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
        raise SkipItem(f"label holds {label.dtype} values, expected integer ids")
    if label.dtype == np.uint8:
        return lut[label]
    wide = label.astype(np.int64)
    inside = (wide >= 0) & (wide <= 255)
    out = np.full(label.shape, IGNORE, dtype=np.uint8)
    out[inside] = lut[wide[inside]]
    return out


def read_rgb(path: PathLike) -> np.ndarray:
    """An image file as ``H×W×3`` uint8 RGB (grey, palette, CMYK and alpha images are converted)."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


def read_label_png(path: PathLike, lut: np.ndarray) -> np.ndarray:
    """A label PNG of raw ids (8-bit grey or palette, or 16-bit grey) mapped through ``lut``.

    Raises:
        SkipItem: the file is a colour image (e.g. a ``*_color.png`` visualisation), not an id map.
    """
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise SkipItem(f"label {Path(path).name} is a {img.mode} image; expected single-channel ids "
                           "(8-bit grey or palette PNG)")
        raw = np.array(img)
    return apply_lut(lut, raw)


DATASETS_PAGE = "docs/datasets.md"


def layout_error(what: str, expected: str, how: str = "", *, docs: str = DATASETS_PAGE) -> DataError:
    """The one message shape of a source tree in the wrong layout: what was expected, where, how to get it,
    and the page of docs/datasets.md that says more (``what``: ``dataset/split``)."""
    how = f" {how[:1].upper()}{how[1:].rstrip('.')}." if how else ""
    return DataError(f"{what}: expected {expected} (not found).{how} See {docs} for the source layout and "
                     "where to get it.")


def require_dir(path: Path, what: str, hint: str = "", *, docs: str = DATASETS_PAGE) -> Path:
    """``path`` if it is a folder, else a :class:`DataError` naming the expected path (:func:`layout_error`)."""
    if not path.is_dir():
        raise layout_error(what, f"the folder {path}", hint, docs=docs)
    return path


def require_file(path: Path, what: str, hint: str = "", *, docs: str = DATASETS_PAGE) -> Path:
    """``path`` if it is a file, else a :class:`DataError` naming the expected path (:func:`layout_error`)."""
    if not path.is_file():
        raise layout_error(what, f"the file {path}", hint, docs=docs)
    return path


def check_splits(splits: Sequence[str], known: Sequence[str], dataset: str) -> list[str]:
    """Validate ``--splits`` values against the splits a dataset knows."""
    bad = [s for s in splits if s not in known]
    if bad:
        raise DataError(f"{dataset} has no split(s) {bad}; choose from {list(known)}")
    if not splits:
        raise DataError(f"{dataset}: no split to convert; choose from {list(known)}")
    return list(dict.fromkeys(splits))


def default_workers() -> int:
    """Pool size when ``--workers`` is not given: the usable cores, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


# -------------------------------------------------------------------------------- per-image work
@dataclass(frozen=True, kw_only=True)
class _Encoding:
    image_format: str
    five_crop: bool
    crop_ratio: float


def _process(load: Callable[[SourceItem], tuple[np.ndarray, np.ndarray | None]], enc: _Encoding,
             item: SourceItem) -> tuple[list[dict[str, Any]] | None, np.ndarray | None, Skipped | None]:
    """Read, map, crop and encode one source image (runs in a pool worker).

    Returns ``(records, class_histogram, None)`` or ``(None, None, Skipped)``.
    """
    if item.label_missing:
        return None, None, Skipped(source=item.source, reason=f"no label: {item.label} does not exist")
    try:
        image, label = load(item)
    except SkipItem as err:
        return None, None, Skipped(source=item.source, reason=str(err))
    except Exception as err:  # noqa: BLE001 - corrupt files fail in PIL/scipy with many error types
        return None, None, Skipped(source=item.source, reason=f"could not be read: {type(err).__name__}: {err}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        return None, None, Skipped(source=item.source,
                                   reason=f"image is {image.dtype} {image.shape}, expected H×W×3 uint8")
    if label is not None and label.shape != image.shape[:2]:
        return None, None, Skipped(
            source=item.source,
            reason=f"label {Path(item.label or '').name} is {label.shape[1]}×{label.shape[0]} "
                   f"but the image is {image.shape[1]}×{image.shape[0]}")
    sample = Sample(image=image, label=label, source=item.source)
    pieces = five_crop(sample, enc.crop_ratio) if enc.five_crop else [sample]
    records = []
    hist = np.zeros(256, dtype=np.int64) if label is not None else None
    for piece in pieces:
        # Same record layout as dist_seg.data.shards.write_split.
        record: dict[str, Any] = {
            enc.image_format: encode_image(piece.image, enc.image_format),
            "json": {"source": piece.source, "crop": piece.crop},
        }
        if piece.label is not None:
            record["label.png"] = encode_label(piece.label)
            hist += np.bincount(piece.label.ravel(), minlength=256)
        records.append(record)
    return records, hist, None


def _results(fn: Callable, items: Sequence[SourceItem], workers: int) -> Iterator[tuple]:
    """``map(fn, items)`` in order, in a process pool when ``workers > 0``."""
    if workers <= 0 or len(items) <= 1:
        yield from map(fn, items)
        return
    # fork where the platform has it (as torch's DataLoader workers do): a spawned worker would
    # re-import torch & co. before its first image, seconds per worker.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    chunksize = max(1, min(32, len(items) // (workers * 8)))
    with ctx.Pool(processes=min(workers, len(items))) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)


# --------------------------------------------------------------------------------------- driver
def _existing_manifest(out: Path, classes: DatasetClasses) -> DatasetManifest | None:
    if not manifest_path(out).is_file():
        return None
    manifest = read_manifest(out)
    if manifest.name != classes.name:
        raise DataError(f"{out} already holds the dataset '{manifest.name}'; write {classes.name} to another "
                        "--out folder")
    return manifest


def _dataset_fields(classes: DatasetClasses) -> dict[str, Any]:
    return {"name": classes.name, "num_classes": classes.num_classes,
            "class_names": list(classes.class_names), "colors": [list(c) for c in classes.colors]}


def _merged_extra(out: Path, split: str, details: dict[str, Any], skipped: list[Skipped]) -> dict[str, Any]:
    # update_split merges `extra` one top-level key at a time: merge the per-split maps ourselves.
    old = read_manifest(out).extra if manifest_path(out).is_file() else {}
    conversion = dict(old.get("conversion") or {})
    conversion[split] = details
    skipped_map = dict(old.get("skipped") or {})
    skipped_map[split] = [dataclasses.asdict(s) for s in skipped]
    unreadable = dict(old.get("unreadable") or {})
    unreadable[split] = [str(s) for s in skipped]
    return {"conversion": conversion, "skipped": skipped_map, "unreadable": unreadable}


def _check_shards(out: Path, split: str, info: SplitInfo) -> None:
    """Every shard holds exactly the records the index says, with consecutive global indices."""
    expected_index = 0
    for name, size in zip(info.shards, info.shard_sizes or []):
        keys: list[str] = []
        with tarfile.open(out / split / name) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    keys.append(member.name[: -len(".json")])
        if len(keys) != size:
            raise DataError(f"verification failed: {out / split / name} holds {len(keys)} records, "
                            f"its index says {size}")
        for key in keys:
            if int(key) != expected_index:
                raise DataError(f"verification failed: {out / split / name} record {key} is out of order "
                                f"(expected {expected_index:09d})")
            expected_index += 1
    if expected_index != info.num_samples:
        raise DataError(f"verification failed: {out / split} holds {expected_index} records, "
                        f"the split info says {info.num_samples}")


def format_report(report: SplitReport, classes: DatasetClasses) -> str:
    """Human-readable verification of one split: counts, skipped files and class pixel counts."""
    info = report.info
    crops = 5 if info.crop == "five" else 1
    lines = [f"[{classes.name}/{report.split}] "
             + ("already complete, kept (pass --overwrite to rewrite it)" if report.resumed else "written")]
    if report.resumed:
        lines.append(f"  {info.num_samples} records in {len(info.shards)} shards, crop={info.crop}")
    else:
        lines.append(f"  source images: {report.num_source_images}, skipped: {len(report.skipped)}, "
                     f"written: {report.num_source_images - len(report.skipped)} images x {crops} "
                     f"= {info.num_samples} records in {len(info.shards)} shards (crop={info.crop})")
        for s in report.skipped[:_PRINT_LIMIT]:
            lines.append(f"  skipped {s}")
        if len(report.skipped) > _PRINT_LIMIT:
            lines.append(f"  ... and {len(report.skipped) - _PRINT_LIMIT} more skipped "
                         "(all listed in manifest.json under extra.skipped)")
    if info.has_labels and info.class_pixels is not None:
        total = sum(info.class_pixels) + info.ignore_pixels
        width = max(len(n) for n in classes.class_names)
        lines.append(f"  pixels per class (written labels, {total} in all):")
        for k, name in enumerate(classes.class_names):
            count = info.class_pixels[k] if k < len(info.class_pixels) else 0
            lines.append(f"    {k:3d} {name:<{width}} {count:>14d} {100.0 * count / max(total, 1):6.2f}%")
        lines.append(f"    {IGNORE:3d} {'(ignore)':<{width}} {info.ignore_pixels:>14d} "
                     f"{100.0 * info.ignore_pixels / max(total, 1):6.2f}%")
    elif not info.has_labels:
        lines.append("  unlabelled split")
    return "\n".join(lines)


def convert_split(
    plan: SplitPlan,
    load: Callable[[SourceItem], tuple[np.ndarray, np.ndarray | None]],
    out: PathLike,
    classes: DatasetClasses,
    *,
    workers: int | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    image_format: str = "jpg",
    crop_ratio: float = 0.5,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> SplitReport:
    """Convert one split and record it in the manifest.

    Args:
        plan: the split's source images and options.
        load: picklable function (module level) reading one :class:`SourceItem` into
            ``(H×W×3 uint8 RGB image, H×W uint8 label with 255 = ignore, or None)``; it raises
            :class:`SkipItem` for files to skip, any other exception counts as unreadable.
        out: dataset folder.
        classes: the dataset's classes (manifest name, class names, colours).
        workers: pool processes (0 = in this process; None = :func:`default_workers`).
        samples_per_shard: records per tar shard.
        image_format: ``"jpg"`` (quality 95) or ``"png"``.
        crop_ratio: five-crop side ratio.
        strict: fail on the first skipped image instead of skipping it.
        overwrite: rewrite the split even if it is complete.
        progress: show a progress bar.

    Returns:
        The :class:`SplitReport`.

    Raises:
        DataError: layout problems, ``strict`` skips, a split whose images were all skipped, a
            complete split written with other parameters, or a failed verification.
    """
    if image_format not in IMAGE_FORMATS:
        raise DataError(f"--image-format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    out = Path(out)
    workers = default_workers() if workers is None else workers
    crop = "five" if plan.five_crop else "none"
    details = {**plan.details, "params": {**plan.details.get("params", {}), "crop": crop,
                                          "crop_ratio": crop_ratio if plan.five_crop else None,
                                          "image_format": image_format}}
    details = json.loads(json.dumps(details))  # exactly what the manifest will hold
    manifest = _existing_manifest(out, classes)
    if not plan.items:
        raise DataError(f"{classes.name}/{plan.split}: no source images found "
                        f"({plan.details.get('images', 'see docs/datasets.md')})")

    if not overwrite:
        done = split_is_complete(out, plan.split)
        if done is not None:
            recorded = ((manifest.extra.get("conversion") or {}).get(plan.split) or {}) if manifest else {}
            if recorded.get("params") is not None and recorded["params"] != details["params"]:
                raise DataError(f"{out / plan.split} was written with {recorded['params']}, this run asks for "
                                f"{details['params']}; pass --overwrite to rewrite it")
            if manifest is None or plan.split not in manifest.splits:
                # Killed between writing the split and recording it: record it now.
                update_split(out, plan.split, done, **_dataset_fields(classes),
                             extra=_merged_extra(out, plan.split, details, []))
            return SplitReport(split=plan.split, info=done, num_source_images=len(plan.items),
                               skipped=[], resumed=True)

    missing = [it for it in plan.items if it.label_missing]
    if strict and missing:
        names = "\n  ".join(f"{it.source}: {it.label}" for it in missing[:_PRINT_LIMIT])
        raise DataError(f"{classes.name}/{plan.split}: {len(missing)} images have no label (--strict):\n  {names}")

    enc = _Encoding(image_format=image_format, five_crop=plan.five_crop, crop_ratio=crop_ratio)
    fn = functools.partial(_process, load, enc)
    skipped: list[Skipped] = []
    hist = np.zeros(256, dtype=np.int64)
    stats: dict[str, Any] = {}

    def records() -> Iterator[dict[str, Any]]:
        results = _results(fn, plan.items, workers)
        first = next(results, None)  # starts the pool before tqdm starts its monitor thread
        bar = tqdm(total=len(plan.items), desc=f"{classes.name}/{plan.split}", unit="img",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        with bar:
            for recs, h, skip in itertools.chain([first] if first is not None else [], results):
                bar.update(1)
                if skip is not None:
                    if strict:
                        raise DataError(f"{classes.name}/{plan.split}: {skip} (--strict)")
                    log.warning("skipping %s", skip)
                    skipped.append(skip)
                    continue
                if h is not None:
                    hist[:] += h
                yield from recs
        if len(skipped) == len(plan.items):
            raise DataError(f"{classes.name}/{plan.split}: all {len(skipped)} source images were skipped, "
                            f"e.g. {skipped[0]}")
        if plan.labelled:
            stats["class_pixels"] = [int(v) for v in hist[: classes.num_classes]]
            stats["ignore_pixels"] = int(hist[IGNORE])
            stray = int(hist[classes.num_classes: IGNORE].sum())
            if stray:  # a load function bug, never the user's data: the LUTs only emit 0..K-1, 255
                raise DataError(f"{stray} label pixels outside 0..{classes.num_classes - 1} and {IGNORE}")

    info = write_records(records(), out, plan.split, samples_per_shard=samples_per_shard, crop=crop,
                         overwrite=overwrite, stats=stats)
    try:
        expected = (len(plan.items) - len(skipped)) * (5 if plan.five_crop else 1)
        if info.num_samples != expected:
            raise DataError(f"verification failed: {out / plan.split} holds {info.num_samples} records, "
                            f"expected {expected}")
        if info.has_labels != plan.labelled:
            raise DataError(f"verification failed: {out / plan.split} has_labels={info.has_labels}, "
                            f"expected {plan.labelled}")
        _check_shards(out, plan.split, info)
    except DataError:
        # A split that failed verification must not look complete to the next (resuming) run.
        shutil.rmtree(out / plan.split, ignore_errors=True)
        raise
    details["num_source_images"] = len(plan.items)
    details["num_skipped"] = len(skipped)
    update_split(out, plan.split, info, **_dataset_fields(classes),
                 extra=_merged_extra(out, plan.split, details, skipped))
    return SplitReport(split=plan.split, info=info, num_source_images=len(plan.items), skipped=skipped)


def convert_dataset(
    plans: Iterable[SplitPlan],
    load: Callable[[SourceItem], tuple[np.ndarray, np.ndarray | None]],
    out: PathLike,
    classes: DatasetClasses,
    *,
    report: bool = True,
    **kwargs: Any,
) -> dict[str, SplitReport]:
    """:func:`convert_split` for each plan, printing each split's verification report.

    Args:
        plans: one :class:`SplitPlan` per split, converted in order.
        load: see :func:`convert_split`.
        out: dataset folder.
        classes: the dataset's classes.
        report: print each split's verification report on stdout (else only log it).
        **kwargs: passed to :func:`convert_split`.

    Returns:
        Split name -> :class:`SplitReport`.
    """
    reports = {}
    for plan in plans:
        report = convert_split(plan, load, out, classes, **kwargs)
        reports[plan.split] = report
        text = format_report(report, classes)
        if report:
            print(text, flush=True)
        else:
            log.info("%s", text)
    return reports


# ---------------------------------------------------------------------------------- one converter
@dataclass(frozen=True, kw_only=True)
class Converter:
    """The skeleton of a benchmark converter: a new dataset is this, a ``plan_split`` and a ``load_item``.

    The skeleton owns what every converter does alike: the command-line options, the source folder check,
    the split names, listing every split before anything is written (so a layout error surfaces first), the
    one-line note of where each split's images come from, and the shared driver (:func:`convert_dataset`).

    Attributes:
        classes: the target classes (``classes.name`` is the ``dist-seg prepare`` name).
        splits: splits the dataset knows.
        default_splits: splits converted when ``--splits`` is not given (default: all).
        five_crop_default: default of ``--five-crop`` for the train split; None: the dataset is never cropped.
        docs: the page (and section) of docs/datasets.md that says how to get the dataset.
    """

    classes: DatasetClasses
    splits: tuple[str, ...]
    default_splits: tuple[str, ...] | None = None
    five_crop_default: bool | None = None
    docs: str = DATASETS_PAGE

    @property
    def name(self) -> str:
        return self.classes.name

    def error(self, split: str | None, expected: str, how: str = "") -> DataError:
        """:func:`layout_error` for this dataset (``split`` None: the whole source)."""
        return layout_error(self.name if split is None else f"{self.name}/{split}", expected, how, docs=self.docs)

    def require_dir(self, path: Path, split: str | None, how: str = "") -> Path:
        if not path.is_dir():
            raise self.error(split, f"the folder {path}", how)
        return path

    def require_file(self, path: Path, split: str | None, how: str = "") -> Path:
        if not path.is_file():
            raise self.error(split, f"the file {path}", how)
        return path

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The options every converter shares (:func:`add_common_arguments`)."""
        add_common_arguments(parser, splits=self.splits, default_splits=self.default_splits or self.splits,
                             five_crop_default=self.five_crop_default)

    def convert(self, src: PathLike, out: PathLike, splits: Sequence[str],
                plan: Callable[[Path, str], SplitPlan], load: Callable[[SourceItem], tuple[np.ndarray, Any]], *,
                report: bool = True, **kwargs: Any) -> dict[str, SplitReport]:
        """Check ``splits``, list every split with ``plan(src, split)``, then write them.

        A missing or wrongly laid out ``src`` is reported by ``plan``, naming the first folder or file it
        expected there (through :meth:`error`).

        ``kwargs`` go to :func:`convert_split` (workers, samples_per_shard, image_format, crop_ratio, strict,
        overwrite, progress). A plan's ``details["image_list_note"]`` is printed (or logged) per split.
        """
        splits = check_splits(splits, self.splits, self.name)
        src = Path(src)
        plans = []
        for split in splits:  # every split is listed first: a layout error surfaces before any writing
            split_plan = plan(src, split)
            note = split_plan.details.get("image_list_note")
            if note:
                line = f"[{self.name}/{split}] {len(split_plan.items)} images from {note}"
                if report:
                    print(line, flush=True)
                else:
                    log.info("%s", line)
            plans.append(split_plan)
        return convert_dataset(plans, load, out, self.classes, report=report, **kwargs)


# ---------------------------------------------------------------------------------- CLI options
def add_common_arguments(parser: argparse.ArgumentParser, *, splits: Sequence[str], default_splits: Sequence[str],
                         five_crop_default: bool | None) -> None:
    """Options every benchmark converter shares (``--out``, ``--samples-per-shard`` and
    ``--overwrite`` come from ``dist-seg prepare`` itself).

    Args:
        parser: the converter's sub-parser.
        splits: splits the dataset knows.
        default_splits: splits converted when ``--splits`` is not given.
        five_crop_default: default of ``--five-crop/--no-five-crop`` for the train split, or None
            for datasets without five-crop.
    """
    parser.add_argument("--src", required=True, help="dataset source folder (official layout, see docs/datasets.md)")
    parser.add_argument("--splits", nargs="+", choices=list(splits), default=list(default_splits),
                        help=f"splits to convert (default: {' '.join(default_splits)})")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes reading and encoding images (default: usable cores, at most 16; "
                             "0 = no pool)")
    parser.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpg",
                        help="image encoding in the shards (default jpg, quality 95; png is lossless)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on a missing label, an unreadable file or a wrong-size label instead of "
                             "skipping it (skips are always listed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if five_crop_default is not None:
        parser.add_argument("--five-crop", action=argparse.BooleanOptionalAction, default=five_crop_default,
                            help="write STEGO's five crops of every train image (default: "
                                 f"{'on' if five_crop_default else 'off'}); val is never cropped")
        parser.add_argument("--crop-ratio", type=float, default=0.5,
                            help="five-crop side as a fraction of the image side (default 0.5)")


def common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`convert_split` keyword arguments from the parsed common options."""
    return {
        "workers": args.workers,
        "samples_per_shard": args.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD,
        "image_format": args.image_format,
        "crop_ratio": getattr(args, "crop_ratio", 0.5),
        "strict": args.strict,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }
