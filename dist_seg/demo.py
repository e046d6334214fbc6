"""``dist-seg demo``: the built-in toy dataset, end to end, on this machine.

Generates the toy dataset if it is absent, trains the method of the toy recipe, fits the raw-feature
baseline's probes on the same data for the same number of steps, and prints both on the STEGO
evaluation protocol, with the paths of the overlays and the MLflow store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_seg.config import ConfigError, merge


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["stego", "ds2dl"], default="stego", help="method to train")
    parser.add_argument("--root", default="data/toy", help="where the toy dataset is (generated if absent)")
    parser.add_argument("--out", default="runs/demo", help="output folder of the runs")
    parser.add_argument("--no-baseline", action="store_true", help="skip the raw-feature baseline")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def run(args: argparse.Namespace) -> int:
    from dist_seg.data.manifest import read_manifest
    from dist_seg.data.toy import generate_toy
    from dist_seg.eval.evaluate import format_table
    from dist_seg.runtime import load_recipe, make_accelerator, setup_logging
    from dist_seg.tracking import tracking_uri
    from dist_seg.trainer import train, train_baseline

    setup_logging()
    root = Path(args.root)
    if not (root / "manifest.json").is_file():
        print(f"generating the toy dataset in {root} ...", flush=True)
        generate_toy(root)
    manifest = read_manifest(root)
    try:
        base = load_recipe(f"{args.method}_toy")()
        cfg = merge(base, overrides=[f"data.root={root}", f"train.output_dir={Path(args.out) / args.method}",
                                     *args.overrides])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    accelerator = make_accelerator(cfg)
    rows = {}
    try:
        print(f"training {cfg.method} on {manifest.name} ({manifest.splits['train'].num_samples} train crops, "
              f"{cfg.train.num_steps} steps, backbone {cfg.backbone.name}) ...", flush=True)
        result = train(cfg, accelerator)
        rows[f"{cfg.method} head"] = result["val"]
        if not args.no_baseline:
            base_cfg = merge(cfg, overrides=[f"train.output_dir={Path(args.out)}"])
            print("fitting the raw-feature baseline's probes ...", flush=True)
            rows["raw backbone features"] = train_baseline(base_cfg, "raw", accelerator=accelerator)["val"]
    finally:
        accelerator.end_training()
    if accelerator.is_main_process:
        print()
        print(format_table(rows, title=f"toy validation ({manifest.splits['val'].num_samples} images, "
                                       f"{manifest.num_classes} classes)"))
        eval_dir = Path(cfg.train.output_dir) / "eval"
        print(f"\noverlays and confusion matrix: {eval_dir}/final_overlays.png, {eval_dir}/final_confusion.png")
        if cfg.tracking.enabled:
            print(f"MLflow runs: {tracking_uri(cfg.tracking.uri)} (experiment '{cfg.tracking.experiment}'); "
                  f"compare with `dist-seg runs`")
    return 0
