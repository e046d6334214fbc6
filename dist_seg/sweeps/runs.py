"""MLflow bookkeeping of a sweep: one parent run per sweep, one nested run per trial, settled at the end.

The trainer opens each trial's run itself (nested through ``DIST_SEG_PARENT_RUN_ID``); these helpers tag
it with the trial, record a failure (creating the run if training never got that far) and bring every run
in line with Tune's outcome once the sweep has stopped (:func:`reconcile_runs`).
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Optional

import yaml

from dist_seg.sweeps.spec import TrialContext, _resolve_trial_config

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
    """The sweep's MLflow client: trials and the driver write to one store at once (see
    :func:`dist_seg.tracking.retry_on_conflict`)."""
    from dist_seg.tracking import ConflictSafeClient

    return ConflictSafeClient(uri)


def _find_trial_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    """The MLflow run of Tune trial ``trial_id`` (tag ``sweep.trial_id``, set when the run is created)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`sweep.trial_id` = '{trial_id}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def trial_tags(ctx: TrialContext, trial_id: str) -> dict[str, str]:
    """The tags every run of a trial carries from its creation on."""
    return {"sweep.trial_id": trial_id, "sweep.name": ctx.sweep_name}


def _record_trial(ctx: TrialContext, run_name: str, trial_id: str, *, overrides: Sequence[str],
                  error: Optional[BaseException] = None, error_text: Optional[str] = None,
                  stopped_at: Optional[int] = None) -> Optional[str]:
    """Tag the trial's MLflow run; on failure mark it FAILED with its error (creating it if training never
    got as far as starting its run, and recording that run in the trial's folder so that a retry continues
    it); a trial that Tune stopped (``stopped_at``) becomes KILLED with ``sweep.stopped_at_step`` (why it
    stopped, the driver tags in :func:`reconcile_runs`). Never raises: tracking trouble must not hide the
    trial's own error."""
    try:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        client = _client(ctx.tracking_uri)
        exp = client.get_experiment_by_name(ctx.experiment)
        experiment_id = exp.experiment_id if exp else client.create_experiment(ctx.experiment)
        run = _find_trial_run(client, experiment_id, ctx.parent_run_id, trial_id)
        if run is None:
            if error is None and error_text is None:
                return None
            run = client.create_run(experiment_id, run_name=run_name,
                                    tags={MLFLOW_PARENT_RUN_ID: ctx.parent_run_id, **trial_tags(ctx, trial_id)})
            _log_trial_params(client, run.info.run_id, ctx, overrides)
            _remember_run(overrides, run.info.run_id, experiment_id, ctx.tracking_uri)
        run_id = run.info.run_id
        if error is not None or error_text is not None:
            message = f"{type(error).__name__}: {error}" if error is not None else error_text
            client.set_tag(run_id, "error", message[:4900])
            if error is not None:
                client.set_tag(run_id, "error.type", type(error).__name__)
                client.log_text(run_id, "".join(traceback.format_exception(error)), "error.txt")
            client.set_terminated(run_id, status="FAILED")
        elif stopped_at is not None:
            client.set_tag(run_id, "sweep.stopped_at_step", str(stopped_at))
            client.set_terminated(run_id, status="KILLED")
        return run_id
    except Exception as err:  # noqa: BLE001 - see docstring
        log.warning("could not record trial %s in MLflow: %s", run_name, err)
        return None


def _remember_run(overrides: Sequence[str], run_id: str, experiment_id: str, uri: str) -> None:
    """Write ``mlflow_run.json`` into the trial's output folder, as the trainer's Tracker does."""
    import json

    from dist_seg.tracking import RUN_ID_FILE

    output_dir = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("train.output_dir=")), None)
    if output_dir:
        path = Path(yaml.safe_load(output_dir)) / RUN_ID_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}))


