"""Hyperparameter sweeps with Ray Tune, described by a YAML file (``recipes/sweep.yaml``).

``dist-seg sweep recipes/sweep.yaml [key=value ...] [--address ADDR] [--resume]``

Ray 2.x has no YAML front end, so the sweep file is parsed by :mod:`dist_seg.sweeps.spec`
(:func:`parse_sweep`) and mapped onto ``ray.tune`` search spaces here (:func:`search_space`); the MLflow
bookkeeping of trials is :mod:`dist_seg.sweeps.runs`. This module is the Ray plumbing and the command.

Every trial is a real training run: the base recipe's config, the sweep's fixed ``overrides`` and the
trial's sampled values are merged and handed to :func:`dist_seg.trainer.train`, which reports every
validation to Tune (so ASHA can stop bad trials early) and logs to MLflow as a run nested under one
parent run per sweep. A trial that raises is recorded as a FAILED MLflow run carrying its error and does
not stop the sweep. ``--resume`` continues an interrupted sweep with ``tune.Tuner.restore``; unfinished
trials resume from their own checkpoints.

Paths: trials keep the driver's working directory (``RAY_CHDIR_TO_TRIAL_DIR=0``), so relative paths in a
recipe (``data.root``) mean the same thing in every trial, including under ``ray job submit
--working-dir .``. The MLflow tracking URI is made absolute because the trials of a local cluster share
it with the driver.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dist_seg.config import ConfigError, RunConfig, from_yaml, to_dict
from dist_seg.runtime import SOURCE_ENV

# The sweep file and the MLflow bookkeeping live in dist_seg.sweeps; their public names stay importable here.
from dist_seg.sweeps.preflight import check_sweep_data, check_trial_fits
from dist_seg.sweeps.runs import (  # noqa: F401
    _client,
    _find_trial_run,
    _record_trial,
    absolute_tracking_uri,
    mark_interrupted,
    reconcile_runs,
    trial_tags,
)
from dist_seg.sweeps.spec import (  # noqa: F401
    DISTRIBUTIONS,
    METHOD_SECTIONS,
    RESERVED,
    SCHEDULERS,
    SEARCHERS,
    TRAINABLE_NAME,
    BudgetSpec,
    ParamSpec,
    ResourceSpec,
    SchedulerSpec,
    SweepError,
    SweepSpec,
    TrackingSpec,
    TrialContext,
    _absolute_storage,
    _fmt,
    _resolve_trial_config,
    _spec_dict,
    base_config,
    load_sweep_dict,
    parse_sweep,
    recipe_path,
    recipe_search_dirs,
    space_params,
    trial_name,
    trial_overrides,
)

log = logging.getLogger("dist_seg.tune")

STATE_FILE = "dist_seg_sweep.json"


def search_space(spec: SweepSpec) -> dict:
    """The Ray Tune ``param_space``: ``{"stego.pos_intra_weight": tune.uniform(...), ...}``.

    ``randint: [a, b]`` follows Ray: ``a`` inclusive, ``b`` exclusive. With ``search: grid`` every
    ``choice`` is enumerated as a grid too.
    """
    from ray import tune

    space = {}
    for name, p in spec.params.items():
        a = p.args
        if p.kind == "uniform":
            space[name] = tune.uniform(float(a[0]), float(a[1]))
        elif p.kind == "loguniform":
            space[name] = tune.loguniform(float(a[0]), float(a[1]))
        elif p.kind == "quniform":
            space[name] = tune.quniform(float(a[0]), float(a[1]), float(a[2]))
        elif p.kind == "randint":
            space[name] = tune.randint(int(a[0]), int(a[1]))
        elif p.kind == "grid" or (p.kind == "choice" and spec.search == "grid"):
            space[name] = tune.grid_search(list(a))
        else:
            space[name] = tune.choice(list(a))
    return space


def _trial_output_dir() -> str:
    """The trial's persistent folder (``<storage>/<sweep>/<trial>/run``) when storage is local, so a
    restored sweep finds the trial's checkpoints; otherwise Tune's local trial folder."""
    from ray import tune

    context = tune.get_context()
    try:
        storage = context.get_storage()
        import pyarrow.fs

        if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return str(Path(storage.trial_fs_path) / "run")
    except Exception:  # noqa: BLE001 - developer API; fall back to the public local trial folder
        pass
    return str(Path(context.get_trial_dir()) / "run")


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Ray Tune function trainable: train one configuration, reporting every validation to Tune.

    A scheduler stops a trial by raising ``SystemExit`` inside ``tune.report``; such a trial is recorded
    in MLflow as KILLED with the tag ``sweep.early_stopped``. Any other exception marks the run FAILED with
    the error (tag ``error``, traceback in ``error.txt``) and is re-raised so Tune records it too.
    """
    from ray import tune

    from dist_seg.tracking import PARENT_RUN_ENV, RUN_TAGS_ENV

    # Relative paths of the recipe (data.root, ...) mean what they meant to the driver. Ray starts trial
    # processes in the directory where the cluster was started, which may differ from the driver's.
    if ctx.cwd and os.path.isdir(ctx.cwd):
        os.chdir(ctx.cwd)
    context = tune.get_context()
    run_name, trial_id = context.get_trial_name(), context.get_trial_id()
    output_dir = _trial_output_dir()
    overrides = trial_overrides(ctx, config, output_dir=output_dir, run_name=run_name)
    os.environ[PARENT_RUN_ENV] = ctx.parent_run_id
    # The trial's MLflow run is created with these tags (and its model carries them).
    os.environ[RUN_TAGS_ENV] = json.dumps(trial_tags(ctx, trial_id))
    os.environ[SOURCE_ENV] = f"{ctx.recipe or 'recipe'} (dist-seg sweep {ctx.sweep_name})"
    _restore_from_tune_checkpoint(output_dir)
    reported: list[int] = []
    final: dict = {}
    cfg: Optional[RunConfig] = None
    last_checkpoint: list[Optional[Path]] = [None]

    def checkpoint() -> Optional[Any]:
        """The trainer's newest checkpoint as a Tune checkpoint when it is new since the last report."""
        newest = _newest_checkpoint(output_dir)
        if newest is None or newest == last_checkpoint[0]:
            return None
        last_checkpoint[0] = newest
        return _tune_checkpoint(output_dir, newest)

    def on_eval(step: int, metrics: dict) -> None:
        reported.append(int(step))
        result = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        if step >= cfg.train.num_steps:
            # The last validation is reported once train() has returned: a scheduler's stop decision must
            # not interrupt the final checkpoint and reports of a trial that already ran every step.
            final.update(result)
        else:
            tune.report(result, checkpoint=checkpoint())

    try:
        cfg = _resolve_trial_config(ctx, overrides)
        if ctx.trial_workers > 1:
            _train_with_workers(cfg, ctx, run_name)
        else:
            from dist_seg.trainer import train

            train(cfg, on_eval=on_eval)
            if not reported:
                raise SweepError(f"the trial finished without reporting '{ctx.metric}': the run has no labelled "
                                 f"validation split (set data.val_split) or never validated")
    except SystemExit as err:
        if err.code not in (None, 0):
            _record_trial(ctx, run_name, trial_id, overrides=overrides, error=err)
        else:
            # Tune stopped the trial: its scheduler, the time budget, or an interrupted sweep. Only the driver
            # knows which; it tags the run (sweep.early_stopped / sweep.interrupted) in reconcile_runs.
            _record_trial(ctx, run_name, trial_id, overrides=overrides, stopped_at=reported[-1] if reported else 0)
        raise
    except BaseException as err:
        _record_trial(ctx, run_name, trial_id, overrides=overrides, error=err)
        raise
    _record_trial(ctx, run_name, trial_id, overrides=overrides)
    if final:
        tune.report(final, checkpoint=checkpoint())


