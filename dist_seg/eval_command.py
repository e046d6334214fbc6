"""``dist-seg eval``: score a checkpoint, or train and score the backbone-feature baselines (SPEC §5, §6).

This command glues two layers, so it sits above both: evaluating a checkpoint is evaluation alone
(:func:`dist_seg.eval.evaluate.evaluate_checkpoint`, no trainer), while ``--baselines`` fits each
baseline's probes on the training split, which is a training run (:func:`dist_seg.trainer.train_baseline`).
``dist_seg.eval`` stays below the trainer and never imports it (docs/decisions.md, "Layout").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_seg import distributed as D
from dist_seg.config import ConfigError, merge
from dist_seg.eval.evaluate import configure_parser, evaluate_checkpoint, format_table, save_reports
from dist_seg.runtime import load_recipe, make_accelerator, resolve_config, setup_logging
from dist_seg.trainer import TrainingError, load_method_checkpoint, train_baseline

__all__ = ["configure_parser", "report_name", "run", "run_eval_command"]


def run_eval_command(args: argparse.Namespace) -> int:
    """``dist-seg eval``: a checkpoint, or baselines fit on the recipe's training split."""
    setup_logging()
    rows: dict[str, dict] = {}
    is_main = D.is_main_process()
    try:
        if args.checkpoint:
            method, cfg, state = load_method_checkpoint(args.checkpoint, overrides=args.overrides,
                                                        trust=args.trust_checkpoint)
            cfg = merge(cfg, overrides=["tracking.enabled=false", "train.resume=false"])
            result, info = evaluate_checkpoint(method, cfg, crf=args.crf)
            rows[f"{cfg.method} (step {state['step']})"] = result
            out = args.out or str(_run_folder(Path(args.checkpoint)) / "eval")
        else:
            if not args.recipe:
                raise ConfigError("--baselines needs --recipe (dataset, backbone, resolution and steps)")
            base = resolve_config(load_recipe(args.recipe)(), args.overrides)
            info, out = None, args.out or str(Path(base.train.output_dir) / "baselines")
            accelerator = make_accelerator(base)
            # Read before end_training(): once the process group is gone every rank reports itself as rank 0.
            is_main = accelerator.is_main_process
            try:
                for kind in args.baselines:
                    res = train_baseline(base, kind, crf=args.crf, accelerator=accelerator)
                    if res["val"] is not None:
                        res["val"]["damaged_train"] = res.get("data")  # what fitting the probes skipped
                    rows[f"baseline {kind}"] = res["val"]
                    info = res.get("info")
            finally:
                accelerator.end_training()
    except (ConfigError, FileNotFoundError, ValueError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.crf:
        # A CRF evaluation is another result, not a newer one: its rows and report files say so, and the
        # plain reports of the same checkpoint stay where they are.
        rows = {f"{name} + CRF": res for name, res in rows.items()}
    if is_main:
        print(format_table(rows, title="validation (SPEC §6 protocol" + (", dense CRF)" if args.crf else ")")))
        for name, res in rows.items():
            for key, split in (("damaged", "validation"), ("damaged_train", "training")):
                report = (res or {}).get(key) or {}
                if report.get("damaged"):
                    print(f"{name}: skipped {len(report['damaged'])} damaged {split} records (named in the JSON "
                          f"report under '{key}'; `dist-seg check-data` lists them)")
        for name, res in rows.items():
            if res is not None:
                save_reports({**res, "crf": bool(args.crf)}, out, class_names=getattr(info, "class_names", None),
                             colors=getattr(info, "colors", None), name=report_name(name))
        print(f"reports written to {out}")
    return 0


def _run_folder(checkpoint: Path) -> Path:
    """The run folder of ``--checkpoint``: a run folder itself, or the parent of its ``checkpoints/`` folder."""
    if checkpoint.is_dir():
        return checkpoint.parent if checkpoint.name == "checkpoints" else checkpoint
    return checkpoint.parent.parent


def report_name(row: str) -> str:
    """File stem of a table row's reports: ``stego (step 4) + CRF`` -> ``stego_step_4_crf``."""
    return "_".join(row.replace("(", "").replace(")", "").replace("+", "").lower().split())


def run(args: argparse.Namespace) -> int:
    return run_eval_command(args)
