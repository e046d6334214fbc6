"""``dist-seg predict``: segment a folder, a list of images or a prepared split with a trained checkpoint.

One process, or several under any launcher (``accelerate launch``, ``torchrun``: the work is split across
ranks), or a Ray Data pipeline (``--ray``). See docs/predict.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from dist_seg.predict.inputs import DEFAULT_MAX_PIXELS


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--shards", metavar="DIR/SPLIT",
                     help="a split of a prepared dataset (e.g. data/toy/val): outputs are named by sample key and, "
                          "when the split has labels, the summary scores them as `dist-seg eval` does")
    src.add_argument("--list", dest="list_file", metavar="FILE",
                     help="a text file of image paths, one a line (relative to the file's folder)")
    parser.add_argument("--out", required=True, help="output folder: labels/, overlays/, areas/")
    parser.add_argument("--res", type=int, default=None,
                        help="shorter side fed to the backbone (default: the run's eval_res; with --tile, the "
                             "training crop's data.res)")
    parser.add_argument("--tile", type=int, default=None,
                        help="sliding window: tile side in source pixels, each tile encoded at --res (for images "
                             "whose objects are at the training scale only in tiles; see docs/predict.md)")
    parser.add_argument("--stride", type=int, default=None, help="tile stride in source pixels (default: tile/2)")
    parser.add_argument("--crf", action="store_true", help="refine with the dense CRF (tile by tile with --tile)")
    parser.add_argument("--raw-clusters", action="store_true", help="write cluster ids, not matched class ids")
    parser.add_argument("--no-overlays", action="store_true", help="write label PNGs only (no colour overlays)")
    parser.add_argument("--areas", action="store_true", help="also write a class-area CSV per image")
    parser.add_argument("--batch-size", type=int, default=8, help="images (or tiles) encoded together per rank")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse images with more pixels (default {DEFAULT_MAX_PIXELS:,}, PIL's "
                             "decompression-bomb guard; 0: no limit)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; under a "
                        "launcher, each rank's own GPU)")
    parser.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline (one model actor per GPU)")
    parser.add_argument("--address", default=None, help="Ray cluster address for --ray (default: a local cluster)")
    parser.add_argument("--num-actors", type=int, default=None, help="--ray: model actors (default: GPUs, or 2 CPU "
                        "actors without GPUs)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="also read a checkpoint that torch.load(weights_only=True) refuses (written before "
                             "safe checkpoints): this unpickles it, which runs any code it holds; only for files "
                             "from a source you trust (`dist-seg convert-checkpoint` re-saves it safely)")
    parser.add_argument("overrides", nargs="*", help="config overrides (e.g. backbone.weights=/path)")


def _items(args):
    from dist_seg.predict.inputs import folder_items, list_file_items, shard_items, shard_labels

    if args.images:
        return folder_items(args.images), (None, None, None)
    if args.list_file:
        return list_file_items(args.list_file), (None, None, None)
    return shard_items(args.shards), shard_labels(args.shards)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from dist_seg import distributed as D
    from dist_seg.predict.engine import Predictor
    from dist_seg.predict.inputs import InputError
    from dist_seg.predict.runner import PredictOptions, predict_items
    from dist_seg.predict.writers import Writer
    from dist_seg.runtime import setup_logging

    setup_logging()
    if args.tile is not None and args.tile < 1 or args.stride is not None and not args.tile:
        print("error: --tile takes a positive side in pixels, and --stride needs --tile", file=sys.stderr)
        return 2
    if args.stride is not None and not 0 < args.stride <= args.tile:
        print(f"error: --stride must be in 1..--tile ({args.tile}), got {args.stride}", file=sys.stderr)
        return 2
    options = PredictOptions(res=args.res, crf=args.crf, tile=args.tile, stride=args.stride,
                             batch_size=args.batch_size, num_workers=args.num_workers, max_pixels=args.max_pixels)
    state = None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.ray:
        # Started by a launcher: join its process group (gloo on CPU, NCCL on GPUs), one device per rank.
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu")
        device = state.device
    try:
        try:
            # The checkpoint first: a bad one fails at once, before a corpus is listed (Ray's actors load their own).
            predictor = None if args.ray else Predictor(args.checkpoint, device=device, overrides=args.overrides,
                                                        raw_clusters=args.raw_clusters, trust=args.trust_checkpoint)
            items, (num_classes, _, colors) = _items(args)
            if not items:
                raise InputError(f"no images found in {args.images or args.list_file or args.shards}")
            if predictor is None:
                from dist_seg.predict.ray_data import predict_with_ray

                summary = predict_with_ray(args, items, options, num_classes=num_classes)
            else:
                palette = predictor.meta.get("colors") or colors
                writer = Writer(args.out, overlays=not args.no_overlays, areas=args.areas,
                                palette=np.asarray(palette, dtype=np.uint8) if palette else None)
                if D.is_main_process():
                    writer.clean_partials()
                D.barrier()
                summary = predict_items(predictor, items, writer, options, shards=args.shards,
                                        num_classes=num_classes)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if D.is_main_process():
            import json
            from pathlib import Path

            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
            head, *reasons = summary.lines()
            print(head + f"; outputs in {args.out}")
            for line in reasons:
                print(line, file=sys.stderr if line.startswith("  skipped") else sys.stdout)
        if summary.written + summary.complete == 0 and summary.skipped:
            if D.is_main_process():
                print(f"error: nothing written; {summary.skipped[0]}", file=sys.stderr)
            return 2
        return 0
    finally:
        if state is not None:
            D.barrier()
            state.destroy_process_group()
