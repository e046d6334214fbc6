"""``dist-seg check-data ROOT``: read every record of a prepared dataset (and its feature caches), name what is damaged.

Every shard of every split is streamed through the same reader and record decoder that training uses
(:func:`dist_seg.data.shards.make_loader`), so a record this command passes is a record training can read,
and every record it names is one that training, evaluation, ``knn`` and ``extract`` would skip. Damage is
reported as ``shard key: problem``; the exit code is 1 when anything is damaged, 0 when nothing is, and 2
when there is no dataset to check.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dist_seg.data.manifest import DataError, read_manifest
from dist_seg.data.shards import DamagedRecord, make_loader, resolve_shards, shard_name

log = logging.getLogger(__name__)

CACHE_INFO = "cache.json"  # written by `dist-seg extract` (dist_seg.features.CACHE_INFO)


def _shard_file_problems(root: Path, split: str) -> list[DamagedRecord]:
    """Shard files that are absent or whose size differs from what ``wids.json`` recorded at write time."""
    index_path = root / split / "wids.json"
    if not index_path.is_file():
        return []
    problems = []
    for shard in json.loads(index_path.read_text()).get("shardlist", []):
        path = index_path.parent / shard["url"]
        want = shard.get("filesize")
        if not path.is_file():
            problems.append(DamagedRecord(shard_name(shard["url"]), "*", "shard file is missing"))
        elif want is not None and path.stat().st_size != int(want):
            problems.append(DamagedRecord(shard_name(shard["url"]), "*",
                                          f"shard is {path.stat().st_size} bytes but was written with {want} "
                                          "(an interrupted copy?)"))
    return problems


def check_split(root: str | os.PathLike, split: str, *, features: bool = False, num_workers: int = 0) -> dict[str, Any]:
    """Read every record of ``split`` once and report the damaged ones.

    Args:
        root: a prepared dataset folder or a feature cache folder.
        split: the split to read.
        features: the folder is a feature cache (records hold ``feat.npy``/``gap.npy``).
        num_workers: loader worker processes.

    Returns:
        ``{"split", "num_samples", "readable", "damaged": [{"shard", "key", "problem"}, ...],
        "shard_problems": [...]}``.
    """
    root = Path(root)
    shards = resolve_shards(root, split)
    loader, _ = make_loader(root, split, batch_size=1, res=None, num_workers=num_workers, shuffle=False,
                            infinite=False, decode="features" if features else "full", nodesplitter=None,
                            num_classes="manifest")
    readable = sum(int(batch["index"].numel()) for batch in loader)
    counter = loader.skip_counter
    damaged = sorted(counter.damaged(), key=lambda r: (r.shard, r.key))
    return {
        "split": split,
        "num_samples": shards.num_samples,
        "readable": readable,
        "damaged": [r.as_dict() for r in damaged],
        "unnamed": max(0, counter.skipped_samples - len(damaged)),
        "shard_problems": [r.as_dict() for r in _shard_file_problems(root, split)],
    }


def caches_of(root: Path) -> list[Path]:
    """Feature caches written under a dataset folder by ``dist-seg extract`` (``<root>/features/*``)."""
    return sorted(p.parent for p in (root / "features").glob(f"*/{CACHE_INFO}"))


def check_data(root: str | os.PathLike, *, caches: list[str | os.PathLike] | None = None,
               num_workers: int = 0) -> dict[str, Any]:
    """Check every split of a dataset and of its feature caches (given, or found under ``<root>/features``).

    Returns:
        ``{"root", "damaged": total damaged records + shard problems, "folders": [{"path", "kind",
        "splits": [check_split results]}]}``.
    """
    root = Path(root)
    manifest = read_manifest(root)  # raises DataError naming `dist-seg prepare`
    folders = [{"path": str(root), "kind": "images",
                "splits": [check_split(root, s, num_workers=num_workers) for s in sorted(manifest.splits)]}]
    for cache in [Path(c) for c in caches] if caches else caches_of(root):
        if not (cache / CACHE_INFO).is_file():
            raise DataError(f"{cache} is not a feature cache (no {CACHE_INFO}); build it with `dist-seg extract`")
        splits = sorted(read_manifest(cache).splits)
        folders.append({"path": str(cache), "kind": "features",
                        "splits": [check_split(cache, s, features=True, num_workers=num_workers) for s in splits]})
    total = sum(len(s["damaged"]) + s["unnamed"] + len(s["shard_problems"]) for f in folders for s in f["splits"])
    return {"root": str(root), "damaged": total, "folders": folders}


def format_report(report: dict[str, Any], *, dataset: str | None = None) -> str:
    lines = []
    for folder in report["folders"]:
        for split in folder["splits"]:
            bad = len(split["damaged"]) + split["unnamed"]
            lines.append(f"{folder['path']} [{folder['kind']}] {split['split']}: {split['readable']} of "
                         f"{split['num_samples']} records readable, {bad} damaged")
            for p in split["shard_problems"]:
                lines.append(f"  {p['shard']}: {p['problem']}")
            for r in split["damaged"]:
                lines.append(f"  {r['shard']} {r['key']}: {r['problem']}")
            if split["unnamed"]:
                lines.append(f"  ... and {split['unnamed']} more records not named")
    if report["damaged"]:
        name = dataset or "DATASET"
        lines.append(f"damaged: {report['damaged']}. Fix: copy the named shards again, or rewrite the dataset with "
                     f"`dist-seg prepare {name} --out {report['root']} ... --overwrite`; for a feature cache, delete "
                     "the named shards and re-run `dist-seg extract RECIPE`")
    else:
        lines.append("no damaged records")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ cli
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="a dataset folder written by `dist-seg prepare` (holds manifest.json)")
    parser.add_argument("--cache", nargs="+", default=None,
                        help="feature cache folder(s) to check too (default: every cache under ROOT/features)")
    parser.add_argument("--workers", type=int, default=2, help="reader processes (default 2)")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")


def run(args: argparse.Namespace) -> int:
    """Exit 0: nothing damaged; 1: damaged records or shards (listed); 2: no dataset / bad arguments."""
    from dist_seg.runtime import setup_logging

    setup_logging()
    # Each damaged record is listed once in the report below; the readers' rate-limited warnings would repeat it.
    reader_log = logging.getLogger("dist_seg.data.shards")
    level = reader_log.level
    reader_log.setLevel(logging.ERROR)
    try:
        report = check_data(args.root, caches=args.cache, num_workers=max(0, args.workers))
        dataset = read_manifest(args.root).name
    except (DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        reader_log.setLevel(level)
    print(format_report(report, dataset=dataset))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if report["damaged"] else 0