def _newest_checkpoint(output_dir: str) -> Optional[Path]:
    from dist_seg.trainer import CKPT_DIR

    found = sorted((Path(output_dir) / CKPT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


def _tune_checkpoint(output_dir: str, path: Path):
    """``tune.Checkpoint`` of one trainer checkpoint plus the trial's MLflow run id (``mlflow_run.json``), so
    that ``Result.checkpoint`` works and a trial restored on another node continues its own MLflow run."""
    import shutil
    import tempfile

    from ray import tune

    from dist_seg.tracking import RUN_ID_FILE

    folder = Path(tempfile.mkdtemp(prefix="dist_seg_ckpt_"))
    shutil.copy2(path, folder / path.name)
    if (Path(output_dir) / RUN_ID_FILE).is_file():
        shutil.copy2(Path(output_dir) / RUN_ID_FILE, folder / RUN_ID_FILE)
    return tune.Checkpoint.from_directory(str(folder))


def _restore_from_tune_checkpoint(output_dir: str) -> None:
    """A restored trial whose output folder lacks its checkpoints (Tune storage on s3, a trial moved to another
    node) gets them back from the checkpoint it last reported to Tune; a local folder is already complete."""
    import shutil

    from ray import tune

    from dist_seg.tracking import RUN_ID_FILE
    from dist_seg.trainer import CKPT_DIR

    restored = tune.get_checkpoint()
    if restored is None or _newest_checkpoint(output_dir) is not None:
        return
    with restored.as_directory() as folder:
        for item in Path(folder).iterdir():
            target = Path(output_dir) / (RUN_ID_FILE if item.name == RUN_ID_FILE else f"{CKPT_DIR}/{item.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)
    log.info("restored %s from Tune's checkpoint %s", output_dir, restored.path)


def _train_with_workers(cfg: RunConfig, ctx: TrialContext, run_name: str) -> None:
    """Run one trial as a Ray Train ``TorchTrainer`` over ``trial_workers`` processes (one per GPU).

    Ray Train starts the workers, sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` and the process group,
    which Accelerate then uses; the workers' reports reach Tune through ``TuneReportCallback``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from dist_seg.tracking import RUN_TAGS_ENV

    gpu = ctx.resources.get("gpu", 0)
    per_worker = {"CPU": ctx.resources.get("cpu", 1)}
    if gpu:
        per_worker["GPU"] = gpu
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": to_dict(cfg), "parent_run_id": ctx.parent_run_id, "use_gpu": bool(gpu),
                           "cwd": os.getcwd(), "source": os.environ.get(SOURCE_ENV, ""),
                           "run_tags": os.environ.get(RUN_TAGS_ENV, "")},
        scaling_config=ray.train.ScalingConfig(num_workers=ctx.trial_workers, use_gpu=bool(gpu),
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name=f"{run_name}-workers",
                                       storage_path=str(Path(cfg.train.output_dir).parent / "ray_train"),
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _worker_loop(loop_config: dict) -> None:
    """One Ray Train worker of a multi-process trial.

    ``ray.train.report`` is a barrier: every rank must call it equally often. The trainer's ``on_eval``
    runs on the main process only unless it declares ``ON_EVAL_EVERY_RANK``, so by default each rank
    reports once, the final validation scores that ``train`` returns on every rank (ASHA then sees one
    result per multi-worker trial); with ``ON_EVAL_EVERY_RANK`` every validation is reported.
    """
    import ray.train

    from dist_seg import trainer as trainer_module
    from dist_seg.tracking import PARENT_RUN_ENV, RUN_TAGS_ENV

    if os.path.isdir(loop_config["cwd"]):
        os.chdir(loop_config["cwd"])
    os.environ[PARENT_RUN_ENV] = loop_config["parent_run_id"]
    if loop_config.get("run_tags"):
        os.environ[RUN_TAGS_ENV] = loop_config["run_tags"]
    if loop_config.get("source"):
        os.environ[SOURCE_ENV] = loop_config["source"]
    if not loop_config["use_gpu"]:
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    cfg = from_yaml(RunConfig, yaml.safe_dump(loop_config["config"]))
    every_rank = bool(getattr(trainer_module, "ON_EVAL_EVERY_RANK", False))

    def on_eval(step: int, metrics: dict) -> None:
        if every_rank and step < cfg.train.num_steps:
            ray.train.report({"step": int(step), **{k: float(v) for k, v in metrics.items()}})

    result = trainer_module.train(cfg, on_eval=on_eval)
    scores = result.get("metrics") or {}
    ray.train.report({"step": int(result["step"]), **{f"val/{k}": float(v) for k, v in scores.items()
                                                      if isinstance(v, (int, float))}})


def _make_callback(ctx: TrialContext):
    from ray import tune

    class MlflowTrialErrors(tune.Callback):
        """Records trials whose process died before it could record anything itself (killed, out of memory)."""

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ARG002
            client = _client(ctx.tracking_uri)
            exp = client.get_experiment_by_name(ctx.experiment)
            run = exp and _find_trial_run(client, exp.experiment_id, ctx.parent_run_id, trial.trial_id)
            if run is None or run.info.status == "RUNNING":
                text = getattr(trial, "error_file", None) or "the trial process ended abnormally"
                _record_trial(ctx, str(trial), trial.trial_id, overrides=[], error_text=f"see {text}")

    return MlflowTrialErrors()


@dataclass(kw_only=True)
class SweepResult:
    """Outcome of :func:`run_sweep`."""

    experiment_path: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    num_trials: int
    num_errors: int
    best_trial: Optional[str] = None
    best_trial_id: Optional[str] = None
    best_metric: Optional[float] = None
    best_config: dict = field(default_factory=dict)
    best_overrides: list[str] = field(default_factory=list)
    command: Optional[str] = None
    results: Any = None
    interrupted: bool = False
    num_unfinished: int = 0
    num_started: int = 0
    best_run_id: Optional[str] = None


def _build_knn_table(config: dict, cwd: str) -> str:
    """Ray task: the KNN table of the sweep's base config, built once before any trial starts."""
    import torch

    from dist_seg.knn_table import ensure_knn_table, table_path
    from dist_seg.runtime import default_cache_dir

    if os.path.isdir(cwd):
        os.chdir(cwd)
    cfg = from_yaml(RunConfig, yaml.safe_dump(config))
    cache = (cfg.data.feature_cache or default_cache_dir(cfg)) if cfg.train.mode == "cached" else None
    ensure_knn_table(cfg, cache=cache, device="cuda" if torch.cuda.is_available() else "cpu")
    return str(table_path(cfg))


# Config keys a KNN table depends on.
TABLE_INPUTS = ("data.", "backbone.", "train.mode")


def prepare_shared_inputs(spec: SweepSpec, base: RunConfig) -> None:
    """Build what every trial reads but none should build alone: the KNN table of methods with partners.

    Without this, the first trials would all build the same table at once. It runs as one Ray task with a
    trial's resources. Trials whose sampled values change the table's inputs (dataset, backbone, resolution)
    still build their own.
    """
    import ray

    from dist_seg.knn_table import table_path
    from dist_seg.methods import method_class

    if not getattr(method_class(base.method), "needs_partners", True):
        return
    varied = [name for name in spec.params if name.startswith(TABLE_INPUTS)]
    if varied:  # every trial may need another table: leave it to them
        return
    if table_path(base).is_file():
        return
    log.info("building the KNN table %s once for all trials", table_path(base))
    task = ray.remote(_build_knn_table).options(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu)
    try:
        ray.get(task.remote(to_dict(base), os.getcwd()))
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None) or err
        raise SweepError(f"could not build the KNN table for the sweep's recipe: {cause}") from None


def _write_state(path: str, state: dict) -> None:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{STATE_FILE}") as f:
        f.write(json.dumps(state, indent=1).encode())


def _read_state(path: str) -> Optional[dict]:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))
    if fs.get_file_info(f"{root}/{STATE_FILE}").type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{root}/{STATE_FILE}") as f:
        return json.loads(f.read().decode())


