"""WebDataset shards: writing them, streaming them to the trainer, and reading them by index.

On disk (one folder per split, see :mod:`dist_seg.data.manifest`)::

    shard-000000.tar   records 000000000.jpg|png  000000000.json  000000000.label.png  ...
    wids.json          {"__kind__": "wids-shard-index-v1", "wids_version": 1,
                        "shardlist": [{"url": "shard-000000.tar", "nsamples": N}, ...], ...}

A record's ``__key__`` is its global index in write order (``f"{index:09d}"``); its ``json`` holds
``{"index", "source", "crop", "has_label"}``. Labels are 8-bit PNGs with 255 = ignore; in tensors the
ignore value is -1. Feature shards written by the feature cache use the same layout with ``feat.npy``
(fp16 ``[C, h, w]``) and ``gap.npy`` instead of the image.

Three readers share one record decoder (:class:`RecordDecoder`), so a sample looks the same whichever
way it was read:

* :func:`make_loader` streams shards with ``webdataset`` (``wds.WebLoader``): explicit node and worker
  splitting, shard order and shuffle buffer seeded from ``(seed, epoch)``, cheap resume at a given
  batch, a warn-and-skip handler that counts what it skipped (:class:`SkipCounter`).
* :class:`IndexedShards` fetches records by global index with ``wids`` over the same shards (KNN
  partners), through the split's ``wids.json``: no second copy of the data.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
import numpy as np
import torch
import torchvision.transforms.functional as TVF
import webdataset as wds
from PIL import Image
from torch.utils.data import default_collate

from dist_seg.data import transforms as T
from dist_seg.data.manifest import (
    MANIFEST_NAME,
    DataError,
    PathLike,
    SplitInfo,
    read_manifest,
)
from dist_seg.runtime import loader_worker_init, reap_loader_workers_at_exit

log = logging.getLogger(__name__)

WIDS_INDEX = "wids.json"
WIDS_KIND = "wids-shard-index-v1"
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_FORMATS = ("jpg", "png")
JPEG_QUALITY = 95
DECODE_MODES = ("image", "features", "full", "encoded")
# Rows of these keys differ in length (encoded JPEG bytes): batches hold them as lists.
RAGGED_KEYS = ("jpeg",)


# ----------------------------------------------------------------------------------------- samples
@dataclass(kw_only=True)
class Sample:
    """One image (or crop) before it is written to a shard.

    Attributes:
        image: ``H×W×3`` uint8 RGB.
        label: ``H×W`` integer class ids ``0..K-1`` with 255 (or -1) = ignore, or None.
        source: where it came from (file path or id), kept in the record's metadata.
        crop: five-crop index ``0..4`` (top-left, top-right, bottom-left, bottom-right, centre), or None.
    """

    image: np.ndarray
    label: np.ndarray | None
    source: str
    crop: int | None = None


def five_crop(sample: Sample, crop_ratio: float = 0.5) -> list[Sample]:
    """STEGO's five-crop: the 4 corners and the centre, each ``crop_ratio·H × crop_ratio·W``.

    Uses ``torchvision.transforms.functional.five_crop`` on image and label alike, so crop ``i`` of the
    label covers exactly crop ``i`` of the image.

    Args:
        sample: the full image.
        crop_ratio: crop side as a fraction of the image side, in (0, 1].

    Returns:
        Five samples with ``crop`` = 0 (top-left), 1 (top-right), 2 (bottom-left), 3 (bottom-right),
        4 (centre).
    """
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    h, w = sample.image.shape[:2]
    size = [max(1, int(h * crop_ratio)), max(1, int(w * crop_ratio))]
    image = torch.from_numpy(np.require(sample.image, requirements=["C", "W"])).permute(2, 0, 1)
    image_crops = TVF.five_crop(image, size)
    if sample.label is not None:
        label = torch.from_numpy(np.require(sample.label, requirements=["C", "W"]))
        label_crops = TVF.five_crop(label[None], size)
    else:
        label_crops = (None,) * 5
    return [
        Sample(
            image=np.ascontiguousarray(img.permute(1, 2, 0).numpy()),
            label=None if lab is None else np.ascontiguousarray(lab[0].numpy()),
            source=sample.source,
            crop=i,
        )
        for i, (img, lab) in enumerate(zip(image_crops, label_crops))
    ]


# ---------------------------------------------------------------------------------------- encoding
def encode_image(image: np.ndarray, image_format: str = "jpg") -> bytes:
    """``H×W×3`` uint8 RGB -> JPEG (quality 95) or PNG bytes."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"images must be H×W×3 uint8 RGB arrays, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if image_format == "jpg":
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        pil.save(buf, format="PNG")
    return buf.getvalue()