def _log_trial_params(client, run_id: str, ctx: TrialContext, overrides: Sequence[str]) -> None:
    """Log a trial's parameters like the trainer does (:func:`dist_seg.tracking.run_params`) on a run it never
    started."""
    from mlflow.entities import Param

    from dist_seg.tracking import run_params

    try:
        params = run_params(_resolve_trial_config(ctx, overrides))
    except Exception:  # noqa: BLE001 - the config itself may be what failed: log the raw overrides
        params = {}
        for item in overrides:
            key, value = item.split("=", 1)
            try:
                params[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                params[key] = value
    from dist_seg.tracking import UNSET_PARAMS_TAG

    # As the Tracker does: None values are no params (a string "None"), they are listed in a tag.
    unset = sorted(k for k, v in params.items() if v is None)
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items() if v is not None])
    if unset:
        client.set_tag(run_id, UNSET_PARAMS_TAG, ", ".join(unset)[:4900])


def reconcile_runs(grid, ctx: TrialContext, *, num_steps: int, unfinished: Collection[str] = (),
                   scheduler: str = "asha") -> None:
    """Bring every trial's MLflow run in line with Tune's outcome once the sweep has stopped.

    A trial that Tune stopped before its last step is interrupted inside training, possibly while it was
    still writing to MLflow, so its run is settled here: KILLED with the last reported step, and
    ``sweep.early_stopped=true`` when the scheduler stopped it (``sweep.stopped_by=time_budget`` when
    ``scheduler`` is ``none``: only the time budget can have). Trials in ``unfinished`` (an interrupted sweep)
    are left to :func:`mark_interrupted`. Trials that errored keep FAILED (with an ``error`` tag).
    """
    client = _client(ctx.tracking_uri)
    exp = client.get_experiment_by_name(ctx.experiment)
    if exp is None:
        return
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id")
        if trial_id is None or trial_id in unfinished:  # never reported (recorded already), or interrupted
            continue
        if "step" not in metrics and result.error is None:  # Tune's bookkeeping only: nothing to settle by
            continue
        run = _find_trial_run(client, exp.experiment_id, ctx.parent_run_id, trial_id)
        if run is None:
            continue
        run_id = run.info.run_id
        if result.error is not None:
            if "error" not in run.data.tags:
                client.set_tag(run_id, "error", f"{type(result.error).__name__}: {result.error}"[:4900])
            if run.info.status != "FAILED":
                client.set_terminated(run_id, status="FAILED")
        elif int(metrics["step"]) < num_steps:
            if "sweep.interrupted" in run.data.tags:  # stopped before an interruption, settled on resume
                client.delete_tag(run_id, "sweep.interrupted")
            if scheduler == "none":
                client.set_tag(run_id, "sweep.stopped_by", "time_budget")
            else:
                client.set_tag(run_id, "sweep.early_stopped", "true")
            client.set_tag(run_id, "sweep.stopped_at_step", str(int(metrics["step"])))
            client.set_terminated(run_id, status="KILLED")
        elif run.info.status != "FINISHED":
            client.set_terminated(run_id, status="FINISHED")


def mark_interrupted(ctx: TrialContext) -> list[str]:
    """After Ctrl-C / SIGTERM: every trial run of the sweep that had not finished (RUNNING, or KILLED by the
    stop itself) becomes KILLED with ``sweep.interrupted=true``; ``dist-seg sweep --resume`` continues each in
    the same MLflow run. Returns the ids of the runs it marked."""
    client = _client(ctx.tracking_uri)
    exp = client.get_experiment_by_name(ctx.experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{ctx.parent_run_id}'",
                              max_results=10000)
    marked = []
    for run in runs:
        tags, status = run.data.tags, run.info.status
        if status == "FAILED" or {"sweep.early_stopped", "sweep.stopped_by"} & set(tags):
            continue
        planned = int(run.data.params.get("train.num_steps", 0) or 0)
        done = max((m.step for m in client.get_metric_history(run.info.run_id, "train/loss")), default=-1)
        # RUNNING (its process was stopped with the sweep), KILLED by the stop itself, or ended short of its steps
        if status in ("RUNNING", "KILLED") or done < planned:
            client.set_tag(run.info.run_id, "sweep.interrupted", "true")
            client.set_terminated(run.info.run_id, status="KILLED")
            marked.append(run.info.run_id)
    return marked
