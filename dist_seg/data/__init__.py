"""Data layer: WebDataset shards, dataset converters, transforms and indexed lookup.

Import the submodules directly (``dist_seg.data.shards``, ``.manifest``, ``.transforms``, ``.toy``,
``.folder``, ``.prepare``); the names most callers need are re-exported here.
"""

from dist_seg.data.manifest import (
    DataError,
    DatasetManifest,
    ManifestNotFoundError,
    SplitInfo,
    read_manifest,
    update_split,
    write_manifest,
)
from dist_seg.data.shards import (
    IndexedShards,
    Sample,
    SkipCounter,
    five_crop,
    make_loader,
    write_records,
    write_split,
    write_wids_index,
)

__all__ = [
    "DataError",
    "DatasetManifest",
    "IndexedShards",
    "ManifestNotFoundError",
    "Sample",
    "SkipCounter",
    "SplitInfo",
    "five_crop",
    "make_loader",
    "read_manifest",
    "update_split",
    "write_manifest",
    "write_records",
    "write_split",
    "write_wids_index",
]
