"""What ``dist-seg predict`` reads: a folder (recursive), a list file, or a prepared dataset's shards.

Every input becomes a list of :class:`Item` (an output key and where to read it) and a map-style
:class:`ImageDataset` that decodes one item in a DataLoader worker. Sizes are read from image headers when
the list is made, so images can be grouped by size before anything is decoded. Images above the pixel
limit (PIL's decompression-bomb guard by default) are refused with a one-line reason naming
``--max-pixels``, never a PIL warning followed by an out-of-memory crash.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb guard


class InputError(ValueError):
    """The inputs cannot be read as given (the message names the fix)."""


@dataclass(frozen=True)
class Item:
    """One image to segment.

    Attributes:
        key: output name without suffix (``sub/a`` for ``sub/a.jpg``; the 9-digit sample key for shards).
        path: the image file, or None for a shard record.
        index: the shard record's global index (shards only).
        size: ``(H, W)`` from the header, or None when the header could not be read (decoding reports why).
    """

    key: str
    path: Optional[str] = None
    index: Optional[int] = None
    size: Optional[tuple[int, int]] = None


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _header_size(source) -> Optional[tuple[int, int]]:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the limit is ours to check (with the option named), not PIL's warning
    try:
        with Image.open(source) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _unique(items: list[Item], what: str) -> list[Item]:
    seen: dict[str, Item] = {}
    for item in items:
        if item.key in seen:
            raise InputError(f"{seen[item.key].path} and {item.path} in {what} would both be written as "
                             f"{item.key}.png; rename one of them")
        seen[item.key] = item
    return items


def folder_items(folder: str | Path) -> list[Item]:
    """Items of every image under ``folder``; keys are paths relative to it without the suffix."""
    root = Path(folder)
    items = [Item(key=p.relative_to(root).with_suffix("").as_posix(), path=str(p), size=_header_size(p))
             for p in list_images(root)]
    return _unique(items, str(root))


def list_file_items(list_file: str | Path) -> list[Item]:
    """Items of the image paths in ``list_file`` (one a line; relative paths are relative to the file's
    folder; blank lines and ``#`` comments ignored). Keys are the paths as written, without the suffix."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    items = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line) if Path(line).is_absolute() else list_file.parent / line
        key = Path(line).with_suffix("").as_posix().lstrip("/")
        if ".." in Path(key).parts:
            raise InputError(f"{list_file}: {line!r} climbs out of the output folder; list it by absolute path")
        items.append(Item(key=key, path=str(path), size=_header_size(path) if path.is_file() else None))
    return _unique(items, str(list_file))


def _split_index(spec: str) -> tuple[Path, str, Path]:
    root, _, split = str(spec).rstrip("/").rpartition("/")
    if not root or not split:
        raise InputError(f"--shards takes DIR/SPLIT (a prepared dataset and a split, e.g. data/toy/val), got {spec!r}")
    index = Path(root) / split / "wids.json"
    if not index.is_file():
        raise InputError(f"{index} not found: --shards takes DIR/SPLIT of a dataset written by `dist-seg prepare`")
    return Path(root), split, index


def shard_items(spec: str) -> list[Item]:
    """Items of every record of a prepared split ``DIR/SPLIT``; keys are the records' 9-digit sample keys."""
    import wids

    from dist_seg.data.shards import _local_shard_name

    _, _, index = _split_index(spec)
    raw = wids.ShardListDataset(str(index.resolve()), localname=_local_shard_name, transformations=[])
    items = []
    try:
        for i in range(len(raw)):
            sample = raw[i]
            data = sample.get(".jpg", sample.get(".png"))
            size = _header_size(io.BytesIO(data.getvalue())) if data is not None else None
            items.append(Item(key=f"{i:09d}", index=i, size=size))
    finally:
        raw.close()
    return items


def shard_labels(spec: str) -> tuple[Optional[int], list[str] | None, list | None]:
    """``(num_classes, class_names, colors)`` of a labelled split, ``num_classes`` None when it has no labels."""
    from dist_seg.data.manifest import read_manifest

    root, split, _ = _split_index(spec)
    try:
        manifest = read_manifest(root)
        info = manifest.split(split)
    except Exception:  # noqa: BLE001 - a split without a manifest is still readable, just not scored
        return None, None, None
    if not info.has_labels or not manifest.num_classes:
        return None, None, None
    return manifest.num_classes, manifest.class_names, manifest.colors


class ImageDataset(torch.utils.data.Dataset):
    """Decodes :class:`Item` s (in DataLoader workers): ``{"position", "image" uint8 [H, W, 3] tensor,
    "label" int64 [H, W] or None, "error" str or None}``.

    Args:
        items: what to read.
        max_pixels: refuse images with more pixels (0: no limit).
        shards: the ``DIR/SPLIT`` the items' indices refer to.
    """

    def __init__(self, items: list[Item], *, max_pixels: int = DEFAULT_MAX_PIXELS, shards: Optional[str] = None):
        self.items = items
        self.max_pixels = max_pixels
        self.shards = shards
        self._indexed = None

    def __len__(self) -> int:
        return len(self.items)

    def too_large(self, size: Optional[tuple[int, int]]) -> Optional[str]:
        if size is None or not self.max_pixels or size[0] * size[1] <= self.max_pixels:
            return None
        return (f"{size[1]}x{size[0]} = {size[0] * size[1]:,} pixels is above the limit of {self.max_pixels:,} "
                f"(PIL's decompression-bomb guard); pass --max-pixels {size[0] * size[1]} (or 0 for no limit) "
                "if you trust this file")

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.items[position]
        out: dict[str, Any] = {"position": position, "image": None, "label": None, "error": None}
        reason = self.too_large(item.size)
        if reason:
            out["error"] = reason
            return out
        try:
            if item.path is not None:
                old = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None  # checked above against --max-pixels
                try:
                    with warnings.catch_warnings(), Image.open(item.path) as im:
                        # a writable copy: torch refuses read-only arrays
                        out["image"] = torch.from_numpy(np.array(im.convert("RGB")))
                finally:
                    Image.MAX_IMAGE_PIXELS = old
            else:
                if self._indexed is None:
                    from dist_seg.data.shards import IndexedShards

                    root, _, split = self.shards.rstrip("/").rpartition("/")
                    self._indexed = IndexedShards(root, split, decode="full")
                row = self._indexed[item.index]
                out["image"] = row["image"].permute(1, 2, 0).contiguous()
                out["label"] = row["label"]
        except (UnidentifiedImageError, OSError, ValueError) as err:
            out["error"] = f"unreadable ({err})"
        return out


def identity_collate(rows: list) -> list:
    """Batches stay lists: images of one batch may differ in size (they share a model input size)."""
    return rows
