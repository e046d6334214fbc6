"""The skeleton of the built-in generators (``dist-seg prepare toy`` and ``toy_objects``).

A generated dataset is a function of its parameters. What both generators do alike lives here: their
command-line options, the rule that keeps a folder already holding the same dataset (and regenerates one
made with other parameters), and the loop over the ``train`` / ``val`` splits.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_seg.data.manifest import DatasetManifest, PathLike, read_manifest

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 16
NUM_TRAIN, NUM_VAL = 256, 64


def add_generator_arguments(parser: argparse.ArgumentParser, *, num_classes: int, size: int,
                            classes_help: str = "number of classes", size_help: str = "") -> None:
    """``--num-classes --num-train --num-val --size --seed`` with the generator's defaults."""
    parser.add_argument("--num-classes", type=int, default=num_classes, help=f"{classes_help} (default {num_classes})")
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN, help=f"training images (default {NUM_TRAIN})")
    parser.add_argument("--num-val", type=int, default=NUM_VAL, help=f"validation images (default {NUM_VAL})")
    parser.add_argument("--size", type=int, default=size, help=f"image side in pixels (default {size}{size_help})")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")


def generator_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generator function's keyword arguments from the parsed options of ``dist-seg prepare``."""
    return dict(num_classes=args.num_classes, num_train=args.num_train, num_val=args.num_val, size=args.size,
                seed=args.seed, samples_per_shard=args.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD,
                overwrite=args.overwrite)


def write_generated(root: PathLike, name: str, params: dict[str, Any], *, num_train: int, num_val: int,
                    overwrite: bool, write_split: Callable[[str, int, bool], DatasetManifest]) -> DatasetManifest:
    """Write the ``train`` and ``val`` splits of a generated dataset (a split of 0 images is left out).

    Args:
        root: dataset folder.
        name: the dataset's name in its manifest.
        params: every parameter the images depend on (recorded in the manifest's ``extra["params"]``).
        num_train, num_val: images per split.
        overwrite: regenerate even if ``root`` already holds this dataset. A folder holding another dataset, or
            this one made with other parameters, is always regenerated.
        write_split: ``(split, count, overwrite) -> manifest`` writes one split (and updates the manifest).

    Raises:
        ValueError: both counts are 0.
    """
    root = Path(root)
    if not overwrite and (root / "manifest.json").is_file():
        previous = read_manifest(root)
        if previous.name != name or previous.extra.get("params") != params:
            log.info("%s holds a different dataset; regenerating", root)
            overwrite = True
    manifest = None
    for split, count in (("train", num_train), ("val", num_val)):
        if count > 0:
            manifest = write_split(split, count, overwrite)
    if manifest is None:
        raise ValueError("num_train and num_val are both 0: nothing to generate")
    return manifest