def _scheduler(spec: SweepSpec, num_steps: int):
    if spec.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = spec.scheduler.max_t or num_steps
    if spec.scheduler.grace_period >= max_t:
        raise SweepError(f"scheduler.grace_period={spec.scheduler.grace_period} must be below max_t={max_t} "
                         f"(in {spec.scheduler.time_attr} units), or use scheduler.type=none")
    return ASHAScheduler(time_attr=spec.scheduler.time_attr, max_t=max_t, grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor)


def _searcher(spec: SweepSpec):
    if spec.search == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise SweepError("search: optuna needs Optuna: `pip install optuna` (or dist_seg[tune]), "
                             "or use search: random") from None
        return OptunaSearch(metric=spec.metric, mode=spec.mode, seed=spec.seed)
    from ray.tune.search import BasicVariantGenerator

    # Ray ignores TuneConfig.max_concurrent_trials (with a warning) when search_alg is a BasicVariantGenerator:
    # the cap has to be the generator's own.
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials or 0)


def _trainable(spec: SweepSpec, ctx: TrialContext):
    from ray import tune

    trainable = tune.with_parameters(run_trial, ctx=ctx)
    # A multi-worker trial only coordinates; its TorchTrainer workers hold the CPUs/GPUs. Ray refuses an
    # empty request, and even a sliver of a CPU would keep the workers of a full node from being placed, so
    # the coordinator asks for a token amount of memory instead.
    resources = ({"cpu": 0, "memory": 2 ** 20} if spec.trial_workers > 1
                 else {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    trainable = tune.with_resources(trainable, resources)
    trainable.__name__ = TRAINABLE_NAME
    return trainable


def _init_ray(address: Optional[str], num_cpus: Optional[int], num_gpus: Optional[int]) -> bool:
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: join that cluster
        ray.init()
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus)
    return True


def planned_trials(spec: SweepSpec) -> int:
    """How many trials the sweep runs: ``num_samples`` times the size of its grid (Tune creates them lazily)."""
    import math

    grids = [len(p.args) for p in spec.params.values()
             if p.kind == "grid" or (p.kind == "choice" and spec.search == "grid")]
    return spec.num_samples * math.prod(grids)


def _trial_name(trial) -> str:
    """Tune's ``trial_name_creator``: :func:`dist_seg.sweeps.spec.trial_name` (also the MLflow run name)."""
    return trial_name(trial.trial_id, trial.config)


def _sweep_description(spec: SweepSpec) -> str:
    searched = ", ".join(f"{name} {p.kind}{list(p.args)}" for name, p in spec.params.items())
    scheduler = "no early stopping" if spec.scheduler.type == "none" else (
        f"ASHA early stopping (grace {spec.scheduler.grace_period} {spec.scheduler.time_attr}s, "
        f"reduction factor {spec.scheduler.reduction_factor})")
    return (f"Ray Tune sweep '{spec.name}' of {recipe_path(spec)}: {spec.num_samples} sample(s), {spec.search} search, "
            f"{scheduler}, selecting on {spec.metric} ({spec.mode}). Searched: {searched}. Every trial is a run nested "
            f"under this one (tags sweep.trial_id, sweep.name) with its own logged model; at the end this run holds "
            f"best/{spec.metric} and the tags sweep.best_trial, sweep.best_run_id, sweep.best_overrides. The sweep "
            f"file is the artifact sweep.yaml (with command-line changes applied), the search space the space.* "
            f"params.")


def _create_parent_run(client, experiment_id: str, spec: SweepSpec, sweep_file: Optional[str]) -> str:
    """The sweep's MLflow run, recorded like a training run: description, source and git tags, the sweep's
    settings and search space as params, the sweep file as an artifact."""
    from mlflow.entities import Param

    from dist_seg.tracking import git_tags, source_name

    source = str(Path(sweep_file).resolve()) if sweep_file and Path(sweep_file).is_file() else source_name()
    tags = {"sweep.name": spec.name, "sweep.recipe": spec.recipe, "mlflow.note.content": _sweep_description(spec),
            "mlflow.source.name": source, "mlflow.source.type": "LOCAL",
            **git_tags(Path(__file__).resolve().parent)}
    run_id = client.create_run(experiment_id, run_name=spec.name, tags=tags).info.run_id
    params = {"sweep.metric": spec.metric, "sweep.mode": spec.mode, "sweep.search": spec.search,
              "sweep.num_samples": spec.num_samples, "sweep.scheduler": spec.scheduler.type, **space_params(spec)}
    if spec.seed is not None:
        params["sweep.seed"] = spec.seed
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run_id, yaml.safe_dump(_spec_dict(spec), sort_keys=False), "sweep.yaml")
    if sweep_file and Path(sweep_file).is_file():
        client.log_artifact(run_id, str(sweep_file), "sweep_file")
    return run_id


