"""MLflow tracking, and the ``dist-seg runs`` comparison table.

Tracking is on by default with MLflow's local default store (``sqlite:///mlflow.db`` in the working
directory); ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` point it elsewhere and ``tracking.enabled=false``
turns it off. Only the main process logs: a :class:`Tracker` built on another rank does nothing.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from dist_seg.config import TrackingConfig

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_RUN_ENV = "DIST_SEG_PARENT_RUN_ID"


def tracking_uri(cfg_uri: Optional[str] = None) -> str:
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class Tracker:
    """A thin wrapper over one MLflow run.

    Args:
        cfg: tracking section of the run config.
        active: False on non-main ranks (and when tracking is disabled): every call is a no-op.
        params: flat ``{"train.num_steps": ...}`` mapping logged as run parameters.
        tags: provenance tags (dataset, backbone, weights hash, ...).
    """

    def __init__(self, cfg: TrackingConfig, *, active: bool, params: Mapping[str, Any] = (),
                 tags: Mapping[str, str] = ()) -> None:
        self.active = bool(active and cfg.enabled)
        self.run_id: Optional[str] = None
        if not self.active:
            return
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(cfg.uri))
        mlflow.set_experiment(cfg.experiment)
        parent = os.environ.get(PARENT_RUN_ENV)
        run = mlflow.start_run(run_name=cfg.run_name, parent_run_id=parent or None, nested=bool(parent))
        self.run_id = run.info.run_id
        if params:
            # MLflow caps a param value at a few thousand characters; ours are short scalars.
            mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()})
        if tags:
            mlflow.set_tags(dict(tags))

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.active and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            self._mlflow.set_tags(dict(tags))

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            self._mlflow.end_run(status=status)
            self.run_id = None


# ------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default="dist_seg", help="MLflow experiment name")
    parser.add_argument("--uri", default=None, help=f"tracking URI (default: $MLFLOW_TRACKING_URI or {DEFAULT_URI})")
    parser.add_argument("--sort", default="metrics.val/cluster_mIoU", help="column to sort by (descending)")
    parser.add_argument("--ascending", action="store_true", help="sort ascending (for losses)")
    parser.add_argument("--limit", type=int, default=20, help="rows to show")
    parser.add_argument("--best", action="store_true", help="print the best run's config as recipe overrides")
    parser.add_argument("--all-params", action="store_true", help="show every param, not only those that differ")


def runs_table(experiment: str, *, uri: Optional[str] = None, sort: str = "metrics.val/cluster_mIoU",
               ascending: bool = False, all_params: bool = False):
    """A pandas table of the experiment's runs: differing params, final metrics, duration."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    table = mlflow.search_runs(experiment_names=[experiment])
    if table.empty:
        return table
    if sort in table.columns:
        table = table.sort_values(sort, ascending=ascending, na_position="last")
    param_cols = [c for c in table.columns if c.startswith("params.")]
    if not all_params:
        param_cols = [c for c in param_cols if table[c].astype(str).nunique(dropna=False) > 1]
    metric_cols = [c for c in table.columns if c.startswith("metrics.") and ("val/" in c or "final/" in c)]
    table = table.assign(duration_s=(table["end_time"] - table["start_time"]).dt.total_seconds())
    keep = ["run_id", "tags.mlflow.runName", "status", "duration_s", *metric_cols, *param_cols]
    return table[[c for c in keep if c in table.columns]]


def best_overrides(table, *, exclude=("data.root", "train.output_dir", "tracking.")) -> list[str]:
    """Recipe overrides (``key=value``) of the first row of a sorted runs table."""
    row = table.iloc[0]
    out = []
    for col in table.columns:
        if col.startswith("params."):
            key = col[len("params."):]
            if not any(key.startswith(e) for e in exclude):
                out.append(f"{key}={row[col]}")
    return out


def run(args: argparse.Namespace) -> int:
    table = runs_table(args.experiment, uri=args.uri, sort=args.sort, ascending=args.ascending,
                       all_params=args.all_params or args.best)
    if table.empty:
        print(f"no runs in experiment '{args.experiment}' at {tracking_uri(args.uri)}")
        return 1
    import pandas as pd

    with pd.option_context("display.max_columns", 50, "display.width", 200):
        shown = table.head(args.limit)
        print(shown.drop(columns=[c for c in shown.columns if c.startswith("params.")] if args.best else [])
              .to_string(index=False))
    if args.best:
        print("\n# best run:", table.iloc[0]["run_id"])
        print(" ".join(best_overrides(table)))
    return 0
