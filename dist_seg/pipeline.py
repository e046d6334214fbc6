"""MaskDistill stages that train (SPEC §8): the top layer that may call the trainer.

``dist-seg detect RECIPE [k=v ...]`` (:func:`detect_stage`) trains the Mask R-CNN detector as method
``maskrcnn`` under :func:`dist_seg.trainer.train` in ``<train.output_dir>/detect`` and then predicts the
candidates of every training image (``candidates_<split>.json``). Re-running the command resumes training
from the newest checkpoint, and skips prediction when the candidates file is complete and was made from
the final checkpoint with the same settings.

Every command here shares one parser (recipe, ``--config``, overrides); :data:`STAGES` maps the command
name to its stage function.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from dist_seg import distributed as D
from dist_seg.config import ConfigError, RunConfig

log = logging.getLogger("dist_seg.pipeline")

DETECT_DIR = "detect"


def detector_config(cfg: RunConfig) -> RunConfig:
    """The detector's run config: method ``maskrcnn`` in ``<train.output_dir>/detect`` with DetectConfig's
    global batch and number of steps; everything else (seed, checkpointing, tracking) from ``cfg``."""
    d = cfg.maskdistill.detect
    run_name = f"{cfg.tracking.run_name}-detect" if cfg.tracking.run_name else "detect"
    return dataclasses.replace(
        cfg, method="maskrcnn",
        data=dataclasses.replace(cfg.data, batch_size=d.batch_size),
        train=dataclasses.replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / DETECT_DIR),
                                  num_steps=d.num_steps, mode="online"),
        tracking=dataclasses.replace(cfg.tracking, run_name=run_name),
    )


def _candidates_are_current(path: Path, checkpoint: Path, cfg: RunConfig, split: str) -> bool:
    """Whether ``path`` is a complete candidates file of ``checkpoint`` with this run's prediction settings."""
    from dist_seg.data.manifest import read_manifest
    from dist_seg.maskdistill.detect import CANDIDATES_FORMAT, prediction_settings, read_candidates
    from dist_seg.maskdistill.files import MaskDistillFileError

    if not path.is_file():
        return False
    try:
        info, _ = read_candidates(path)
    except MaskDistillFileError as err:
        log.warning("%s; predicting again", err)
        return False
    want = {"format": CANDIDATES_FORMAT, "complete": True, "checkpoint": str(checkpoint),
            "step": cfg.train.num_steps, "num_images": read_manifest(cfg.data.root).split(split).num_samples,
            **prediction_settings(cfg, split)}
    stale = {k: (info.get(k), v) for k, v in want.items() if info.get(k) != v}
    if stale:
        log.info("%s is out of date (%s); predicting again", path, ", ".join(f"{k}: {a!r} != {b!r}"
                                                                          for k, (a, b) in stale.items()))
    return not stale


def detect_stage(cfg: RunConfig, *, accelerator=None) -> Optional[Path]:
    """Train the Mask R-CNN detector (or resume it) and predict candidates for every training image.

    Args:
        cfg: the MaskDistill run config (the detector's is derived with :func:`detector_config`).
        accelerator: an ``accelerate.Accelerator`` to share; built and ended here when omitted.

    Returns:
        The candidates file, or None when training stopped early on a termination signal (re-run the
        same command to resume).
    """
    from dist_seg.maskdistill.detect import predict_candidates
    from dist_seg.maskdistill.files import candidates_path
    from dist_seg.trainer import checkpoint_dir, make_accelerator, setup_logging, train

    setup_logging()
    det_cfg = detector_config(cfg)
    split = det_cfg.maskdistill.detect.split or det_cfg.data.train_split
    final = checkpoint_dir(det_cfg) / f"step-{det_cfg.train.num_steps:08d}.pt"
    out = candidates_path(det_cfg, split)
    own = accelerator is None
    accelerator = accelerator or make_accelerator(det_cfg)
    try:
        # The trainer writes the final checkpoint atomically: its presence means training is done.
        if D.broadcast_object(final.is_file()):
            log.info("detector already trained (%s): skipping training", final)
        else:
            result = train(det_cfg, accelerator)
            if result.get("stopped"):
                return None
        if D.broadcast_object(_candidates_are_current(out, final, det_cfg, split) if D.is_main_process() else None):
            log.info("candidates %s are complete and match %s: skipping prediction", out, final)
            return out
        return predict_candidates(det_cfg, final, split, device=accelerator.device)
    finally:
        if own:
            accelerator.end_training()


STAGES: dict[str, Callable[..., Optional[Path]]] = {"detect": detect_stage}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe file or name, e.g. recipes/maskdistill_toy.py or maskdistill_toy")
    parser.add_argument("--config", action="append", default=[], help="YAML file(s) merged over the recipe")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def run(args: argparse.Namespace) -> int:
    """Run the stage named by ``args.command`` on the recipe with its overrides."""
    from dist_seg.data.manifest import DataError
    from dist_seg.maskdistill.files import MaskDistillFileError
    from dist_seg.trainer import TrainingError, load_recipe, resolve_config, setup_logging

    setup_logging()
    stage = STAGES[args.command]
    try:
        argv = [x for f in args.config for x in ("--config", f)] + list(args.overrides)
        cfg = resolve_config(load_recipe(args.recipe)(), argv)
        path = stage(cfg)
    except (ConfigError, DataError, MaskDistillFileError, FileNotFoundError, TrainingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if path is None:
        print(f"dist-seg {args.command}: stopped early; re-run the same command to resume", file=sys.stderr)
    elif D.is_main_process():
        print(f"dist-seg {args.command}: wrote {path}")
    return 0