class _RayNotes(logging.Filter):
    """Drops two of Tune's log lines that are wrong or redundant for ``dist-seg sweep``: its own resume hint after
    an interruption (``Tuner.restore(...)``: our command resumes with the MLflow context) and the warning that the
    results of a trial that was stopped before its first report cannot be read (it has none yet)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Experiment has been interrupted"):
            return False
        if message.startswith("Failed to fetch metrics for"):
            failures = [line for line in message.splitlines()[1:] if line.strip()]
            return not all("Could not fetch metrics for" in line for line in failures)
        return True


@contextlib.contextmanager
def _quiet_ray_notes():
    """:class:`_RayNotes` on the loggers of ``ray.tune.tune`` and ``ray.tune.analysis`` (standard logging
    filters: every other record of theirs passes)."""
    loggers = [logging.getLogger(name) for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")]
    note = _RayNotes()
    for logger in loggers:
        logger.addFilter(note)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(note)


def run_sweep(spec: SweepSpec, *, address: Optional[str] = None, resume: bool = False, retry_failed: bool = False,
              num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
              sweep_file: Optional[str] = None) -> SweepResult:
    """Run (or resume) a sweep with Ray Tune and return the best trial.

    Args:
        spec: the parsed sweep (:func:`parse_sweep`).
        address: an existing Ray cluster (``ray.init(address=...)``); ``None`` starts a local one, or joins
            ``$RAY_ADDRESS`` (set by ``ray job submit``). Ignored when Ray is already initialised.
        resume: continue the sweep stored at ``spec.experiment_path`` (``tune.Tuner.restore``).
        retry_failed: with ``resume``, also re-run trials that errored (they resume from their last
            checkpoint).
        num_cpus, num_gpus: size of a local cluster started here.
        sweep_file: the sweep file ``spec`` was read from: logged as an artifact of the sweep's MLflow run and
            named as its source.

    Returns:
        A :class:`SweepResult`; ``best_*`` fields are empty when no trial reported the metric.

    Raises:
        SweepError: the sweep already exists (without ``resume``) or there is nothing to resume.
        ConfigError: the recipe or the fixed overrides do not make a valid config.
    """
    from ray import tune

    from dist_seg.tracking import tracking_uri as default_uri

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    exp_path = spec.experiment_path
    state = _read_state(exp_path)
    if resume:
        if state is None or not tune.Tuner.can_restore(exp_path):
            raise SweepError(f"nothing to resume at {exp_path}: run the sweep without --resume first "
                             f"(or give the same name= / storage_path= as the interrupted sweep)")
        spec = parse_sweep(state["sweep"])
        base = from_yaml(RunConfig, yaml.safe_dump(state["base_config"]))
        uri, experiment = state["tracking_uri"], state["experiment"]
    else:
        if state is not None or tune.Tuner.can_restore(exp_path):
            raise SweepError(f"a sweep named '{spec.name}' already exists at {exp_path}: pass --resume to continue "
                             f"it, or choose another name (name=...) or storage_path")
        base = base_config(spec)
        uri = absolute_tracking_uri(spec.tracking.uri or default_uri(base.tracking.uri))
        experiment = spec.tracking.experiment or base.tracking.experiment

    check_sweep_data(spec, base)  # before Ray starts: a missing dataset is named at once
    own_ray = _init_ray(address, num_cpus, num_gpus)
    try:
        check_trial_fits(spec, can_grow=not own_ray or bool(address or os.environ.get("RAY_ADDRESS")))
    except SweepError:
        if own_ray:
            import ray

            ray.shutdown()
        raise
    client = _client(uri)
    parent_run_id: Optional[str] = None
    try:
        if resume:
            parent_run_id = state["parent_run_id"]
            client.update_run(parent_run_id, status="RUNNING")
            if "sweep.interrupted" in client.get_run(parent_run_id).data.tags:
                client.delete_tag(parent_run_id, "sweep.interrupted")
        else:
            exp = client.get_experiment_by_name(experiment)
            experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
            parent_run_id = _create_parent_run(client, experiment_id, spec, sweep_file)
            _write_state(exp_path, {"sweep": _spec_dict(spec), "base_config": to_dict(base),
                                    "parent_run_id": parent_run_id, "tracking_uri": uri, "experiment": experiment,
                                    "cwd": os.getcwd()})
        ctx = TrialContext(base_config=to_dict(base), fixed_overrides=[], parent_run_id=parent_run_id,
                           tracking_uri=uri, experiment=experiment, sweep_name=spec.name, metric=spec.metric,
                           trial_workers=spec.trial_workers,
                           resources={"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
                           cwd=state["cwd"] if resume else os.getcwd(), recipe=recipe_path(spec))
        if not resume:
            prepare_shared_inputs(spec, base)
        trainable = _trainable(spec, ctx)
        run_config = tune.RunConfig(
            name=spec.name, storage_path=_absolute_storage(spec.storage_path),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures, fail_fast=False),
            callbacks=[_make_callback(ctx)], verbose=spec.verbose,
            # Trials report the trainer's checkpoints (Result.checkpoint); Tune keeps the newest two per trial.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
        if resume:
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=retry_failed)
        else:
            tuner = tune.Tuner(
                trainable, param_space=search_space(spec), run_config=run_config,
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                            search_alg=_searcher(spec),
                                            scheduler=_scheduler(spec, base.train.num_steps),
                                            # a BasicVariantGenerator carries the cap itself (_searcher)
                                            max_concurrent_trials=spec.max_concurrent_trials
                                            if spec.search == "optuna" else None,
                                            reuse_actors=spec.reuse_actors,
                                            time_budget_s=spec.budget.time_budget_s,
                                            trial_name_creator=_trial_name))
        with _stop_on_signals() as signalled, _quiet_ray_notes():
            grid = tuner.fit()
        unfinished = _unfinished_trials(grid)
        if signalled.is_set() or unfinished:
            # Ctrl-C / SIGTERM: Tune stopped its loop and the trials and saved its state. The runs of trials
            # that had not run all their steps are interrupted, whatever Tune's last word on them was; the end of
            # the resumed sweep settles them (reconcile_runs).
            marked = mark_interrupted(ctx)
            client.set_tag(parent_run_id, "sweep.interrupted", "true")
            client.set_terminated(parent_run_id, status="KILLED")
            # Started: the trials with an MLflow run (a trial creates it as it starts training).
            started = len(client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                             filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                             max_results=10000))
            return SweepResult(experiment_path=exp_path, parent_run_id=parent_run_id, tracking_uri=uri,
                               experiment=experiment, num_trials=len(grid), num_errors=grid.num_errors,
                               results=grid, interrupted=True, num_unfinished=len(marked), num_started=started)
        reconcile_runs(grid, ctx, num_steps=base.train.num_steps, scheduler=spec.scheduler.type)
        result = _summarise(spec, grid, base, exp_path=exp_path, parent_run_id=parent_run_id, uri=uri,
                            experiment=experiment)
        if result.best_trial is not None:
            client.log_metric(parent_run_id, f"best/{spec.metric}", result.best_metric)
            client.set_tag(parent_run_id, "sweep.best_trial", result.best_trial)
            best_run = _find_trial_run(client, client.get_run(parent_run_id).info.experiment_id, parent_run_id,
                                       result.best_trial_id)
            if best_run is not None:
                result.best_run_id = best_run.info.run_id
                client.set_tag(parent_run_id, "sweep.best_run_id", best_run.info.run_id)
            client.set_tag(parent_run_id, "sweep.best_overrides", " ".join(result.best_overrides)[:4900])
        client.set_tag(parent_run_id, "sweep.num_errors", str(result.num_errors))
        client.set_terminated(parent_run_id, status="FINISHED" if result.best_trial is not None else "FAILED")
        return result
    except BaseException as err:
        if parent_run_id is not None:
            if isinstance(err, KeyboardInterrupt):  # a second Ctrl-C: Tune could not stop gracefully
                mark_interrupted(ctx)
                client.set_tag(parent_run_id, "sweep.interrupted", "true")
            client.set_terminated(parent_run_id, status="KILLED")
        raise
    finally:
        if own_ray:
            import ray

            ray.shutdown()


@contextlib.contextmanager
def _stop_on_signals():
    """While Tune runs: SIGTERM stops the sweep like Ctrl-C (Tune's own SIGINT handler: stop the loop and the
    trials, save the experiment state). Yields an event that is set when a signal arrived."""
    import signal
    import threading

    signalled = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield signalled
        return

    def on_signal(signum, frame):
        signalled.set()
        tune_handler = signal.getsignal(signal.SIGINT)
        if callable(tune_handler) and tune_handler not in (on_signal, signal.default_int_handler):
            tune_handler(signum, frame)  # Tune's graceful stop, installed while its loop runs
        else:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signalled
        # Tune handles the first Ctrl-C itself (it never reaches on_signal) and then reinstalls the handler it
        # found, ours: that is how a SIGINT that Tune absorbed shows.
        tune_catches = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        if tune_catches and signal.getsignal(signal.SIGINT) is on_signal:
            signalled.set()
    finally:
        # Tune replaces our SIGINT handler while it runs; its handler may still be installed.
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _unfinished_trials(grid) -> set[str]:
    """Ids of the trials Tune neither finished nor failed (running or pending when the sweep was stopped)."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}


