"""The dataset manifest: what ``dist-seg prepare`` wrote and where.

A prepared dataset is a folder::

    <root>/manifest.json                 this file's :class:`DatasetManifest`
    <root>/<split>/shard-000000.tar ...  WebDataset shards (see :mod:`dist_seg.data.shards`)
    <root>/<split>/wids.json             the ``wids`` shard index used for random access

Converters write splits one at a time and record each with :func:`update_split`, so a dataset with a
finished ``train`` split and an interrupted ``val`` split still has a truthful manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A problem with the data a user pointed us at (missing files, bad labels, wrong layout)."""


class ManifestNotFoundError(DataError, FileNotFoundError):
    """``<root>/manifest.json`` does not exist: the dataset was never prepared."""


@dataclass(kw_only=True)
class SplitInfo:
    """One split of a prepared dataset.

    Attributes:
        num_samples: records in the split (after five-crop, if any).
        shards: shard file names, relative to the split folder, in global index order.
        has_labels: whether every record carries a ``label.png``.
        crop: ``"none"`` or ``"five"`` (STEGO five-crop applied when writing).
        shard_sizes: records per shard (same order as ``shards``).
        class_pixels: pixel count per class id ``0..max_id`` over the split, or None without labels.
        ignore_pixels: pixels labelled 255 (ignore).
    """

    num_samples: int
    shards: list[str]
    has_labels: bool
    crop: str = "none"
    shard_sizes: list[int] | None = None
    class_pixels: list[int] | None = None
    ignore_pixels: int = 0

    def __post_init__(self) -> None:
        if self.crop not in ("none", "five"):
            raise DataError(f"crop must be 'none' or 'five', got {self.crop!r}")


