"""The MaskDistill results table (SPEC §8.6; docs/results.md "MaskDistill (toy)").

Runs ``dist-seg maskdistill RECIPE [key=value ...]`` (every stage, skipping finished ones; one process)
unless ``--report-only``, then, for paper 003's Table 3, mines and names the training split's masks with
the two baselines (``dist-seg masks/name RECIPE maskdistill.mine.method=dino|lost``) and scores every
object-mask set with ``dist-seg eval-instances RECIPE`` (skipped, with a note, when the dataset has no
instance ground truth). It then reads ``<train.output_dir>/maskdistill_results.json`` (and
``maskdistill_instances.json``) and prints the markdown tables: initial masks + K-means and Mask R-CNN
pseudo-labels (training split), the student (training and validation splits); clustering mIoU/Acc
(Hungarian over all K+1 classes, background included) and the linear protocol's mIoU/Acc; then mask
AP / AP50 / AP75 of each miner's masks and the Mask R-CNN candidates in Table 3's three settings. A
header gives the commands, date, commit and machine.

Examples::

    python tools/maskdistill_results.py maskdistill_toy
    python tools/maskdistill_results.py maskdistill_toy train.output_dir=runs/md_toy --report-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return out + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe file or name, e.g. maskdistill_toy")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    parser.add_argument("--report-only", action="store_true", help="only read a finished run's results file")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from dist_seg.data.instances import instances_path
    from dist_seg.pipeline import INSTANCES_NAME, RESULTS_NAME, format_results
    from dist_seg.trainer import load_recipe, resolve_config

    cfg = resolve_config(load_recipe(args.recipe)(), args.overrides)
    base = [sys.executable, "-m", "dist_seg.cli"]
    commands = [["maskdistill", args.recipe, *args.overrides]]
    if instances_path(cfg.data.root, cfg.data.train_split).is_file() or cfg.data.dataset == "toy_objects":
        for method in ("dino", "lost"):
            for stage in ("masks", "name"):
                commands.append([stage, args.recipe, *args.overrides, f"maskdistill.mine.method={method}"])
        commands.append(["eval-instances", args.recipe, *args.overrides])
    else:
        print(f"note: {cfg.data.root} has no instance ground truth for {cfg.data.train_split}: no mask AP table",
              file=sys.stderr)
    seconds = None
    if not args.report_only:
        start = time.perf_counter()
        for cmd in commands:
            done = subprocess.run(base + cmd, cwd=REPO)
            if done.returncode != 0:
                print(f"error: `dist-seg {shlex.join(cmd)}` failed with exit code {done.returncode}", file=sys.stderr)
                return done.returncode
        seconds = time.perf_counter() - start
    path = Path(cfg.train.output_dir) / RESULTS_NAME
    if not path.is_file():
        print(f"error: {path} not found: run without --report-only first", file=sys.stderr)
        return 2
    result = json.loads(path.read_text())
    instances = Path(cfg.train.output_dir) / INSTANCES_NAME
    if instances.is_file():  # every miner's masks (eval-instances), not only those the pipeline's eval saw
        result["instances"] = json.loads(instances.read_text())["instances"]
    for cmd in commands:
        print(f"command: dist-seg {shlex.join(cmd)}")
    print(f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {_commit()}; "
          f"{platform.machine()} {platform.system()}"
          + (f"; wall time {seconds / 60:.1f} min" if seconds is not None else ""))
    print()
    print(format_results(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