def _summarise(spec: SweepSpec, grid, base: RunConfig, *, exp_path: str, parent_run_id: str, uri: str,
               experiment: str) -> SweepResult:
    result = SweepResult(experiment_path=exp_path, parent_run_id=parent_run_id, tracking_uri=uri,
                         experiment=experiment, num_trials=len(grid), num_errors=grid.num_errors, results=grid)
    try:
        best = grid.get_best_result(metric=spec.metric, mode=spec.mode, scope="last")
    except RuntimeError:
        return result
    if best.metrics is None or spec.metric not in best.metrics:
        return result
    result.best_trial_id = str(best.metrics.get("trial_id", Path(best.path).name))
    result.best_trial = trial_name(result.best_trial_id, best.config)
    result.best_metric = float(best.metrics[spec.metric])
    result.best_config = {k: best.config[k] for k in sorted(best.config)}
    result.best_overrides = [f"{k}={_fmt(v)}" for k, v in result.best_config.items()]
    fixed = list(spec.overrides) + ([f"train.num_steps={spec.budget.max_steps}"] if spec.budget.max_steps else [])
    result.command = " ".join(["dist-seg train", recipe_path(spec), *fixed, *result.best_overrides])
    return result


def metric_agreement(frame, x: str = "val/label_free", y: str = "val/cluster_mIoU") -> Optional[tuple[float, int]]:
    """Spearman rank correlation of two metrics across trials (each trial's last report).

    Checks, on data that has labels, whether a label-free selection metric ranks trials like the labelled
    one. Returns ``(rho, number of trials)``, or ``None`` when fewer than 3 trials report both.
    """
    from scipy.stats import spearmanr

    if frame is None or x not in frame or y not in frame:
        return None
    both = frame[[x, y]].dropna()
    if len(both) < 3 or both[x].nunique() < 2 or both[y].nunique() < 2:
        return None
    return float(spearmanr(both[x], both[y]).statistic), len(both)


