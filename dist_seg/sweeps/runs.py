"""MLflow bookkeeping of a sweep: one parent run per sweep, one nested run per trial, settled at the end.

The trainer opens each trial's run itself (nested through ``DIST_SEG_PARENT_RUN_ID``); these helpers tag
it with the trial, record a failure (creating the run if training never got that far) and bring every run
in line with Tune's outcome once the sweep has stopped (:func:`reconcile_runs`).
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import yaml

from dist_seg.config import flatten
from dist_seg.sweeps.spec import TRAINABLE_NAME, TrialContext, _resolve_trial_config

log = logging.getLogger("dist_seg.tune")


def absolute_tracking_uri(uri: str, cwd: Optional[str] = None) -> str:
    """``uri`` with a relative sqlite / file path made absolute against ``cwd``.

    Trials run in other processes (and Ray may start them elsewhere), so ``sqlite:///mlflow.db`` must
    name one file for all of them.
    """
    base = Path(cwd or os.getcwd())
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return uri if path.startswith("/") else "sqlite:///" + str((base / path).resolve())
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        return uri if path.startswith("/") else "file://" + str((base / path).resolve())
    if "://" not in uri and ":" not in uri.split("/")[0]:
        return str((base / uri).resolve())  # a plain local path (file store)
    return uri


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _find_trial_run(client, experiment_id: str, parent_run_id: str, run_name: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.mlflow.runName = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _record_trial(ctx: TrialContext, run_name: str, trial_id: str, *, overrides: Sequence[str],
                  error: Optional[BaseException] = None, error_text: Optional[str] = None,
                  stopped_at: Optional[int] = None) -> Optional[str]:
    """Tag the trial's MLflow run; on failure mark it FAILED with its error (creating it if training never
    got as far as starting its run); a trial stopped by the scheduler becomes KILLED with the tag
    ``sweep.early_stopped``. Never raises: tracking trouble must not hide the trial's own error."""
    try:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        client = _client(ctx.tracking_uri)
        exp = client.get_experiment_by_name(ctx.experiment)
        experiment_id = exp.experiment_id if exp else client.create_experiment(ctx.experiment)
        run = _find_trial_run(client, experiment_id, ctx.parent_run_id, run_name)
        if run is None:
            if error is None and error_text is None:
                return None
            run = client.create_run(experiment_id, run_name=run_name,
                                    tags={MLFLOW_PARENT_RUN_ID: ctx.parent_run_id})
            _log_trial_params(client, run.info.run_id, ctx, overrides)
        run_id = run.info.run_id
        client.set_tag(run_id, "sweep.trial_id", trial_id)
        client.set_tag(run_id, "sweep.name", ctx.sweep_name)
        if error is not None or error_text is not None:
            message = f"{type(error).__name__}: {error}" if error is not None else error_text
            client.set_tag(run_id, "error", message[:4900])
            if error is not None:
                client.set_tag(run_id, "error.type", type(error).__name__)
                client.log_text(run_id, "".join(traceback.format_exception(error)), "error.txt")
            client.set_terminated(run_id, status="FAILED")
        elif stopped_at is not None:
            client.set_tag(run_id, "sweep.early_stopped", "true")
            client.set_tag(run_id, "sweep.stopped_at_step", str(stopped_at))
            client.set_terminated(run_id, status="KILLED")
        return run_id
    except Exception as err:  # noqa: BLE001 - see docstring
        log.warning("could not record trial %s in MLflow: %s", run_name, err)
        return None


def _log_trial_params(client, run_id: str, ctx: TrialContext, overrides: Sequence[str]) -> None:
    """Log a trial's parameters like the trainer does (its full flattened config) on a run it never started."""
    from mlflow.entities import Param

    try:
        params = flatten(_resolve_trial_config(ctx, overrides))
    except Exception:  # noqa: BLE001 - the config itself may be what failed: log the raw overrides
        params = {}
        for item in overrides:
            key, value = item.split("=", 1)
            try:
                params[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                params[key] = value
    client.log_batch(run_id, params=[Param(k, str("None" if v is None else v)[:6000]) for k, v in params.items()])


def reconcile_runs(grid, ctx: TrialContext, *, num_steps: int) -> None:
    """Bring every trial's MLflow run in line with Tune's outcome once the sweep has stopped.

    A trial that a scheduler (or the time budget) stopped is interrupted inside training, possibly while
    it was still writing to MLflow, so its run is settled here: KILLED with ``sweep.early_stopped=true``
    and the last reported step. Trials that errored keep FAILED (with an ``error`` tag).
    """
    client = _client(ctx.tracking_uri)
    exp = client.get_experiment_by_name(ctx.experiment)
    if exp is None:
        return
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id")
        if trial_id is None:  # never reported: the trial (or the error callback) recorded it already
            continue
        run = _find_trial_run(client, exp.experiment_id, ctx.parent_run_id, f"{TRAINABLE_NAME}_{trial_id}")
        if run is None:
            continue
        run_id = run.info.run_id
        if result.error is not None:
            if "error" not in run.data.tags:
                client.set_tag(run_id, "error", f"{type(result.error).__name__}: {result.error}"[:4900])
            if run.info.status != "FAILED":
                client.set_terminated(run_id, status="FAILED")
        elif int(metrics.get("step", num_steps)) < num_steps:
            client.set_tag(run_id, "sweep.early_stopped", "true")
            client.set_tag(run_id, "sweep.stopped_at_step", str(int(metrics["step"])))
            client.set_terminated(run_id, status="KILLED")
        elif run.info.status != "FINISHED":
            client.set_terminated(run_id, status="FINISHED")