def encode_label(label: np.ndarray) -> bytes:
    """``H×W`` class ids (0..254, 255 or -1 = ignore) -> 8-bit grayscale PNG bytes."""
    if label.ndim != 2:
        raise DataError(f"labels must be H×W arrays, got shape {label.shape}")
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
        raise DataError(f"labels must hold integer class ids, got dtype {label.dtype}")
    lab = label.astype(np.int64)
    lab[lab == T.IGNORE_LABEL] = T.IGNORE_INDEX
    if lab.size and (lab.min() < 0 or lab.max() > T.IGNORE_INDEX):
        raise DataError(f"label ids must be in 0..254 (255 or -1 = ignore), got min {lab.min()} max {lab.max()}")
    buf = io.BytesIO()
    Image.fromarray(lab.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """8-bit label PNG (grayscale or palette: the pixel values are the ids) -> ``H×W`` uint8."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "P"):
            raise DataError(f"label PNGs must be 8-bit grayscale or palette images, got mode {img.mode}")
        return np.array(img, dtype=np.uint8)


# ----------------------------------------------------------------------------------------- writing
def _read_index(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def split_is_complete(root: PathLike, split: str) -> SplitInfo | None:
    """The :class:`SplitInfo` of a fully written split, or None if it was never (completely) written.

    A split folder only appears under its final name once all shards and its ``wids.json`` exist, so a
    present ``wids.json`` means complete.
    """
    index_path = Path(root) / split / WIDS_INDEX
    if not index_path.is_file():
        return None
    index = _read_index(index_path)
    info = index.get("split_info")
    if info is None:
        return None
    return SplitInfo(**info)


def write_wids_index(split_dir: PathLike, shards: Sequence[str], *, nsamples: Sequence[int] | None = None,
                     split_info: SplitInfo | None = None) -> Path:
    """Write ``<split_dir>/wids.json``, the ``wids`` shard index of shards already in ``split_dir``.

    Args:
        split_dir: folder holding the shards.
        shards: shard file names (relative to ``split_dir``) in global index order.
        nsamples: records per shard; counted from the tar files (with ``wids``) when None.
        split_info: stored alongside (``"split_info"``), which marks the split complete for
            :func:`split_is_complete`.

    Returns:
        The index path.
    """
    split_dir = Path(split_dir)
    if nsamples is None:
        from wids.wids import compute_num_samples

        nsamples = [compute_num_samples(str(split_dir / name)) for name in shards]
    if len(nsamples) != len(shards):
        raise ValueError(f"{len(shards)} shards but {len(nsamples)} sample counts")
    doc: dict[str, Any] = {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "shardlist": [{"url": name, "nsamples": int(n), "filesize": (split_dir / name).stat().st_size}
                      for name, n in zip(shards, nsamples)],
    }
    if split_info is not None:
        doc["split_info"] = dataclasses.asdict(split_info)
    path = split_dir / WIDS_INDEX
    tmp = split_dir / f".{WIDS_INDEX}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _remove_stale_partials(root: Path, split: str) -> None:
    # Left behind by a prepare that was killed; they never look like a finished split.
    for p in root.glob(f".{split}.partial-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f".{split}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def write_records(
    records: Iterable[dict[str, Any]],
    root: PathLike,
    split: str,
    *,
    samples_per_shard: int = 256,
    crop: str = "none",
    overwrite: bool = False,
    stats: dict[str, Any] | None = None,
) -> SplitInfo:
    """Write already-encoded records as one split of tar shards, atomically.

    This is the writer behind :func:`write_split`; the feature cache calls it directly with records
    such as ``{"feat.npy": fp16 array, "gap.npy": array, "label.png": bytes, "json": {...}}``. Values
    that are not bytes are encoded by ``webdataset.TarWriter`` from the key's extension (``.npy``,
    ``.json``, ...).

    Shards are written into ``<root>/.<split>.partial-<pid>/`` and the folder is renamed to
    ``<root>/<split>`` only after its ``wids.json`` is written, so a killed run never leaves a split
    that looks complete. A complete split is not rewritten unless ``overwrite`` (resumable prepare).

    Args:
        records: dicts without ``__key__``; the key and ``json["index"]`` are set to the write order
            (a ``json["index"]`` given by the caller must equal it).
        root: dataset folder.
        split: split name (sub-folder).
        samples_per_shard: records per tar file.
        crop: ``"none"`` or ``"five"``, recorded in the split info.
        overwrite: rewrite a complete split instead of skipping it.
        stats: optional dict the record producer fills while being consumed; its ``class_pixels`` and
            ``ignore_pixels`` entries, if present, go into the split info.

    Returns:
        The split's :class:`SplitInfo` (the manifest is not touched: call
        :func:`dist_seg.data.manifest.update_split`).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if "/" in split or split.startswith("."):
        raise ValueError(f"invalid split name {split!r}")
    root = Path(root)
    final = root / split
    if not overwrite:
        done = split_is_complete(root, split)
        if done is not None:
            log.info("split %s/%s already written (%d samples); skipping (--overwrite rewrites it)",
                     root, split, done.num_samples)
            return done
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, split)
    tmp = root / f".{split}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        shard_names: list[str] = []
        shard_sizes: list[int] = []
        has_label: set[bool] = set()

        def on_shard_closed(fname: str) -> None:
            shard_names.append(os.path.basename(fname))
            shard_sizes.append(writer.total - sum(shard_sizes))

        # mtime=0 makes the tar bytes a function of the content only (reproducible shards).
        with wds.ShardWriter(str(tmp / SHARD_PATTERN), maxcount=samples_per_shard, maxsize=float("inf"),
                             post=on_shard_closed, verbose=0, mtime=0.0) as writer:
            for index, record in enumerate(records):
                if "__key__" in record:
                    raise ValueError("records must not carry a __key__: it is the write order")
                meta = dict(record.get("json") or {})
                if meta.setdefault("index", index) != index:
                    raise DataError(f"record {index} carries json index {meta['index']}; indices must equal "
                                    "the write order")
                meta.setdefault("crop", None)
                meta["has_label"] = "label.png" in record
                has_label.add(meta["has_label"])
                if len(has_label) > 1:
                    raise DataError(f"split '{split}': record {index} ({meta.get('source')}) "
                                    f"{'has' if meta['has_label'] else 'has no'} label.png unlike the records "
                                    "before it; a split is either fully labelled or unlabelled")
                writer.write({**record, "__key__": f"{index:09d}", "json": meta})
        total = sum(shard_sizes)
        if total == 0:
            raise DataError(f"no samples to write for split '{split}' in {root}")
        stats = stats or {}
        info = SplitInfo(
            num_samples=total,
            shards=shard_names,
            has_labels=has_label == {True},
            crop=crop,
            shard_sizes=shard_sizes,
            class_pixels=stats.get("class_pixels"),
            ignore_pixels=int(stats.get("ignore_pixels", 0)),
        )
        write_wids_index(tmp, shard_names, nsamples=shard_sizes, split_info=info)
        if final.exists():
            old = root / f".{split}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s/%s: %d samples in %d shards", root, split, info.num_samples, len(info.shards))
    return info


