"""``dist-seg prepare DATASET --out DIR [options]``: write a dataset as WebDataset shards.

Every dataset has a converter module exposing ``add_arguments(parser)`` and ``convert(args) -> int``;
:data:`CONVERTERS` maps the dataset name to that module, imported only when the command line is built.
A converter whose module is not part of this installation is listed but answers with a clear message.
Every converter gets the common options ``--out``, ``--samples-per-shard`` and ``--overwrite``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import ModuleType

from dist_seg.data.manifest import DataError, DatasetManifest, read_manifest

# dataset name -> (converter module, one-line help)
CONVERTERS: dict[str, tuple[str, str]] = {
    "toy": ("dist_seg.data.toy", "procedural toy scenes with exact labels, generated from a seed"),
    "toy_objects": ("dist_seg.data.toy_objects",
                    "toy objects of K classes on stuff backgrounds, exact masks and instances (MaskDistill)"),
    "folder": ("dist_seg.data.folder", "a folder of images, with optional label PNGs matched by file stem"),
    "cocostuff27": ("dist_seg.data.cocostuff", "COCO-Stuff, 27 coarse classes, STEGO's curated image lists"),
    "cityscapes27": ("dist_seg.data.cityscapes", "Cityscapes gtFine, 27 classes (label id - 7)"),
    "potsdam3": ("dist_seg.data.potsdam", "ISPRS Potsdam (IIC tiles), 3 merged classes"),
    "voc12": ("dist_seg.data.voc12", "PASCAL VOC 2012 (+ SBD for trainaug), 21 classes, 255 void"),
    "coco20k": ("dist_seg.data.coco20k", "COCO20k: 19,817 train2014 images, 80 things + background, instances"),
}


class ConverterNotAvailable(Exception):
    pass


def register_converter(name: str, module: str, help_text: str) -> None:
    """Add (or replace) a converter: ``module`` must expose ``add_arguments`` and ``convert``."""
    CONVERTERS[name] = (module, help_text)


def load_converter(module_name: str) -> ModuleType:
    """Import a converter module, or raise :class:`ConverterNotAvailable` if it is absent or incomplete."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ConverterNotAvailable(f"'{module_name}' is not part of this version of dist_seg") from None
        raise
    if not (hasattr(module, "add_arguments") and hasattr(module, "convert")):
        raise ConverterNotAvailable(f"'{module_name}' does not provide add_arguments/convert")
    return module


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="dataset folder to write (manifest.json + one folder per split)")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="records per tar shard (default depends on the dataset; keep shards >= ranks x workers)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite splits that are already complete (otherwise they are kept: prepare resumes)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add one sub-command per dataset converter to ``dist-seg prepare``."""
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET")
    sub.required = True
    for name, (module_name, help_text) in CONVERTERS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        try:
            load_converter(module_name).add_arguments(p)
            p.set_defaults(_converter=module_name, _why=None)
        except ConverterNotAvailable as err:
            p.set_defaults(_converter=None, _why=str(err))


def format_summary(manifest: DatasetManifest) -> str:
    """Counts per split and the class histogram of each labelled split, as printable text."""
    lines = [f"dataset '{manifest.name}': {manifest.num_classes or 'no'} classes"]
    for split, info in manifest.splits.items():
        lines.append(f"  {split}: {info.num_samples} samples in {len(info.shards)} shards, "
                     f"{'labelled' if info.has_labels else 'unlabelled'}, crop={info.crop}")
        if info.class_pixels:
            total = sum(info.class_pixels) + info.ignore_pixels
            names = manifest.class_names or []
            parts = []
            for k, count in enumerate(info.class_pixels):
                name = names[k] if k < len(names) else str(k)
                parts.append(f"{name} {100.0 * count / total:.1f}%")
            parts.append(f"ignore {100.0 * info.ignore_pixels / total:.1f}%")
            lines.append("    class pixels: " + ", ".join(parts))
    skipped = {s: v for s, v in (manifest.extra.get("unreadable") or {}).items() if v}
    for split, files in skipped.items():
        lines.append(f"  {split}: skipped {len(files)} unreadable files: {', '.join(files[:10])}"
                     + (" ..." if len(files) > 10 else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the chosen converter, then print a summary of the dataset folder."""
    if getattr(args, "_converter", None) is None:
        print(f"dist-seg prepare {args.dataset}: not available ({args._why}).", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = load_converter(args._converter)
    try:
        code: int | None = module.convert(args)
    except DataError as err:
        print(f"dist-seg prepare {args.dataset}: {err}", file=sys.stderr)
        return 1
    if code:
        return int(code)
    print(format_summary(read_manifest(args.out)))
    return 0