def format_result(spec: SweepSpec, result: SweepResult, *, resume_command: Optional[str] = None) -> str:
    """Human-readable end-of-sweep report: the trials table and the best configuration as overrides.

    An interrupted sweep gets no best trial (nothing finished) but the command that resumes it."""
    if result.interrupted:
        command = resume_command or "dist-seg sweep SWEEP_FILE --resume"
        waiting = planned_trials(spec) - result.num_started
        lines = [f"sweep '{spec.name}' INTERRUPTED: {result.num_unfinished} of the {result.num_started} trials "
                 f"started did not finish (MLflow runs KILLED, tag sweep.interrupted=true)"
                 + (f", {waiting} not started; " if waiting > 0 else "; ") +
                 f"state in {result.experiment_path}; MLflow parent run {result.parent_run_id} "
                 f"(experiment '{result.experiment}' at {result.tracking_uri})"]
    else:
        lines = [f"sweep '{spec.name}': {result.num_trials} trials, {result.num_errors} failed; "
                 f"state in {result.experiment_path}; MLflow parent run {result.parent_run_id} "
                 f"(experiment '{result.experiment}' at {result.tracking_uri})"]
    # The trials' table is `dist-seg runs`' table of the sweep's MLflow runs, sorted by the sweep's metric.
    from dist_seg.tracking import RunsError, format_runs, search

    try:
        trials = search(result.experiment, uri=result.tracking_uri,
                        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
        lines.append(format_runs(trials, sort=spec.metric, ascending=spec.mode == "min"))
    except RunsError as err:
        lines.append(f"(no trial runs to list: {err})")
    grid = result.results
    if grid is not None:
        frame = grid.get_dataframe()
        if not frame.empty:
            agreement = metric_agreement(frame)
            if agreement is not None:
                lines.append(f"label-free vs labelled selection: Spearman rho(val/label_free, val/cluster_mIoU) = "
                             f"{agreement[0]:.3f} over {agreement[1]} trials")
    if result.interrupted:
        lines.append(f"resume with: {command}")
    elif result.best_trial is None:
        lines.append(f"no trial reported {spec.metric}; see the errors above and in MLflow (tag 'error')")
    else:
        lines.append(f"best trial {result.best_trial}: {spec.metric} = {result.best_metric:.4f}")
        lines.append("best overrides: " + " ".join(result.best_overrides))
        lines.append("reproduce: " + result.command)
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file, e.g. recipes/sweep.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="changes to the sweep file itself: num_samples=2 scheduler.type=none "
                             "'params.stego.lr={loguniform: [1e-4, 1e-2]}'; a run config key for every trial "
                             "goes through overrides+=, e.g. overrides+=data.root=/data/coco")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. ray://head:10001 or auto); default: a local cluster, or "
                             "$RAY_ADDRESS under `ray job submit`")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume, also re-run failed trials")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started here")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs of a local Ray cluster started here")


def run(args: argparse.Namespace) -> int:
    from dist_seg.runtime import setup_logging

    setup_logging()
    try:
        spec = parse_sweep(args.sweep, args.overrides)
        result = run_sweep(spec, address=args.address, resume=args.resume, retry_failed=args.retry_failed,
                           num_cpus=args.num_cpus, num_gpus=args.num_gpus, sweep_file=args.sweep)
    except (SweepError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resume = " ".join(["dist-seg sweep", shlex.quote(args.sweep), *map(shlex.quote, args.overrides), "--resume"])
    print(format_result(spec, result, resume_command=resume))
    if result.interrupted:
        return 130  # the shell's code for a run stopped by SIGINT
    return 0 if result.best_trial is not None else 1
