"""Hyperparameter sweeps with Ray Tune, described by a YAML file (``recipes/sweep.yaml``).

``dist-seg sweep recipes/sweep.yaml [key=value ...] [--address ADDR] [--resume]``

Ray 2.x has no YAML front end, so the sweep file is mapped onto ``ray.tune`` search spaces here
(:func:`parse_sweep`, :func:`search_space`). Every trial is a real training run: the base recipe's
config, the sweep's fixed ``overrides`` and the trial's sampled values are merged and handed to
:func:`dist_seg.trainer.train`, which reports every validation to Tune (so ASHA can stop bad trials
early) and logs to MLflow as a run nested under one parent run per sweep. A trial that raises is recorded
as a FAILED MLflow run carrying its error and does not stop the sweep. ``--resume`` continues an
interrupted sweep with ``tune.Tuner.restore``; unfinished trials resume from their own checkpoints.

Paths: trials keep the driver's working directory (``RAY_CHDIR_TO_TRIAL_DIR=0``), so relative paths in a
recipe (``data.root``) mean the same thing in every trial, including under ``ray job submit
--working-dir .``. The MLflow tracking URI is made absolute because the trials of a local cluster share
it with the driver.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dist_seg.config import ConfigError, RunConfig, flatten, from_yaml, merge, to_dict

log = logging.getLogger("dist_seg.tune")

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid", "randint", "quniform")
SEARCHERS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "none")
# The sweep sets these itself for every trial (one output folder and one nested MLflow run per trial).
RESERVED = ("train.output_dir", "tracking.")
STATE_FILE = "dist_seg_sweep.json"
TRAINABLE_NAME = "dist_seg_trial"


class SweepError(ValueError):
    """A user-facing problem with a sweep file or a sweep's state; the message names the fix."""


# ------------------------------------------------------------------------------------------- spec
@dataclass(kw_only=True)
class ParamSpec:
    """One searched config key: ``name`` (dotted RunConfig key), distribution ``kind`` and its ``args``."""

    name: str
    kind: str
    args: list


@dataclass(kw_only=True)
class SchedulerSpec:
    """Trial scheduler. ``asha`` stops trials whose metric trails at the rungs ``grace_period``,
    ``grace_period·reduction_factor``, ... measured in ``time_attr`` units (``step`` = training steps, reported
    with every validation); ``max_t`` defaults to the trials' ``train.num_steps``."""

    type: str = "asha"
    time_attr: str = "step"
    grace_period: int = 1
    reduction_factor: float = 3.0
    max_t: Optional[int] = None


@dataclass(kw_only=True)
class ResourceSpec:
    """Resources of one trial (of each worker when ``trial_workers > 1``)."""

    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(kw_only=True)
class BudgetSpec:
    """Limits: ``time_budget_s`` for the whole sweep (Tune stops starting and running trials after it);
    ``max_steps`` sets every trial's ``train.num_steps``."""

    time_budget_s: Optional[float] = None
    max_steps: Optional[int] = None


@dataclass(kw_only=True)
class TrackingSpec:
    """Where the parent and trial runs go; ``None`` falls back to the recipe's ``tracking`` section."""

    uri: Optional[str] = None
    experiment: Optional[str] = None


@dataclass(kw_only=True)
class SweepSpec:
    """A parsed sweep file (see ``recipes/sweep.yaml`` for every field, documented)."""

    name: str
    recipe: str
    metric: str = "val/cluster_mIoU"
    mode: str = "max"
    search: str = "random"
    seed: Optional[int] = None
    num_samples: int = 1
    max_concurrent_trials: Optional[int] = None
    max_failures: int = 0
    reuse_actors: bool = False
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    trial_workers: int = 1
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    overrides: list[str] = field(default_factory=list)
    params: dict[str, ParamSpec] = field(default_factory=dict)
    storage_path: str = "runs/sweeps"
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    verbose: int = 1

    @property
    def experiment_path(self) -> str:
        """Where Tune keeps this sweep's state and trial folders."""
        return _join(_absolute_storage(self.storage_path), self.name)


_SECTIONS = {"scheduler": SchedulerSpec, "resources": ResourceSpec, "budget": BudgetSpec, "tracking": TrackingSpec}


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if "://" in base else str(Path(base) / name)


