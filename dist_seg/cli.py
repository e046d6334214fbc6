"""``dist-seg`` command line: a thin dispatcher over the stage functions.

Each subcommand lives in its own module, which provides ``configure_parser(parser)`` and
``run(args) -> int``. A stage whose module is not present is listed but answers with a clear message
and exit code 2 instead of a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("dist_seg.data.prepare", "write image shards for a dataset (toy, folder, cocostuff27, ...)"),
    "check-data": ("dist_seg.data.check", "read every shard of a dataset and its feature caches; name damaged records"),
    "extract": ("dist_seg.features", "run the frozen backbone once and write feature shards"),
    "knn": ("dist_seg.knn_table", "mine the exact k-nearest-neighbour table of the training crops"),
    "train": ("dist_seg.trainer", "train a method (STEGO, DS2DL, a MaskDistill student) from a recipe"),
    "eval": ("dist_seg.eval_command", "evaluate a checkpoint or a baseline on the validation split"),
    "sweep": ("dist_seg.tune", "hyperparameter sweep with Ray Tune from a YAML file"),
    "predict": ("dist_seg.predict", "segment a folder of images with a trained checkpoint"),
    "runs": ("dist_seg.tracking", "compare tracked MLflow runs"),
    "masks": ("dist_seg.maskdistill.mining", "MaskDistill: mine one object mask per training image (SPEC 8.1)"),
    "name": ("dist_seg.maskdistill.naming", "MaskDistill: cluster the mined masks into K pseudo-classes (SPEC 8.2)"),
    "detect": ("dist_seg.pipeline", "MaskDistill: train Mask R-CNN on the named masks, predict candidates"),
    "pseudo": ("dist_seg.maskdistill.pseudo", "MaskDistill: confident Mask R-CNN candidates -> pseudo-label shards"),
    "maskdistill": ("dist_seg.pipeline", "MaskDistill: every stage of a recipe in order (masks ... distil, eval)"),
    "eval-instances": ("dist_seg.pipeline", "MaskDistill: mask AP of the mined masks and candidates (paper Table 3)"),
    "demo": ("dist_seg.demo", "toy data -> train -> evaluate, end to end on this machine"),
    "convert-checkpoint": ("dist_seg.checkpoints", "re-save a checkpoint so that it loads without running code"),
}


class NotAvailable(Exception):
    pass


def _load(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise NotAvailable(f"'{module_name}' is not part of this version of dist_seg yet") from None
        raise
    if not (hasattr(module, "configure_parser") and hasattr(module, "run")):
        raise NotAvailable(f"'{module_name}' does not provide a command yet")
    return module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-seg",
        description="Distributed unsupervised semantic segmentation (STEGO, DS2DL, MaskDistill) on frozen ViT "
                    "features.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            _load(module_name).configure_parser(p)
            p.set_defaults(_module=module_name)
        except NotAvailable as err:
            p.set_defaults(_module=None, _why=str(err))
    return parser


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line as ``dist-seg`` reads it (argparse exits with status 2 on anything it refuses).

    ``parser``: a parser from :func:`build_parser` to reuse (building one imports every stage module).
    """
    parser = parser or build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a trailing `overrides` positional at the first option, so `key=value` tokens
    # given after an option (`dist-seg knn stego_toy --k 7 data.root=X`) come back here: keep them as overrides.
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._module is None:
        print(f"dist-seg {args.command}: not implemented yet ({args._why}).", file=sys.stderr)
        return 2
    return int(_load(args._module).run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