@dataclass(kw_only=True)
class DatasetManifest:
    """What a prepared dataset holds.

    Attributes:
        name: dataset name (``toy``, ``folder``, ``cocostuff27``, ...).
        num_classes: number of ground-truth classes, or None for unlabelled data.
        class_names: one name per class, or None.
        colors: one RGB triple (0..255) per class for visualisation, or None.
        splits: split name -> :class:`SplitInfo`.
        extra: free-form converter details (source paths, options, skipped files, ...).
    """

    name: str
    num_classes: int | None
    class_names: list[str] | None
    colors: list[list[int]] | None
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.class_names is not None and self.num_classes is not None and len(self.class_names) != self.num_classes:
            raise DataError(f"{len(self.class_names)} class names for num_classes={self.num_classes}")
        if self.colors is not None and self.num_classes is not None and len(self.colors) != self.num_classes:
            raise DataError(f"{len(self.colors)} colours for num_classes={self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["version"] = MANIFEST_VERSION
        return out

    def to_json(self) -> str:
        """Serialise to a JSON string (stable key order, human readable)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetManifest:
        data = dict(data)
        version = data.pop("version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise DataError(f"manifest version {version} is not supported (expected {MANIFEST_VERSION}); "
                            "re-run `dist-seg prepare` with this version of dist_seg")
        splits = {name: SplitInfo(**info) for name, info in data.pop("splits", {}).items()}
        return cls(splits=splits, **data)

    @classmethod
    def from_json(cls, text: str | dict) -> DatasetManifest:
        """Parse a manifest from a JSON string (or an already parsed dict)."""
        return cls.from_dict(json.loads(text) if isinstance(text, str) else text)

    def split(self, name: str) -> SplitInfo:
        """The :class:`SplitInfo` of ``name``, with an error listing the available splits."""
        if name not in self.splits:
            raise DataError(f"dataset '{self.name}' has no split '{name}' (available: {sorted(self.splits)}); "
                            f"prepare it with `dist-seg prepare {self.name} ...`")
        return self.splits[name]


def manifest_path(root: PathLike) -> Path:
    return Path(root) / MANIFEST_NAME


def _atomic_write_text(path: Path, text: str) -> None:
    # A reader must never see a half-written manifest, even if the writer is killed.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(root: PathLike, manifest: DatasetManifest) -> Path:
    """Write ``<root>/manifest.json`` atomically and return its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = manifest_path(root)
    _atomic_write_text(path, manifest.to_json() + "\n")
    return path


# How each dataset is made from scratch (`dist-seg prepare NAME ...`); every other name needs --src.
_PREPARE_SOURCE = {"toy": "", "toy_objects": "", "folder": " --images DIR"}


def prepare_command(dataset: str, root: PathLike) -> str:
    """The whole ``dist-seg prepare`` command that writes ``dataset`` to ``root``, in backticks."""
    source = _PREPARE_SOURCE.get(dataset, " --src SRC")
    return f"`dist-seg prepare {dataset}{source} --out {root}`"


def missing_dataset_message(root: PathLike, dataset: Optional[str] = None) -> str:
    """What to say when ``root`` holds no prepared dataset: the command that makes it, and where to read more."""
    if dataset:
        how = prepare_command(dataset, root)
        if dataset not in _PREPARE_SOURCE:
            how += f" (SRC: where you unpacked the original {dataset} files; docs/datasets.md says how to get them)"
        return f"no dataset at {root}: create it with {how}"
    return (f"no dataset manifest at {manifest_path(root)}. Prepare the dataset first, e.g. "
            f"`dist-seg prepare toy --out {root}` or `dist-seg prepare folder --images DIR --out {root}` "
            "(see `dist-seg prepare --help` for cocostuff27, cityscapes27, potsdam3, voc12, coco20k, toy_objects).")


def read_manifest(root: PathLike, *, dataset: Optional[str] = None) -> DatasetManifest:
    """Read ``<root>/manifest.json``.

    Args:
        root: a folder written by ``dist-seg prepare``.
        dataset: the dataset the caller expects there (a run's ``data.dataset``): a missing folder is then
            answered with that dataset's own ``dist-seg prepare`` command.

    Raises:
        ManifestNotFoundError: the folder was never prepared; the message names the command to run.
    """
    path = manifest_path(root)
    if not path.is_file():
        raise ManifestNotFoundError(missing_dataset_message(root, dataset))
    try:
        return DatasetManifest.from_json(path.read_text())
    except (json.JSONDecodeError, TypeError) as err:
        raise DataError(f"{path} is not a valid dataset manifest ({err}); re-run `dist-seg prepare`") from None


def describe_dataset(root: PathLike) -> dict[str, Any]:
    """What a run records about its dataset (MLflow dataset input): name, absolute root, manifest digest,
    class count and the size of every split.

    The digest is the sha256 of ``manifest.json``, which lists every shard and its size: two runs with the
    same digest read the same prepared data.

    Raises:
        ManifestNotFoundError: the folder was never prepared.
    """
    import hashlib

    manifest = read_manifest(root)
    return {"name": manifest.name, "root": str(Path(root).resolve()),
            "digest": hashlib.sha256(manifest_path(root).read_bytes()).hexdigest(),
            "num_classes": manifest.num_classes, "class_names": manifest.class_names,
            "splits": {name: {"num_samples": info.num_samples, "has_labels": info.has_labels, "crop": info.crop,
                              "num_shards": len(info.shards)}
                       for name, info in manifest.splits.items()}}


def update_split(root: PathLike, split: str, info: SplitInfo, **dataset_fields: Any) -> DatasetManifest:
    """Record one written split in ``<root>/manifest.json``, creating the manifest if needed.

    Args:
        root: dataset folder.
        split: split name.
        info: what :func:`dist_seg.data.shards.write_split` returned.
        **dataset_fields: :class:`DatasetManifest` fields to set or overwrite (``name`` is required
            when the manifest does not exist yet). ``extra`` is merged key by key (dict values one level deep).

    Returns:
        The manifest as written.
    """
    root = Path(root)
    unknown = set(dataset_fields) - {f.name for f in dataclasses.fields(DatasetManifest)} - {"splits"}
    if unknown:
        raise TypeError(f"unknown DatasetManifest fields: {sorted(unknown)}")
    if manifest_path(root).is_file():
        manifest = read_manifest(root)
        extra = dataset_fields.pop("extra", None)
        for key, value in dataset_fields.items():
            setattr(manifest, key, value)
        for key, value in (extra or {}).items():
            # One level deep, so per-split entries such as extra["sources"][split] accumulate.
            if isinstance(value, dict) and isinstance(manifest.extra.get(key), dict):
                manifest.extra[key] = {**manifest.extra[key], **value}
            else:
                manifest.extra[key] = value
        manifest.__post_init__()
    else:
        if "name" not in dataset_fields:
            raise TypeError("update_split needs name=... when creating a new manifest")
        fields = dict(num_classes=None, class_names=None, colors=None)
        fields.update(dataset_fields)
        manifest = DatasetManifest(**fields)
    manifest.splits[split] = info
    write_manifest(root, manifest)
    return manifest