def _absolute_storage(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """Apply a ``key=value`` override of the sweep file; ``params.<config key>`` keeps its dots."""
    if key.startswith("params."):
        data.setdefault("params", {})
        if data["params"] is None:
            data["params"] = {}
        data["params"][key[len("params."):]] = value
        return
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(data: Mapping, cls, where: str) -> None:
    unknown = sorted(set(data) - set(_field_names(cls)))
    if unknown:
        raise SweepError(f"unknown key(s) {unknown} in {where}; allowed: {_field_names(cls)}")


def _typed(cls, data: Mapping, where: str):
    """Build ``cls`` from a mapping, with an error naming the entry on a wrong key or type."""
    import typing

    _check_keys(data, cls, where)
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        hint = hints[key]
        optional = type(None) in typing.get_args(hint)
        want = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
        if value is None:
            if not optional:
                raise SweepError(f"{where}.{key} may not be null")
        elif want is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise SweepError(f"{where}.{key} must be an integer, got {value!r}")
        elif want is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SweepError(f"{where}.{key} must be a number, got {value!r}")
            value = float(value)
        elif want is bool and not isinstance(value, bool):
            raise SweepError(f"{where}.{key} must be true or false, got {value!r}")
        elif want is str and not isinstance(value, str):
            raise SweepError(f"{where}.{key} must be a string, got {value!r}")
        out[key] = value
    return cls(**out)


def _fmt(value: Any) -> str:
    """A value as the right-hand side of a ``key=value`` config override (parsed back as YAML).

    Plain strings stay bare (``data.root=data/toy``) when YAML reads them back unchanged; anything else is
    written as JSON, which is valid YAML (``"true"`` for the string, ``true`` for the boolean).
    """
    if hasattr(value, "item"):  # numpy scalars from samplers
        value = value.item()
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        try:
            if yaml.safe_load(value) == value and "," not in value and "=" not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SweepError(f"{what} must be a finite number, got {value!r}")
    return value


def _config_field_type(key: str) -> type:
    """The Python type of a dotted RunConfig key, by dataclass introspection."""
    import typing

    cls: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            scope = ".".join(parts[:i]) or "RunConfig"
            raise SweepError(f"unknown config key '{key}': '{part}' is not a field of {scope} "
                             f"(fields: {sorted(hints)})")
        hint = hints[part]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
        if dataclasses.is_dataclass(base):
            if i == len(parts) - 1:
                raise SweepError(f"'{key}' is a config section, not a value: name a field such as "
                                 f"'{key}.{dataclasses.fields(base)[0].name}'")
            cls = base
        elif i < len(parts) - 1:
            raise SweepError(f"unknown config key '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
        else:
            return base
    raise AssertionError("unreachable")


def _check_value(key: str, value: Any, where: str) -> None:
    """Merge ``key=value`` onto a default RunConfig, so types and value constraints are checked now."""
    try:
        merge(RunConfig(), overrides=[f"{key}={_fmt(value)}"])
    except ConfigError as err:
        raise SweepError(f"{where}: {err}") from None


def _check_reserved(key: str, where: str) -> None:
    if any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESERVED):
        raise SweepError(f"{where}: '{key}' is set by the sweep for each trial; use the sweep file's "
                         f"`storage_path` / `tracking:` entries instead")


def _parse_param(name: str, spec: Any) -> ParamSpec:
    where = f"params.{name}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SweepError(f"{where} must be a one-entry mapping such as {{uniform: [0.1, 1.0]}}, got {spec!r}; "
                         f"distributions: {list(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SweepError(f"{where}: unknown distribution '{kind}'; use one of {list(DISTRIBUTIONS)}")
    _check_reserved(name, where)
    try:
        ftype = _config_field_type(name)
    except SweepError as err:
        raise SweepError(f"{where}: {err}") from None
    if not isinstance(args, list) or not args:
        raise SweepError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint", "quniform"):
        want = 3 if kind == "quniform" else 2
        if len(args) != want:
            form = "[low, high, q]" if kind == "quniform" else "[low, high]"
            raise SweepError(f"{where}: {kind} takes {form}, got {args!r}")
        for i, a in enumerate(args):
            _number(a, f"{where}: {kind} bound #{i + 1}")
        low, high = args[0], args[1]
        if not low < high:
            raise SweepError(f"{where}: {kind} needs low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise SweepError(f"{where}: loguniform needs 0 < low < high, got {args!r}")
        if kind == "quniform" and args[2] <= 0:
            raise SweepError(f"{where}: quniform step q must be positive, got {args[2]!r}")
        if kind == "randint":
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
                raise SweepError(f"{where}: randint bounds must be integers, got {args!r}")
            if ftype is not int:
                raise SweepError(f"{where}: randint samples integers but '{name}' is {ftype.__name__}")
            probes = [low, high - 1]
        else:
            if ftype is not float:
                raise SweepError(f"{where}: {kind} samples real numbers but '{name}' is {ftype.__name__}; "
                                 f"use randint or choice for it")
            probes = [float(low), float(high)]
    else:
        probes = list(args)
    for value in probes:
        _check_value(name, value, f"{where} (value {value!r})")
    return ParamSpec(name=name, kind=kind, args=list(args))


def load_sweep_dict(source: str | Path | Mapping) -> dict:
    """The raw mapping of a sweep file (or a copy of a given mapping)."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    path = Path(source)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path} (see recipes/sweep.yaml for the format)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path} must hold a mapping, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data


def parse_sweep(source: str | Path | Mapping, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read and validate a sweep description.

    Args:
        source: a YAML file path or an already-loaded mapping with the same layout.
        overrides: ``key=value`` changes to the sweep description itself (``num_samples=2``,
            ``scheduler.type=none``, ``params.stego.lr={loguniform: [1e-4, 1e-2]}``); values are YAML.

    Returns:
        The typed :class:`SweepSpec`. Every parameter and fixed override is checked against
        :class:`~dist_seg.config.RunConfig` (key exists, value type, value constraints).

    Raises:
        SweepError: naming the offending entry (unknown key or distribution, malformed bounds, ...).
    """
    data = load_sweep_dict(source)
    for item in overrides:
        if "=" not in item:
            raise SweepError(f"sweep override {item!r} must look like key=value (e.g. num_samples=2)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SweepError(f"sweep override {item!r}: value is not valid YAML ({err})") from None
        key = key.strip()
        if key.endswith("+"):  # `overrides+=train.seed=1` appends to a list instead of replacing it
            key = key[:-1].strip()
            current = data.get(key) or []
            if not isinstance(current, list):
                raise SweepError(f"sweep override {item!r}: '{key}' is not a list, so += cannot append to it")
            data[key] = [*current, text if key == "overrides" else value]
            continue
        _set_dotted(data, key, value)
    _check_keys(data, SweepSpec, "the sweep file")
    for key in ("name", "recipe"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise SweepError(f"the sweep file needs `{key}:` (a string)")
    sections = {}
    for key, cls in _SECTIONS.items():
        value = data.pop(key, None) or {}
        if not isinstance(value, Mapping):
            raise SweepError(f"`{key}:` must be a mapping, got {value!r}")
        sections[key] = _typed(cls, value, key)
    params_raw = data.pop("params", None) or {}
    if not isinstance(params_raw, Mapping):
        raise SweepError(f"`params:` must map config keys to distributions, got {params_raw!r}")
    fixed = data.pop("overrides", None) or []
    if isinstance(fixed, Mapping):  # also accept a mapping {key: value}
        fixed = [f"{k}={_fmt(v)}" for k, v in fixed.items()]
    if not isinstance(fixed, list) or not all(isinstance(x, str) and "=" in x for x in fixed):
        raise SweepError(f"`overrides:` must be a list of key=value strings, got {fixed!r}")
    spec = _typed(SweepSpec, data, "sweep")
    spec = dataclasses.replace(spec, **sections, overrides=list(fixed),
                               params={str(k): _parse_param(str(k), v) for k, v in params_raw.items()})
    _validate_spec(spec)
    return spec


def _validate_spec(spec: SweepSpec) -> None:
    if spec.mode not in ("max", "min"):
        raise SweepError(f"mode must be 'max' or 'min', got {spec.mode!r}")
    if spec.search not in SEARCHERS:
        raise SweepError(f"search must be one of {list(SEARCHERS)}, got {spec.search!r}")
    if spec.scheduler.type not in SCHEDULERS:
        raise SweepError(f"scheduler.type must be one of {list(SCHEDULERS)}, got {spec.scheduler.type!r}")
    if spec.num_samples < 1:
        raise SweepError(f"num_samples must be at least 1, got {spec.num_samples}")
    if spec.trial_workers < 1:
        raise SweepError(f"trial_workers must be at least 1, got {spec.trial_workers}")
    if spec.resources.cpu < 0 or spec.resources.gpu < 0:
        raise SweepError("resources.cpu and resources.gpu must not be negative")
    if spec.scheduler.grace_period < 1 or spec.scheduler.reduction_factor <= 1:
        raise SweepError("scheduler.grace_period must be >= 1 and scheduler.reduction_factor > 1")
    if spec.budget.max_steps is not None and spec.budget.max_steps < 1:
        raise SweepError(f"budget.max_steps must be positive, got {spec.budget.max_steps}")
    for item in spec.overrides:
        key, value = item.split("=", 1)
        _check_reserved(key.strip(), f"overrides entry {item!r}")
        if key.strip() in spec.params:
            raise SweepError(f"'{key.strip()}' is both searched (params) and fixed (overrides); keep one")
        try:
            merge(RunConfig(), overrides=[item])
        except ConfigError as err:
            raise SweepError(f"overrides entry {item!r}: {err}") from None
    if spec.budget.max_steps is not None and "train.num_steps" in spec.params:
        raise SweepError("budget.max_steps fixes train.num_steps, which params also searches; keep one")
    if spec.budget.max_steps is not None and any(o.split("=", 1)[0].strip() == "train.num_steps"
                                                 for o in spec.overrides):
        raise SweepError("budget.max_steps and an overrides entry both set train.num_steps; keep one")
    if spec.search == "grid":
        bad = [p.name for p in spec.params.values() if p.kind not in ("grid", "choice")]
        if bad:
            raise SweepError(f"search: grid enumerates values, but {bad} use continuous distributions; "
                             f"give them {{grid: [...]}} / {{choice: [...]}} or use search: random")
    if spec.search == "optuna":
        bad = [p.name for p in spec.params.values() if p.kind == "grid"]
        if bad:
            raise SweepError(f"search: optuna cannot enumerate grids ({bad}); use {{choice: [...]}} instead")


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


# -------------------------------------------------------------------------------- tracking helpers
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


# ------------------------------------------------------------------------------------------ trials
@dataclass(kw_only=True)
class TrialContext:
    """What every trial needs besides its sampled values (shipped once through the object store)."""

    base_config: dict
    fixed_overrides: list[str]
    parent_run_id: str
    tracking_uri: str
    experiment: str
    sweep_name: str
    metric: str
    trial_workers: int = 1
    resources: dict = field(default_factory=dict)
    cwd: Optional[str] = None


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


def trial_overrides(ctx: TrialContext, config: Mapping[str, Any], *, output_dir: str, run_name: str) -> list[str]:
    """The full override list of one trial, in merge order (fixed, sampled, then what the sweep sets)."""
    return [*ctx.fixed_overrides,
            *(f"{k}={_fmt(v)}" for k, v in sorted(config.items())),
            f"train.output_dir={_fmt(output_dir)}",
            "tracking.enabled=true",
            f"tracking.uri={_fmt(ctx.tracking_uri)}",
            f"tracking.experiment={_fmt(ctx.experiment)}",
            f"tracking.run_name={_fmt(run_name)}"]


def _resolve_trial_config(ctx: TrialContext, overrides: Sequence[str]) -> RunConfig:
    base = from_yaml(RunConfig, yaml.safe_dump(ctx.base_config))
    return merge(base, overrides=overrides)


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Ray Tune function trainable: train one configuration, reporting every validation to Tune.

    A scheduler stops a trial by raising ``SystemExit`` inside ``tune.report``; such a trial is recorded
    in MLflow as KILLED with the tag ``sweep.early_stopped``. Any other exception marks the run FAILED with
    the error (tag ``error``, traceback in ``error.txt``) and is re-raised so Tune records it too.
    """
    from ray import tune

    from dist_seg.tracking import PARENT_RUN_ENV

    # Relative paths of the recipe (data.root, ...) mean what they meant to the driver. Ray starts trial
    # processes in the directory where the cluster was started, which may differ from the driver's.
    if ctx.cwd and os.path.isdir(ctx.cwd):
        os.chdir(ctx.cwd)
    context = tune.get_context()
    run_name, trial_id = context.get_trial_name(), context.get_trial_id()
    overrides = trial_overrides(ctx, config, output_dir=_trial_output_dir(), run_name=run_name)
    os.environ[PARENT_RUN_ENV] = ctx.parent_run_id
    reported: list[int] = []
    final: dict = {}
    cfg: Optional[RunConfig] = None

    def on_eval(step: int, metrics: dict) -> None:
        reported.append(int(step))
        result = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        if step >= cfg.train.num_steps:
            # The last validation is reported once train() has returned: a scheduler's stop decision must
            # not interrupt the final checkpoint and reports of a trial that already ran every step.
            final.update(result)
        else:
            tune.report(result)

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
            _record_trial(ctx, run_name, trial_id, overrides=overrides, stopped_at=reported[-1] if reported else 0)
        raise
    except BaseException as err:
        _record_trial(ctx, run_name, trial_id, overrides=overrides, error=err)
        raise
    _record_trial(ctx, run_name, trial_id, overrides=overrides)
    if final:
        tune.report(final)


def _train_with_workers(cfg: RunConfig, ctx: TrialContext, run_name: str) -> None:
    """Run one trial as a Ray Train ``TorchTrainer`` over ``trial_workers`` processes (one per GPU).

    Ray Train starts the workers, sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` and the process group,
    which Accelerate then uses; the workers' reports reach Tune through ``TuneReportCallback``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpu = ctx.resources.get("gpu", 0)
    per_worker = {"CPU": ctx.resources.get("cpu", 1)}
    if gpu:
        per_worker["GPU"] = gpu
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": to_dict(cfg), "parent_run_id": ctx.parent_run_id, "use_gpu": bool(gpu),
                           "cwd": os.getcwd()},
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
    from dist_seg.tracking import PARENT_RUN_ENV

    if os.path.isdir(loop_config["cwd"]):
        os.chdir(loop_config["cwd"])
    os.environ[PARENT_RUN_ENV] = loop_config["parent_run_id"]
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
            run = exp and _find_trial_run(client, exp.experiment_id, ctx.parent_run_id, str(trial))
            if run is None or run.info.status == "RUNNING":
                text = getattr(trial, "error_file", None) or "the trial process ended abnormally"
                _record_trial(ctx, str(trial), trial.trial_id, overrides=[], error_text=f"see {text}")

    return MlflowTrialErrors()


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


# ------------------------------------------------------------------------------------------ driver
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
    best_metric: Optional[float] = None
    best_config: dict = field(default_factory=dict)
    best_overrides: list[str] = field(default_factory=list)
    command: Optional[str] = None
    results: Any = None


METHOD_SECTIONS = ("stego", "ds2dl", "baseline")


def base_config(spec: SweepSpec) -> RunConfig:
    """The recipe's config with the sweep's fixed overrides (and ``budget.max_steps``) applied.

    Raises:
        SweepError: when ``params`` searches the section of a method the recipe does not train (those
            trials would differ only in values nobody reads).
    """
    from dist_seg.trainer import load_recipe

    fixed = list(spec.overrides)
    if spec.budget.max_steps is not None:
        fixed.append(f"train.num_steps={spec.budget.max_steps}")
    cfg = merge(load_recipe(spec.recipe)(), overrides=fixed)
    methods = {cfg.method}
    if "method" in spec.params:
        methods |= set(spec.params["method"].args)
    idle = sorted(name for name in spec.params
                  if name.split(".")[0] in METHOD_SECTIONS and name.split(".")[0] not in methods)
    if idle:
        raise SweepError(f"params {idle} belong to a method this sweep never trains (the recipe {spec.recipe} "
                         f"trains method={cfg.method}); point `recipe:` at a recipe of that method or drop them")
    return cfg


def _build_knn_table(config: dict, cwd: str) -> str:
    """Ray task: the KNN table of the sweep's base config, built once before any trial starts."""
    import torch

    from dist_seg.knn import ensure_knn_table, table_path
    from dist_seg.trainer import default_cache_dir

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

    from dist_seg.knn import table_path
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

    return BasicVariantGenerator(random_state=spec.seed)


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


def _check_capacity(spec: SweepSpec) -> None:
    """Warn when not even one trial fits the cluster: its trials would wait forever (unless it autoscales)."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": spec.resources.cpu * spec.trial_workers, "GPU": spec.resources.gpu * spec.trial_workers}
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        log.warning("one trial needs %s but the Ray cluster has %s: trials will wait until nodes are added "
                    "(lower resources.* / trial_workers, or start Ray with more resources)",
                    {k: v[0] for k, v in short.items()}, {k: v[1] for k, v in short.items()})


def run_sweep(spec: SweepSpec, *, address: Optional[str] = None, resume: bool = False, retry_failed: bool = False,
              num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> SweepResult:
    """Run (or resume) a sweep with Ray Tune and return the best trial.

    Args:
        spec: the parsed sweep (:func:`parse_sweep`).
        address: an existing Ray cluster (``ray.init(address=...)``); ``None`` starts a local one, or joins
            ``$RAY_ADDRESS`` (set by ``ray job submit``). Ignored when Ray is already initialised.
        resume: continue the sweep stored at ``spec.experiment_path`` (``tune.Tuner.restore``).
        retry_failed: with ``resume``, also re-run trials that errored (they resume from their last
            checkpoint).
        num_cpus, num_gpus: size of a local cluster started here.

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

    own_ray = _init_ray(address, num_cpus, num_gpus)
    _check_capacity(spec)
    client = _client(uri)
    parent_run_id: Optional[str] = None
    try:
        if resume:
            parent_run_id = state["parent_run_id"]
            client.update_run(parent_run_id, status="RUNNING")
        else:
            exp = client.get_experiment_by_name(experiment)
            experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
            parent = client.create_run(experiment_id, run_name=spec.name, tags={"sweep.name": spec.name,
                                                                                 "sweep.recipe": spec.recipe})
            parent_run_id = parent.info.run_id
            client.log_param(parent_run_id, "sweep.metric", spec.metric)
            client.log_param(parent_run_id, "sweep.mode", spec.mode)
            client.log_param(parent_run_id, "sweep.search", spec.search)
            client.log_param(parent_run_id, "sweep.num_samples", spec.num_samples)
            client.log_param(parent_run_id, "sweep.scheduler", spec.scheduler.type)
            client.log_text(parent_run_id, yaml.safe_dump(_spec_dict(spec), sort_keys=False), "sweep.yaml")
            _write_state(exp_path, {"sweep": _spec_dict(spec), "base_config": to_dict(base),
                                    "parent_run_id": parent_run_id, "tracking_uri": uri, "experiment": experiment,
                                    "cwd": os.getcwd()})
        ctx = TrialContext(base_config=to_dict(base), fixed_overrides=[], parent_run_id=parent_run_id,
                           tracking_uri=uri, experiment=experiment, sweep_name=spec.name, metric=spec.metric,
                           trial_workers=spec.trial_workers,
                           resources={"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
                           cwd=state["cwd"] if resume else os.getcwd())
        if not resume:
            prepare_shared_inputs(spec, base)
        trainable = _trainable(spec, ctx)
        run_config = tune.RunConfig(
            name=spec.name, storage_path=_absolute_storage(spec.storage_path),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures, fail_fast=False),
            callbacks=[_make_callback(ctx)], verbose=spec.verbose)
        if resume:
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=retry_failed)
        else:
            tuner = tune.Tuner(
                trainable, param_space=search_space(spec), run_config=run_config,
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                            search_alg=_searcher(spec),
                                            scheduler=_scheduler(spec, base.train.num_steps),
                                            max_concurrent_trials=spec.max_concurrent_trials,
                                            reuse_actors=spec.reuse_actors,
                                            time_budget_s=spec.budget.time_budget_s))
        grid = tuner.fit()
        reconcile_runs(grid, ctx, num_steps=base.train.num_steps)
        result = _summarise(spec, grid, base, exp_path=exp_path, parent_run_id=parent_run_id, uri=uri,
                            experiment=experiment)
        if result.best_trial is not None:
            client.log_metric(parent_run_id, f"best/{spec.metric}", result.best_metric)
            client.set_tag(parent_run_id, "sweep.best_trial", result.best_trial)
            client.set_tag(parent_run_id, "sweep.best_overrides", " ".join(result.best_overrides)[:4900])
        client.set_tag(parent_run_id, "sweep.num_errors", str(result.num_errors))
        client.set_terminated(parent_run_id, status="FINISHED" if result.best_trial is not None else "FAILED")
        return result
    except BaseException:
        if parent_run_id is not None:
            client.set_terminated(parent_run_id, status="KILLED")
        raise
    finally:
        if own_ray:
            import ray

            ray.shutdown()


def _spec_dict(spec: SweepSpec) -> dict:
    data = dataclasses.asdict(spec)
    data["params"] = {name: {p.kind: p.args} for name, p in spec.params.items()}
    return data


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
    result.best_trial = f"{TRAINABLE_NAME}_{best.metrics.get('trial_id', Path(best.path).name)}"
    result.best_metric = float(best.metrics[spec.metric])
    result.best_config = {k: best.config[k] for k in sorted(best.config)}
    result.best_overrides = [f"{k}={_fmt(v)}" for k, v in result.best_config.items()]
    fixed = list(spec.overrides) + ([f"train.num_steps={spec.budget.max_steps}"] if spec.budget.max_steps else [])
    result.command = " ".join(["dist-seg train", spec.recipe, *fixed, *result.best_overrides])
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


def format_result(spec: SweepSpec, result: SweepResult) -> str:
    """Human-readable end-of-sweep report: the trials table and the best configuration as overrides."""
    lines = [f"sweep '{spec.name}': {result.num_trials} trials, {result.num_errors} failed; "
             f"state in {result.experiment_path}; MLflow parent run {result.parent_run_id} "
             f"(experiment '{result.experiment}' at {result.tracking_uri})"]
    grid = result.results
    if grid is not None:
        frame = grid.get_dataframe()
        if not frame.empty:
            cols = [c for c in ["trial_id", "step", spec.metric, *[f"config/{p}" for p in spec.params]] if c in frame]
            frame = frame[cols]
            if spec.metric in frame:
                frame = frame.sort_values(spec.metric, ascending=spec.mode == "min")
            agreement = metric_agreement(grid.get_dataframe())
            lines.append(frame.to_string(index=False))
            if agreement is not None:
                lines.append(f"label-free vs labelled selection: Spearman rho(val/label_free, val/cluster_mIoU) = "
                             f"{agreement[0]:.3f} over {agreement[1]} trials")
    if result.best_trial is None:
        lines.append(f"no trial reported {spec.metric}; see the errors above and in MLflow (tag 'error')")
    else:
        lines.append(f"best trial {result.best_trial}: {spec.metric} = {result.best_metric:.4f}")
        lines.append("best overrides: " + " ".join(result.best_overrides))
        lines.append("reproduce: " + result.command)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file, e.g. recipes/sweep.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="changes to the sweep file itself: num_samples=2 scheduler.type=none "
                             "'params.stego.lr={loguniform: [1e-4, 1e-2]}'")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. ray://head:10001 or auto); default: a local cluster, or "
                             "$RAY_ADDRESS under `ray job submit`")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume, also re-run failed trials")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started here")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs of a local Ray cluster started here")


def run(args: argparse.Namespace) -> int:
    from dist_seg.trainer import setup_logging

    setup_logging()
    try:
        spec = parse_sweep(args.sweep, args.overrides)
        result = run_sweep(spec, address=args.address, resume=args.resume, retry_failed=args.retry_failed,
                           num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    except (SweepError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_result(spec, result))
    return 0 if result.best_trial is not None else 1