def write_split(
    samples: Iterable[Sample],
    root: PathLike,
    split: str,
    *,
    samples_per_shard: int = 256,
    image_format: str = "jpg",
    crop: str = "none",
    overwrite: bool = False,
) -> SplitInfo:
    """Write samples as one split of WebDataset tar shards plus its ``wids.json`` index.

    Each record: ``__key__`` = ``f"{index:09d}"``; the image under ``jpg`` (quality 95) or ``png``; the
    label under ``label.png`` (8-bit, 255 = ignore); ``json`` = ``{"index", "source", "crop",
    "has_label"}``. ``index`` is the write order, 0-based within the split.

    The write is atomic and resumable (see :func:`write_records`): a complete split is returned as is
    without consuming ``samples`` unless ``overwrite``. The manifest is not updated here; converters
    call :func:`dist_seg.data.manifest.update_split` with the returned info.

    Args:
        samples: the samples, in index order.
        root: dataset folder.
        split: split name.
        samples_per_shard: records per tar file.
        image_format: ``"jpg"`` or ``"png"`` (lossless; use it when exact pixels matter).
        crop: ``"none"`` or ``"five"`` (whether ``samples`` are five-crops), recorded in the split info.
        overwrite: rewrite a complete split.

    Returns:
        The split's :class:`SplitInfo`, including a class pixel histogram when labelled.

    Raises:
        DataError: a label whose size differs from its image, a label id above 255, an image that is
            not ``H×W×3`` uint8, or a split mixing labelled and unlabelled samples.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    stats: dict[str, Any] = {"ignore_pixels": 0}
    hist = np.zeros(T.IGNORE_INDEX + 1, dtype=np.int64)

    def records() -> Iterator[dict[str, Any]]:
        for sample in samples:
            record: dict[str, Any] = {
                image_format: encode_image(sample.image, image_format),
                "json": {"source": str(sample.source), "crop": sample.crop},
            }
            if sample.label is not None:
                if sample.label.shape != sample.image.shape[:2]:
                    raise DataError(f"label of '{sample.source}' is {sample.label.shape[1]}×{sample.label.shape[0]} "
                                    f"but its image is {sample.image.shape[1]}×{sample.image.shape[0]}")
                record["label.png"] = encode_label(sample.label)
                lab = sample.label.astype(np.int64).ravel()
                lab[lab == T.IGNORE_LABEL] = T.IGNORE_INDEX
                hist[:] += np.bincount(lab, minlength=hist.size)[: hist.size]
            yield record
        if hist.any():
            valid = hist[: T.IGNORE_INDEX]
            last = int(np.flatnonzero(valid).max()) + 1 if valid.any() else 0
            stats["class_pixels"] = [int(v) for v in valid[:last]]
            stats["ignore_pixels"] = int(hist[T.IGNORE_INDEX])

    return write_records(records(), root, split, samples_per_shard=samples_per_shard, crop=crop,
                         overwrite=overwrite, stats=stats)


# ---------------------------------------------------------------------------------- skip counting
@dataclass(frozen=True)
class DamagedRecord:
    """One record a reader could not use: which shard (file name), which key, what was wrong."""

    shard: str
    key: str
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {"shard": self.shard, "key": self.key, "problem": self.problem}


class DamagedRecordError(DataError):
    """A record that cannot be decoded; carries where it is so the skip can be named."""

    def __init__(self, shard: str, key: str, problem: str) -> None:
        super().__init__(f"record {key} of {shard}: {problem}")
        self.record = DamagedRecord(shard=shard, key=key, problem=problem)


def shard_name(url: Any) -> str:
    """The file name of a shard URL (what reports show; a dataset's shards have unique names)."""
    return os.path.basename(urlparse(str(url)).path) or str(url)


class SkipCounter:
    """Counts and names what the readers skipped, across DataLoader worker processes.

    The counts and the names live in shared memory (``multiprocessing.Value`` / ``Array``), so what
    workers record is visible to the process that owns the loader. The first ``max_name_bytes`` of names
    are kept (each damaged (shard, key) once, however many epochs meet it); beyond that only the counts
    grow. Warnings are rate-limited: the first ``warn_first`` events, then every ``warn_every``-th.

    Attributes (read-only properties):
        skipped_samples: records lost: unreadable or incomplete records, records of a shard that could
            not be read (counted against the shard's expected size), records that failed to decode.
        shard_errors: errors raised while opening or reading a tar file.
    """

    def __init__(self, *, warn_first: int = 10, warn_every: int = 100, max_name_bytes: int = 1 << 16) -> None:
        self._samples = multiprocessing.Value("q", 0)
        self._shards = multiprocessing.Value("q", 0)
        self._events = multiprocessing.Value("q", 0)
        self._names = multiprocessing.Array("c", max_name_bytes)
        self._used = multiprocessing.Value("q", 0)
        self.warn_first = warn_first
        self.warn_every = warn_every

    @property
    def skipped_samples(self) -> int:
        return int(self._samples.value)

    @property
    def shard_errors(self) -> int:
        return int(self._shards.value)

    def snapshot(self) -> dict[str, int]:
        return {"skipped_samples": self.skipped_samples, "shard_errors": self.shard_errors}

    def reset(self) -> None:
        for v in (self._samples, self._shards, self._events, self._used):
            with v.get_lock():
                v.value = 0

    def _bump(self, value, n: int) -> None:
        with value.get_lock():
            value.value += n

    def _warn(self, message: str) -> None:
        with self._events.get_lock():
            self._events.value += 1
            n = self._events.value
        if n <= self.warn_first or n % self.warn_every == 0:
            log.warning("skipping corrupt data (event %d; %s): %s", n, self.snapshot(), message)

    def name(self, record: DamagedRecord) -> None:
        """Remember a damaged record (once per (shard, key)) for :meth:`damaged`; counts are separate."""
        line = f"{record.shard}\t{record.key}\t{record.problem}".replace("\n", " ")[:300] + "\n"
        data = line.encode("utf-8", "replace")
        prefix = f"{record.shard}\t{record.key}\t".encode()
        with self._used.get_lock():
            used = self._used.value
            held = self._names.raw[:used]
            if held.startswith(prefix) or (b"\n" + prefix) in held or used + len(data) > len(self._names):
                return
            self._names[used:used + len(data)] = data
            self._used.value = used + len(data)

    def damaged(self) -> list[DamagedRecord]:
        """The damaged records named so far, in the order they were met."""
        with self._used.get_lock():
            text = self._names.raw[: self._used.value].decode("utf-8", "replace")
        return [DamagedRecord(*line.split("\t", 2)) for line in text.splitlines() if line.count("\t") >= 2]

    def report(self) -> dict[str, Any]:
        """Counts plus the named records, for a stage's JSON report."""
        named = self.damaged()
        return {**self.snapshot(), "damaged": [r.as_dict() for r in named],
                "unnamed": max(0, self.skipped_samples - len(named))}

    def shard_handler(self, exn: BaseException) -> bool:
        """webdataset handler for tar-level errors: count, warn, continue (the records it loses are named
        by the stream, which knows which keys the shard should have delivered)."""
        self._bump(self._shards, 1)
        self._warn(f"{type(exn).__name__}: {exn}")
        return True

    def sample_handler(self, exn: BaseException) -> bool:
        """webdataset handler for record-level errors (decoding): count, name, warn, continue."""
        self._bump(self._samples, 1)
        if isinstance(exn, DamagedRecordError):
            self.name(exn.record)
        self._warn(f"{type(exn).__name__}: {exn}")
        return True

    def add_samples(self, n: int, message: str, records: Sequence[DamagedRecord] = ()) -> None:
        """Count ``n`` records lost for a reason found outside a handler (e.g. missing from a shard)."""
        for record in records:
            self.name(record)
        if n > 0:
            self._bump(self._samples, n)
            self._warn(message)


def gather_damage(counter: SkipCounter | None) -> dict[str, Any]:
    """What a loader skipped, summed and named over all ranks (collective: every rank calls it).

    Returns:
        ``{"skipped_samples", "shard_errors", "damaged": [{"shard", "key", "problem"}, ...]}`` (sorted by
        shard and key; each record once).
    """
    from dist_seg import distributed as D

    mine = counter.report() if counter is not None else {"skipped_samples": 0, "shard_errors": 0, "damaged": []}
    parts = D.all_gather_object(mine)
    named = {(r["shard"], r["key"]): r for part in parts for r in part["damaged"]}
    return {"skipped_samples": sum(p["skipped_samples"] for p in parts),
            "shard_errors": sum(p["shard_errors"] for p in parts),
            "damaged": [named[key] for key in sorted(named)]}


# ----------------------------------------------------------------------------------------- decoding
def _describe_error(err: BaseException) -> str:
    # webdataset's DecodingError carries the member (``k``) and the real error as its cause, not as a message.
    member = getattr(err, "k", None)
    cause = err.__cause__ or err.__context__
    if member is not None and cause is not None:
        return f"{member} cannot be decoded ({type(cause).__name__}: {cause})"
    return f"{type(err).__name__}: {err}"


class RecordDecoder:
    """Turns a raw record (``{extension: bytes}``) into the tensors a batch row holds.

    ``decode="image"``: ``image`` uint8 ``[3, res, res]`` (minor side resized to ``res``, centre crop),
    ``label`` int64 ``[res, res]`` (-1 = ignore; all -1 without labels), ``index`` int64; with ``res=None``
    the image and label keep their stored size ``[3, H, W]`` / ``[H, W]`` (rows then differ in size).
    ``decode="full"``: like ``"image"`` but at the stored size (no resize or crop; ``res`` is ignored), for
    stages that need whole images (MaskRCNN's detection data).
    ``decode="features"``: ``feat`` float32 ``[C, h, w]``, ``gap`` float32 ``[C]``, ``label`` int64 at
    its stored size (-1 = ignore; all -1 of the feature grid's size without labels), ``index``; validation
    caches add ``feat_flip`` (features of the flipped crop) and ``image`` (the uint8 crop). With
    ``half_features`` ``feat`` and ``feat_flip`` keep the fp16 they are stored in, so half the bytes cross to
    the device, where the reader expands them. ``labels=False`` skips the label PNG (rows then carry an
    all-ignore label): KNN partners need none, and decoding it is a third of a small record's cost.
    ``decode="encoded"`` (``data.decode_device=cuda``): like ``"image"``, but a JPEG record's image is
    not decoded: ``jpeg`` holds its bytes as a uint8 tensor (batches keep a list), to be decoded and
    resized on the GPU by :func:`dist_seg.data.transforms.decode_jpeg_batch`. Only the JPEG header is read
    here (size check against the label). PNG records are decoded as with ``"image"``.

    With ``num_classes`` (the dataset's class count), a label holding an id outside ``[0, num_classes)``
    that is not the ignore value 255 makes the record damaged (:func:`check_label_ids`): it is skipped,
    counted and named like an unreadable one (docs/decisions.md, "Labels out of range").
    """

    def __init__(self, *, decode: str = "image", res: int | None = None, half_features: bool = False,
                 labels: bool = True, num_classes: int | None = None) -> None:
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if decode == "image" and res is not None and res < 1:
            raise ValueError("decode='image' needs a positive res (or None for the full image)")
        self.mode = decode
        self.res = res
        self.feat_dtype = np.float16 if half_features else np.float32
        self.labels = labels
        self.num_classes = num_classes
        self._decoder = wds.Decoder(
            [wds.handle_extension("label.png", decode_label_png), wds.imagehandler("rgb8")],
            only=["jpg", "png", "label.png", "feat.npy", "gap.npy", "feat_flip.npy"],
            partial=True,
        )

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._decode(raw)
        except DamagedRecordError:
            raise
        except Exception as err:  # noqa: BLE001 - PIL/numpy/json fail on garbage with many error types
            raise DamagedRecordError(shard_name(raw.get("__url__", "?")), str(raw.get("__key__")),
                                     _describe_error(err)) from err

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        meta = raw.get("__meta__")
        if meta is None:
            meta = _parse_meta(raw)
        if not self.labels:
            raw = {k: v for k, v in raw.items() if k != "label.png"}
        if self.mode == "encoded" and "jpg" in raw:
            return self._encoded(raw, meta)
        sample = self._decoder(raw)
        label = sample.get("label.png")
        if label is not None and self.num_classes is not None:
            check_label_ids(label, self.num_classes)
        out: dict[str, Any] = {"index": torch.tensor(int(meta["index"]), dtype=torch.int64)}
        if self.mode in ("image", "full", "encoded"):
            image = sample.get("jpg", sample.get("png"))
            if image is None:
                raise DataError(f"record {raw.get('__key__')} has no jpg/png image")
            if label is not None and label.shape != image.shape[:2]:
                raise DataError(f"record {raw.get('__key__')}: label {label.shape} != image {image.shape[:2]}")
            # PIL-backed arrays are read-only; torch wants writable memory.
            image = np.require(image, dtype=np.uint8, requirements=["C", "W"])
            if self.res is None or self.mode == "full":
                # The stored image as it is (offline stages: MaskDistill's mining, Mask R-CNN's detection data).
                out["image"] = torch.from_numpy(image).permute(2, 0, 1)
                out["label"] = T.label_to_tensor(label, image.shape[:2])
                return out
            out["image"] = T.resize_center_crop_tensor(torch.from_numpy(image).permute(2, 0, 1), self.res)
            if label is None:
                out["label"] = T.label_to_tensor(None, (self.res, self.res))
            else:
                out["label"] = T.label_to_tensor(T.resize_center_crop_label(label, self.res), (self.res, self.res))
        else:
            feat = sample.get("feat.npy")
            if feat is None:
                raise DataError(f"record {raw.get('__key__')} has no feat.npy (is this a feature shard?)")
            out["feat"] = torch.from_numpy(np.array(feat, dtype=self.feat_dtype))
            gap = sample.get("gap.npy")
            if gap is None:
                raise DataError(f"record {raw.get('__key__')} has no gap.npy")
            out["gap"] = torch.from_numpy(np.array(gap, dtype=np.float32))
            shape = tuple(meta.get("label_shape") or out["feat"].shape[-2:])
            out["label"] = T.label_to_tensor(label, shape)
            # Validation caches also hold the flipped view's features and the crop itself (CRF, overlays).
            flipped = sample.get("feat_flip.npy")
            if flipped is not None:
                out["feat_flip"] = torch.from_numpy(np.array(flipped, dtype=self.feat_dtype))
            image = sample.get("png", sample.get("jpg"))
            if image is not None:
                image = np.require(image, dtype=np.uint8, requirements=["C", "W"])
                out["image"] = torch.from_numpy(image).permute(2, 0, 1)
        return out


    def _encoded(self, raw: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        data = bytes(raw["jpg"])
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.format != "JPEG":
                raise DataError(f"jpg member is a {img.format} image, not JPEG")
            width, height = img.size
        label = decode_label_png(raw["label.png"]) if "label.png" in raw else None
        if label is not None and self.num_classes is not None:
            check_label_ids(label, self.num_classes)
        if label is not None and label.shape != (height, width):
            raise DataError(f"label {label.shape} != image {(height, width)}")
        res = self.res
        out: dict[str, Any] = {"index": torch.tensor(int(meta["index"]), dtype=torch.int64),
                               "jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
        if res is None:
            out["label"] = T.label_to_tensor(label, (height, width))
        elif label is None:
            out["label"] = T.label_to_tensor(None, (res, res))
        else:
            out["label"] = T.label_to_tensor(T.resize_center_crop_label(label, res), (res, res))
        return out


def check_label_ids(label: np.ndarray, num_classes: int) -> None:
    """Raise :class:`DataError` naming the ids of ``label`` (a stored 8-bit label map) outside
    ``[0, num_classes)`` that are not the ignore value 255, and how many pixels hold them."""
    bad = (label >= num_classes) & (label != T.IGNORE_INDEX)
    if not bad.any():
        return
    ids = np.unique(label[bad])
    shown = ", ".join(str(int(i)) for i in ids[:8]) + (", ..." if len(ids) > 8 else "")
    raise DataError(f"label ids {shown} outside 0..{num_classes - 1} and not {T.IGNORE_INDEX} (ignore) in "
                    f"{int(bad.sum())} pixels: the label map does not belong to this {num_classes}-class dataset "
                    "(re-write it, or prepare the dataset again)")


def _parse_meta(raw: dict[str, Any]) -> dict[str, Any]:
    data = raw.get("json")
    if data is None:
        raise DataError(f"record {raw.get('__key__')} has no json metadata")
    meta = json.loads(data) if isinstance(data, (bytes, str)) else data
    if not isinstance(meta, dict) or "index" not in meta:
        raise DataError(f"record {raw.get('__key__')}: json metadata without an index")
    return meta


def _collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = default_collate([{k: v for k, v in row.items() if not k.startswith("__") and k not in RAGGED_KEYS}
                             for row in rows])
    for key in RAGGED_KEYS:
        if rows and key in rows[0]:
            batch[key] = [row[key] for row in rows]
    return batch


# ------------------------------------------------------------------------------------ shard sources
@dataclass(kw_only=True)
class ShardSet:
    """Resolved shard URLs of one split.

    Attributes:
        urls: shard URLs / paths in index order.
        nsamples: records per shard, or None when unknown (plain URL lists).
        has_labels: whether the split is labelled, or None when unknown.
        index_path: the split's ``wids.json``, when there is one.
    """

    urls: list[str]
    nsamples: list[int] | None
    has_labels: bool | None
    index_path: str | None = None

    @property
    def num_samples(self) -> int | None:
        return None if self.nsamples is None else int(sum(self.nsamples))


def _shards_from_index(index_path: Path, has_labels: bool | None) -> ShardSet:
    index = _read_index(index_path)
    base = index_path.parent.resolve()
    urls, counts = [], []
    for shard in index["shardlist"]:
        url = shard["url"]
        if not urlparse(url).scheme and not os.path.isabs(url):
            url = str(base / url)
        urls.append(url)
        counts.append(int(shard["nsamples"]))
    if has_labels is None and "split_info" in index:
        has_labels = bool(index["split_info"].get("has_labels"))
    return ShardSet(urls=urls, nsamples=counts, has_labels=has_labels, index_path=str(index_path))


def resolve_shards(root: PathLike | Sequence[str], split: str) -> ShardSet:
    """Find the shards of ``split``.

    Args:
        root: a dataset folder with ``manifest.json`` (the main case); a ``wids.json`` index file; a
            list of shard URLs; or one URL string with brace expansion (``/d/shard-{000000..000009}.tar``,
            ``pipe:curl -s https://host/shard-{0..9}.tar``). ``split`` is only used for folders.
        split: split name.

    Returns:
        A :class:`ShardSet`.
    """
    if isinstance(root, (list, tuple)):
        urls = [u for spec in root for u in braceexpand.braceexpand(str(spec))]
        return ShardSet(urls=urls, nsamples=None, has_labels=None)
    text = os.fspath(root)
    path = Path(text)
    if path.is_dir():
        index_path = path / split / WIDS_INDEX
        if (path / MANIFEST_NAME).is_file():
            info = read_manifest(path).split(split)
            if not index_path.is_file():
                raise DataError(f"{index_path} is missing although the manifest lists split '{split}'; "
                                "re-run `dist-seg prepare` for this dataset")
            return _shards_from_index(index_path, info.has_labels)
        if index_path.is_file():
            return _shards_from_index(index_path, None)
        read_manifest(path)  # raises with the `dist-seg prepare` hint
    if text.endswith(".json") and path.is_file():
        return _shards_from_index(path, None)
    urls = list(braceexpand.braceexpand(text))
    local = [u for u in urls if not urlparse(u).scheme and not u.startswith("pipe:")]
    if local and len(local) == len(urls) and not any(os.path.exists(u) for u in local):
        raise DataError(f"{text} is neither a prepared dataset folder nor existing shards; "
                        f"prepare a dataset with `dist-seg prepare toy --out DIR` (or `dist-seg prepare folder`)")
    return ShardSet(urls=urls, nsamples=None, has_labels=None)


def shard_first_indices(shards: ShardSet) -> dict[str, int] | None:
    """Global index of each shard's first record (records are keyed by global index), or None."""
    if shards.nsamples is None:
        return None
    starts = np.concatenate([[0], np.cumsum(shards.nsamples)[:-1]]).tolist()
    return dict(zip(shards.urls, (int(x) for x in starts)))


def locate_record(shards: ShardSet, index: int) -> DamagedRecord:
    """Where global record ``index`` of a prepared split lives: ``DamagedRecord(shard, key, "")``."""
    first = shard_first_indices(shards)
    if first is None:
        return DamagedRecord("?", f"{index:09d}", "")
    starts = sorted((start, url) for url, start in first.items())
    url = starts[bisect.bisect_right([start for start, _ in starts], index) - 1][1]
    return DamagedRecord(shard_name(url), f"{index:09d}", "")


def missing_records(shards: ShardSet, urls: Sequence[str], delivered: dict[str, set],
                    incomplete: Sequence[DamagedRecord] = ()) -> tuple[int, list[DamagedRecord]]:
    """What a pass over ``urls`` lost: ``(count, named records)``.

    A shard of a prepared split holds the keys ``first .. first+n-1`` (``f"{index:09d}"``); every key not
    in ``delivered[url]`` is lost. Without sample counts (plain URL lists) only ``incomplete`` is known.
    """
    first = shard_first_indices(shards)
    if first is None:
        return len(incomplete), list(incomplete)
    problems = {(r.shard, r.key): r.problem for r in incomplete}
    named: list[DamagedRecord] = []
    expected = dict(zip(shards.urls, shards.nsamples))
    for url in dict.fromkeys(urls):
        got = delivered.get(url, set())
        name = shard_name(url)
        for index in range(first[url], first[url] + expected[url]):
            key = f"{index:09d}"
            if key not in got:
                named.append(DamagedRecord(name, key, problems.get(
                    (name, key), "missing: the shard ends early or cannot be read")))
    return len(named), named


def _derive_seed(*keys: Any) -> int:
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _epoch_shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        random.Random(_derive_seed(seed, "shards", epoch)).shuffle(order)
    return order


def _worker_shards(order: Sequence[int], *, rank: int, world: int, logical_worker: int,
                   num_workers: int) -> list[int]:
    # Same slicing as wds.split_by_node followed by wds.split_by_worker; used to plan batch counts.
    return list(order)[rank::world][logical_worker::num_workers]


def _resume_plan(batches_per_worker: Sequence[float], start_batch: int) -> tuple[int, list[int]]:
    """Where worker streams stand after ``start_batch`` batches of a fresh loader.

    ``DataLoader`` over an ``IterableDataset`` with ``W`` workers hands out batches round-robin
    (batch ``j`` from worker ``j % W``) and drops a worker from the cycle once it is exhausted. This
    replays that cycle and returns ``(rotation, skipped batches per worker)``: the resumed loader's
    worker ``i`` plays logical worker ``(i + rotation) % W`` so that its first batch is batch
    ``start_batch`` of the fresh stream.
    """
    num_workers = len(batches_per_worker)
    remaining = list(batches_per_worker)
    skipped = [0] * num_workers
    if all(math.isinf(r) for r in remaining):
        skipped = [len(range(w, start_batch, num_workers)) for w in range(num_workers)]
        return start_batch % num_workers, skipped
    if start_batch > sum(remaining):
        raise ValueError(f"start_batch={start_batch} is past the end of the pass ({int(sum(remaining))} batches)")
    pointer = 0
    left = start_batch
    while left > 0:
        active = [w for w in range(num_workers) if remaining[w] > 0]
        rounds = min(left // len(active), min(remaining[w] for w in active))
        if rounds > 0 and pointer == 0:
            for w in active:
                remaining[w] -= rounds
                skipped[w] += rounds
            left -= rounds * len(active)
            continue
        while remaining[pointer] <= 0:
            pointer = (pointer + 1) % num_workers
        remaining[pointer] -= 1
        skipped[pointer] += 1
        left -= 1
        pointer = (pointer + 1) % num_workers
    return pointer, skipped


class ShardSampleStream(torch.utils.data.IterableDataset):
    """Source stage of the streaming pipeline: raw records of this rank's and this worker's shards.

    Every epoch the shard list is permuted from ``(seed, epoch)`` (same permutation on every rank),
    split by node with ``nodesplitter`` (``wds.split_by_node``; None: no split) and by worker, read with
    ``wds.tarfile_to_samples`` and shuffled through a buffer seeded from ``(seed, epoch, rank,
    worker)``. Records are checked for completeness (metadata, image or features, label when the
    metadata promises one) before the shuffle; records a shard should have held but did not deliver
    are counted as skipped at the end of the worker's epoch. ``skip`` raw records are dropped after the
    shuffle and before any decoding (resume).

    Attributes:
        epoch: the first epoch of the next iteration (``set_epoch``).
        skip_counter: the shared :class:`SkipCounter`.
    """

    def __init__(self, shards: ShardSet, *, seed: int, shuffle: bool, infinite: bool, shuffle_buffer: int,
                 rank: int, world_size: int, num_workers: int, rotation: int, skip_samples: Sequence[int],
                 decode: str, skip_counter: SkipCounter, epoch: int = 0,
                 nodesplitter: Callable | None = wds.split_by_node) -> None:
        super().__init__()
        self.shards = shards
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.rotation = rotation
        self.skip_samples = list(skip_samples)
        self.decode = decode
        self.skip_counter = skip_counter
        self.epoch = epoch
        self.nodesplitter = nodesplitter

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _complete(self, raw: dict[str, Any]) -> bool:
        try:
            meta = _parse_meta(raw)
        except ValueError:  # DataError, bad JSON, bad UTF-8
            return False
        raw["__meta__"] = meta
        if self.decode in ("image", "full", "encoded"):
            body = "jpg" in raw or "png" in raw
        else:
            body = "feat.npy" in raw and "gap.npy" in raw
        needs_label = bool(meta.get("has_label")) or bool(self.shards.has_labels)
        return body and (not needs_label or "label.png" in raw)

    def _checked(self, raw: Iterator[dict], urls: list[str], epoch: int) -> Iterator[dict]:
        delivered: dict[str, set] = {u: set() for u in urls}
        incomplete: list[DamagedRecord] = []
        for sample in raw:
            if self._complete(sample):
                delivered.setdefault(sample["__url__"], set()).add(sample["__key__"])
                yield sample
            else:
                meta = sample.get("__meta__") or {}
                problem = (f"damaged in the source shards ({meta['damaged']})" if meta.get("damaged")
                           else "incomplete record (metadata, image/features or label missing)")
                incomplete.append(DamagedRecord(shard_name(sample.get("__url__")), str(sample.get("__key__")),
                                                problem))
                self.skip_counter._warn(f"incomplete record {sample.get('__key__')} in {sample.get('__url__')}")
        lost, named = missing_records(self.shards, urls, delivered, incomplete)
        if lost:
            self.skip_counter.add_samples(lost, f"{lost} records missing or incomplete in epoch {epoch} "
                                                f"(rank {self.rank}, shards {sorted(set(urls))[:4]}...)", named)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.nodesplitter is None:
            rank, world = 0, 1
        if (rank, world) != (self.rank, self.world_size) or max(1, num_workers) != self.num_workers:
            raise RuntimeError(
                f"data worker sees rank {rank}/{world} with {num_workers} workers but the loader was built for "
                f"rank {self.rank}/{self.world_size} with {self.num_workers}; build the loader after the "
                "process group is initialised"
            )
        logical = (worker + self.rotation) % self.num_workers
        skip = self.skip_samples[logical]
        epoch = self.epoch
        while True:
            order = _epoch_shard_order(len(self.shards.urls), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
            node_order = order if self.nodesplitter is None else list(self.nodesplitter(iter(order)))
            mine = node_order[logical :: self.num_workers]
            urls = [self.shards.urls[i] for i in mine]
            if self.shards.nsamples is not None and skip > 0:
                epoch_size = sum(self.shards.nsamples[i] for i in mine)
                if 0 < epoch_size <= skip:
                    # Resuming past a whole epoch: nothing of it is needed, so do not even open it.
                    skip -= epoch_size
                    if not self.infinite:
                        return
                    epoch += 1
                    continue
            before = self.skip_counter.snapshot()
            stream = wds.tarfile_to_samples(handler=self.skip_counter.shard_handler)(iter([{"url": u} for u in urls]))
            stream = self._checked(stream, urls, epoch)
            if self.shuffle and self.shuffle_buffer > 1:
                rng = random.Random(_derive_seed(self.seed, "samples", epoch, self.rank, logical))
                stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
            read = 0
            for sample in stream:
                read += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield sample
            if not self.infinite:
                return  # the loader reports the pass once all workers are done
            after = self.skip_counter.snapshot()
            if read == 0 and urls and after != before:
                # Every record of this stream's shards is damaged: an endless stream would wait forever.
                names = sorted({shard_name(u) for u in urls})
                raise DataError(f"no readable record in {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} "
                                f"(rank {self.rank}, epoch {epoch}); `dist-seg check-data` lists the damage, "
                                "`dist-seg prepare ... --overwrite` rewrites the data")
            if after != before:
                log.warning("epoch %d finished on rank %d worker %d; skipped so far: %s", epoch, self.rank, logical,
                            after)
            epoch += 1


def _worker_init(rank: int, world_size: int, parent: int, worker_id: int) -> None:
    # Signals and lifetime first (dist_seg.runtime.loader_worker_init): a worker outlives the SIGTERM sent to
    # its rank's process group, so the rank can reach its stop checkpoint, and dies with its rank.
    loader_worker_init(parent)
    # webdataset's split_by_node reads RANK/WORLD_SIZE first; spawned (not forked) workers do not inherit
    # an initialised process group, so make the rank visible to them explicitly.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))


def describe_damage(records: Sequence[DamagedRecord], limit: int = 20) -> str:
    """One line naming damaged records (``shard/key (problem)``), the first ``limit`` of them."""
    if not records:
        return "no damaged record named"
    shown = "; ".join(f"{r.shard}/{r.key} ({r.problem})" for r in records[:limit])
    more = f"; ... and {len(records) - limit} more" if len(records) > limit else ""
    return f"{shown}{more}"


def _report_pass(counter: SkipCounter, what: str) -> Callable[[Iterator], Iterator]:
    def stage(batches: Iterator) -> Iterator:
        before = counter.snapshot()
        count = 0
        for batch in batches:
            count += 1
            yield batch
        after = counter.snapshot()
        delta = {k: after[k] - before[k] for k in after}
        if any(delta.values()):
            log.warning("%s: pass finished after %d batches; skipped %d records, %d shard errors "
                        "(totals %s): %s", what, count, delta["skipped_samples"], delta["shard_errors"], after,
                        describe_damage(counter.damaged()))
        else:
            log.info("%s: pass finished after %d batches, nothing skipped", what, count)

    return stage


def make_loader(
    root: PathLike | Sequence[str],
    split: str,
    *,
    batch_size: int,
    res: int | None,
    num_workers: int = 2,
    seed: int = 0,
    shuffle: bool,
    infinite: bool,
    start_batch: int = 0,
    shuffle_buffer: int = 1000,
    decode: str = "image",
    drop_last: bool | None = None,
    epoch: int = 0,
    multiprocessing_context: str | None = None,
    nodesplitter: Callable | None = wds.split_by_node,
    pin_memory: bool = False,
    half_features: bool = False,
    batch_stage: Callable[[Iterator[dict]], Iterator[dict]] | None = None,
    num_classes: int | None | str = None,
) -> tuple[wds.WebLoader, int | None]:
    """Stream a split as batches with ``webdataset``.

    Shards are split between ranks with ``wds.split_by_node`` and between DataLoader workers, so every
    record of a pass is read by exactly one (rank, worker). Do not hand the loader to
    ``accelerator.prepare``: move batches to the device yourself.

    Args:
        root: a prepared dataset folder, a ``wids.json``, a list of shard URLs or a brace-expanded URL
            (see :func:`resolve_shards`).
        split: split name (for folders).
        batch_size: rows per batch on this rank.
        res: output side for ``decode="image"`` (ignored for features).
        num_workers: DataLoader worker processes (0 = read in this process). Reduced, with a warning,
            when the split has fewer shards than ranks × workers.
        seed: shuffling seed; shard order and shuffle buffers derive from ``(seed, epoch)``.
        shuffle: permute shards every epoch and shuffle records through a buffer; otherwise each worker
            reads its shards in index order.
        infinite: loop epochs ``epoch, epoch+1, ...`` forever (training: the trainer counts steps, so
            ranks never wait for each other at an epoch end); otherwise one pass over the split.
        start_batch: begin with the batch that would have been batch ``start_batch`` of a fresh loader
            with the same arguments (resume). Records are skipped before decoding, whole epochs without
            being read.
        shuffle_buffer: records held by each worker's shuffle buffer.
        decode: ``"image"`` or ``"features"`` (see :class:`RecordDecoder`).
        drop_last: drop each worker's last partial batch of a pass (default False; infinite streams
            never produce partial batches).
        epoch: the (first) epoch to read; a finite loader reads this epoch's order. ``loader.set_epoch``
            changes it for the next iteration.
        multiprocessing_context: start method of the workers (``"fork"``, ``"spawn"``, ...); default:
            the process's default. Processes started with ``spawn`` would otherwise re-import
            everything in every worker of every pass.
        nodesplitter: how shards are divided between ranks: ``wds.split_by_node`` (rank ``r`` of ``W``
            reads shards ``r, r+W, ...`` of each epoch's order; batch counts and resume assume this), or
            None to let every rank read all the given shards (e.g. a rank working through its own list).
        pin_memory: hand batches over in page-locked memory (set it when they go to a GPU: only then is a
            ``non_blocking`` copy asynchronous).
        half_features: keep cached features in their stored fp16 (see :class:`RecordDecoder`).
        batch_stage: a further stage applied to the batches inside the worker that made them (e.g.
            :class:`dist_seg.data.partners.PartnerReader`).
        num_classes: records whose label holds an id outside ``[0, num_classes)`` other than 255 are skipped,
            counted and named as damaged; ``"manifest"`` reads the class count from the dataset folder's
            manifest (no check for URL lists or unlabelled data); None (default) checks nothing (stages that
            do not use labels: KNN descriptors, feature extraction).

    Returns:
        ``(loader, num_batches)``: batches are dicts of ``image`` uint8 ``[B, 3, res, res]``, ``label``
        int64 ``[B, res, res]`` (-1 = ignore) and ``index`` int64 ``[B]`` (features: ``feat``, ``gap``,
        ``label``, ``index``). ``num_batches`` is the number of batches this rank yields in one pass
        (after ``start_batch``), or None for infinite loaders and for URL lists without sample counts.
        The loader also carries ``skip_counter``, ``num_samples`` (records in the split, or None),
        ``num_workers`` (after any reduction), ``dataset`` (the source stage) and ``set_epoch``.

    Raises:
        DataError: missing dataset, or an infinite (training) stream with fewer shards than ranks. A finite
            pass (validation) over fewer shards than ranks is read anyway: ranks without a shard yield nothing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    drop_last = bool(drop_last) if drop_last is not None else False
    shards = resolve_shards(root, split)
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    if nodesplitter is None:
        rank, world_size = 0, 1  # every rank reads every given shard, as a single process would
    num_shards = len(shards.urls)
    if num_shards < world_size and infinite:
        raise DataError(f"split '{split}' has {num_shards} shards but there are {world_size} ranks; every rank needs "
                        "at least one shard of a training split: re-run `dist-seg prepare` with a smaller "
                        "--samples-per-shard")
    if num_shards < world_size:
        # A finite pass (validation) is summed over ranks: a rank without a shard simply contributes nothing.
        log.info("split '%s' has %d shards for %d ranks: rank %d reads %s", split, num_shards, world_size, rank,
                 "one" if rank < num_shards else "none (it contributes nothing to this pass)")
    if num_workers > 0 and num_shards < world_size * num_workers:
        reduced = max(num_shards // world_size, int(rank < num_shards))
        log.warning("split '%s' has %d shards, fewer than %d ranks x %d workers; using %d workers on rank %d "
                    "(write more, smaller shards with --samples-per-shard to use more)",
                    split, num_shards, world_size, num_workers, reduced, rank)
        num_workers = reduced
    streams = max(1, num_workers)
    assert num_shards >= world_size * streams or not infinite, (
        f"{num_shards} shards cannot feed {world_size} ranks x {streams} workers")

    per_worker_samples: list[int] | None = None
    if shards.nsamples is not None:
        order = _epoch_shard_order(num_shards, seed=seed, epoch=epoch, shuffle=shuffle)
        per_worker_samples = [
            sum(shards.nsamples[i] for i in _worker_shards(order, rank=rank, world=world_size, logical_worker=w,
                                                           num_workers=streams))
            for w in range(streams)
        ]

    if infinite:
        rotation, skipped = _resume_plan([math.inf] * streams, start_batch)
        num_batches = None
    else:
        if per_worker_samples is None:
            if start_batch:
                raise DataError("start_batch with infinite=False needs per-shard sample counts; read a prepared "
                                "dataset folder (or its wids.json) instead of a URL list")
            rotation, skipped, num_batches = 0, [0] * streams, None
        else:
            per_worker_batches = [n // batch_size if drop_last else -(-n // batch_size) for n in per_worker_samples]
            rotation, skipped = _resume_plan(per_worker_batches, start_batch)
            num_batches = sum(per_worker_batches) - start_batch

    source = ShardSampleStream(
        shards, seed=seed, shuffle=shuffle, infinite=infinite, shuffle_buffer=shuffle_buffer, rank=rank,
        world_size=world_size, num_workers=streams, rotation=rotation,
        skip_samples=[s * batch_size for s in skipped], decode=decode, skip_counter=SkipCounter(), epoch=epoch,
        nodesplitter=nodesplitter,
    )
    counter = source.skip_counter
    stages = [
        source,
        _DecodeStage(RecordDecoder(decode=decode, res=res, half_features=half_features,
                                   num_classes=_manifest_classes(root) if num_classes == "manifest" else num_classes),
                     counter.sample_handler,
                     # An endless stream that can decode nothing would spin forever: stop after a whole split's
                     # worth of records in a row was skipped.
                     limit=(shards.num_samples or 10_000) if infinite else None, split=split),
        wds.batched(batch_size, collation_fn=_collate, partial=not drop_last),
    ]
    if batch_stage is not None:
        stages.append(batch_stage)
    if num_workers > 0:
        reap_loader_workers_at_exit()  # the workers ignore SIGTERM: multiprocessing's exit hook cannot end them
    loader = wds.WebLoader(
        wds.DataPipeline(*stages),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_worker_init, rank, world_size, os.getpid()) if num_workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )
    if not infinite:
        loader = loader.compose(_report_pass(counter, f"{split} rank {rank}"))
    loader.skip_counter = counter
    loader.num_samples = shards.num_samples
    loader.num_workers = num_workers
    loader.dataset = source
    loader.set_epoch = source.set_epoch
    return loader, num_batches


class _DecodeStage:
    """``wds.map(decoder, handler=handler)`` that raises :class:`DataError` once ``limit`` records in a row were
    skipped (None: never), so a training stream over a split where nothing decodes stops instead of spinning.
    A class, not a closure: loaders started with ``spawn`` pickle their stages."""

    def __init__(self, decoder: RecordDecoder, handler: Callable[[BaseException], bool], *, limit: int | None,
                 split: str) -> None:
        self.decoder, self.handler, self.limit, self.split = decoder, handler, limit, split

    def __call__(self, records: Iterator[dict]) -> Iterator[dict]:
        failed = 0
        for raw in records:
            try:
                out = self.decoder(raw)
            except Exception as exn:  # noqa: BLE001 - the handler decides, as in wds.map
                if not self.handler(exn):
                    break
                failed += 1
                if self.limit is not None and failed >= self.limit:
                    raise DataError(f"{failed} records of split '{self.split}' in a row could not be used (the "
                                    f"last: {exn}); run `dist-seg check-data` on the dataset to list them") from None
                continue
            failed = 0
            yield out


def _manifest_classes(root: PathLike | Sequence[str]) -> int | None:
    """The class count in the manifest of dataset folder ``root`` (None: no folder, manifest or classes)."""
    if not isinstance(root, (str, os.PathLike)) or not Path(root).is_dir():
        return None
    try:
        return read_manifest(root).num_classes
    except DataError:
        return None


# ------------------------------------------------------------------------------------ random access
def _wids_cache_dir() -> Path:
    return Path(os.environ.get("WIDS_CACHE") or Path(tempfile.gettempdir()) / "dist_seg_wids")


def _local_shard_name(url: str) -> str:
    """wids ``localname``: where wids finds (or downloads) the shard for ``url``.

    wids opens ``localname(url)`` and puts a lock file beside it. For local shards we return a symlink
    in a cache folder pointing at the shard: the data is read in place (no copy) and nothing is written
    into the dataset folder, which may be read-only. Remote shards are downloaded into the cache folder.
    """
    parsed = urlparse(url)
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    cache = _wids_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    name = f"{key}-{os.path.basename(parsed.path) or 'shard.tar'}"
    if parsed.scheme not in ("", "file") or url.startswith("pipe:"):
        return str(cache / name)
    target = os.path.abspath(parsed.path)
    link = cache / name
    if not (link.is_symlink() and os.readlink(link) == target):
        tmp = cache / f".{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic, so concurrent readers never see a missing link
    return str(link)


class IndexedShards:
    """Random access to a split's records by global index, with ``wids`` over the split's own shards.

    Local shards are memory-mapped where they are, through symlinks in a cache folder (``$WIDS_CACHE``,
    default ``<tmp>/dist_seg_wids``); nothing is copied and nothing is written into the dataset folder.

    Args:
        root: prepared dataset folder, or the path of a split's ``wids.json``.
        split: split name.
        res: output side for ``decode="image"`` (None: the stored image at its own size).
        decode: ``"image"``, ``"full"`` (stored size) or ``"features"``; rows look like :func:`make_loader`'s rows.
        lru_size: shards kept open at once.
        half_features, labels: as for :class:`RecordDecoder`.
    """

    def __init__(self, root: PathLike, split: str, *, res: int | None = None, decode: str = "image",
                 lru_size: int = 64, half_features: bool = False, labels: bool = True) -> None:
        try:
            import wids
        except ImportError:
            raise ImportError("random access to shards needs the `wids` package (webdataset's indexed reader): "
                              "pip install wids") from None

        path = Path(root)
        if path.is_dir():
            if (path / MANIFEST_NAME).is_file():
                read_manifest(path).split(split)
            index_path = path / split / WIDS_INDEX
            if not index_path.is_file():
                read_manifest(path)
                raise DataError(f"{index_path} is missing; re-run `dist-seg prepare` for this dataset")
        else:
            index_path = path
        self.index_path = index_path.resolve()
        self.decoder = RecordDecoder(decode=decode, res=res, half_features=half_features, labels=labels)
        self._ds = wids.ShardListDataset(str(self.index_path), localname=_local_shard_name,
                                         transformations=[self._transform], lru_size=lru_size)

    def _transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        raw: dict[str, Any] = {"__key__": sample["__key__"]}
        for key, value in sample.items():
            if key.startswith("."):
                raw[key[1:]] = value.getvalue() if hasattr(value, "getvalue") else bytes(value)
        meta = _parse_meta(raw)
        if int(meta["index"]) != int(sample["__index__"]):
            raise DataError(f"record {sample['__key__']} in {sample['__shard__']} has index {meta['index']} but "
                            f"sits at position {sample['__index__']}; the wids.json does not match the shards")
        raw["__meta__"] = meta
        return self.decoder(raw)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return self._ds[index]

    def get_batch(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows for ``indices`` stacked like a :func:`make_loader` batch."""
        if isinstance(indices, torch.Tensor):
            indices = indices.reshape(-1).tolist()
        return _collate([self[i] for i in indices])

    def close(self) -> None:
        self._ds.close()
