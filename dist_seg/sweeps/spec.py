"""The sweep file (``recipes/sweep.yaml``): its typed form, parsing and checks, and the configs of its trials.

No Ray and no MLflow here: :func:`parse_sweep` maps a YAML file (or mapping) onto :class:`SweepSpec`,
checking every searched and fixed key against :class:`~dist_seg.config.RunConfig`; :func:`base_config`
loads the sweep's recipe (a relative ``recipe:`` path is looked up beside the sweep file, then in its
project, then in the working directory) and applies the fixed overrides; :func:`trial_overrides` composes
one trial's overrides. The Ray plumbing is :mod:`dist_seg.tune`, the MLflow bookkeeping
:mod:`dist_seg.sweeps.runs`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dist_seg.config import ConfigError, RunConfig, from_yaml, merge, override_value, yaml_error_text

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid", "randint", "quniform")
SEARCHERS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "none")


# The sweep sets these itself for every trial (one output folder and one nested MLflow run per trial).
RESERVED = ("train.output_dir", "tracking.")
# Tune names trials <trainable>_<id>; their MLflow runs carry the same names.
TRAINABLE_NAME = "dist_seg_trial"


class SweepLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-4`` as a number.

    YAML 1.1 (PyYAML) needs a dot before the exponent (``1.0e-4``) and reads ``1e-4`` as a string, which is
    not what anyone writing ``{loguniform: [1e-4, 1e-3]}`` means (YAML 1.2 and OmegaConf read it as a float).
    """


SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=SweepLoader)  # noqa: S506 - a SafeLoader subclass


class SweepError(ValueError):
    """A user-facing problem with a sweep file or a sweep's state; the message names the fix."""


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
    # Folder a relative ``recipe:`` is looked up in first; set by parse_sweep to the sweep file's folder.
    base_dir: Optional[str] = None

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


# A value as the right-hand side of a `key=value` override (shared with `dist-seg runs --best`).
_fmt = override_value


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
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {yaml_error_text(err)}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path} must hold a mapping, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    # A relative `recipe:` means the file beside the sweep file (or in its project), wherever the sweep runs.
    data.setdefault("base_dir", str(path.resolve().parent))
    return data


def _check_run_key(key: str, item: str) -> None:
    """A command-line ``key=value`` that names a run config key (``data.root=...``) rather than a key of the
    sweep file: say how to pass it, instead of listing the sweep file's keys."""
    if key.split(".")[0] in _field_names(SweepSpec):
        return
    try:
        _config_field_type(key)
    except SweepError:
        return
    raise SweepError(f"'{key}' is a run config key, not a key of the sweep file: write "
                     f"'overrides+={item}' to set it for every trial (or 'params.{key}={{choice: [...]}}' "
                     f"to search it)")


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
            value = _load_yaml(text)
        except yaml.YAMLError as err:
            raise SweepError(f"sweep override {item!r}: the value of '{key.strip()}' is not valid YAML "
                             f"({yaml_error_text(err, position=False)})") from None
        key = key.strip()
        if key.endswith("+"):  # `overrides+=train.seed=1` appends to a list instead of replacing it
            key = key[:-1].strip()
            current = data.get(key) or []
            if not isinstance(current, list):
                raise SweepError(f"sweep override {item!r}: '{key}' is not a list, so += cannot append to it")
            data[key] = [*current, text if key == "overrides" else value]
            continue
        _check_run_key(key, item)
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
    recipe: str = ""


def trial_overrides(ctx: TrialContext, config: Mapping[str, Any], *, output_dir: str, run_name: str) -> list[str]:
    """The full override list of one trial, in merge order (fixed, sampled, then what the sweep sets)."""
    return [*ctx.fixed_overrides,
            *(f"{k}={_fmt(v)}" for k, v in sorted(config.items())),
            f"train.output_dir={_fmt(output_dir)}",
            "tracking.enabled=true",
            f"tracking.uri={_fmt(ctx.tracking_uri)}",
            f"tracking.experiment={_fmt(ctx.experiment)}",
            f"tracking.run_name={_fmt(run_name)}",
            "tracking.register_model=null"]  # a sweep registers no model version per trial


def _resolve_trial_config(ctx: TrialContext, overrides: Sequence[str]) -> RunConfig:
    base = from_yaml(RunConfig, yaml.safe_dump(ctx.base_config))
    return merge(base, overrides=overrides)


METHOD_SECTIONS = ("stego", "ds2dl", "baseline")


def recipe_search_dirs(spec: SweepSpec) -> list[Path]:
    """Where a relative ``recipe:`` is looked up before the working directory: the sweep file's folder, then
    its project root (the nearest folder at or above it that holds ``recipes/``)."""
    if not spec.base_dir:
        return []
    base = Path(spec.base_dir)
    dirs = [base]
    root = next((p for p in (base, *base.parents) if (p / "recipes").is_dir()), None)
    if root is not None and root != base:
        dirs.append(root)
    return dirs


def recipe_path(spec: SweepSpec) -> str:
    """The recipe file the sweep trains (as found by :func:`base_config`), or ``spec.recipe`` if none exists."""
    from dist_seg.runtime import recipe_candidates

    found = next((c for c in recipe_candidates(spec.recipe, search=recipe_search_dirs(spec)) if c.is_file()), None)
    return str(found) if found is not None else spec.recipe


def base_config(spec: SweepSpec) -> RunConfig:
    """The recipe's config with the sweep's fixed overrides (and ``budget.max_steps``) applied.

    Raises:
        SweepError: when ``params`` searches the section of a method the recipe does not train (those
            trials would differ only in values nobody reads).
    """
    from dist_seg.runtime import load_recipe

    fixed = list(spec.overrides)
    if spec.budget.max_steps is not None:
        fixed.append(f"train.num_steps={spec.budget.max_steps}")
    try:
        config_fn = load_recipe(spec.recipe, search=recipe_search_dirs(spec))
    except ConfigError as err:
        raise SweepError(f"the sweep's recipe: {err}") from None
    cfg = merge(config_fn(), overrides=fixed)
    methods = {cfg.method}
    if "method" in spec.params:
        methods |= set(spec.params["method"].args)
    idle = sorted(name for name in spec.params
                  if name.split(".")[0] in METHOD_SECTIONS and name.split(".")[0] not in methods)
    if idle:
        raise SweepError(f"params {idle} belong to a method this sweep never trains (the recipe {spec.recipe} "
                         f"trains method={cfg.method}); point `recipe:` at a recipe of that method or drop them")
    return cfg


def trial_name(trial_id: str, config: Mapping[str, Any], width: int = 2) -> str:
    """A trial's name (Tune's trial name and its MLflow run name): a short index first, then the sampled values.

    ``trial_ab12c_00003`` with ``{"stego.lr": 0.00123, "stego.pos_intra_weight": 0.4}`` gives
    ``t03 lr=0.00123 pos_intra_weight=0.4`` (values while the name stays within 64 characters): names stay
    distinct when a table or a chart legend cuts them (Tune's own ``dist_seg_trial_ab12c_000…`` do not), and
    say what the trial tried.
    """
    suffix = str(trial_id).rsplit("_", 1)[-1]
    index = f"t{int(suffix):0{width}d}" if suffix.isdigit() else f"t{suffix}"
    name = index
    for key, value in config.items():
        part = f"{key.rsplit('.', 1)[-1]}={_short(value)}"
        if len(name) + 1 + len(part) > 64:  # the rest is in the run's params
            break
        name += " " + part
    return name


def _short(value: Any) -> str:
    """A sampled value in a few characters (3 significant digits for floats)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        return f"{float(value):.3g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_short(v) for v in value)
    text = str(value)
    return text.rsplit("/", 1)[-1] or text  # a path: its last part


def space_params(spec: SweepSpec) -> dict[str, str]:
    """The search space as flat MLflow params of the sweep's run: ``{"space.stego.lr": "loguniform(0.0001,
    0.005)"}``."""
    return {f"space.{name}": f"{p.kind}({', '.join(str(a) for a in p.args)})"[:6000] for name, p in spec.params.items()}


def _spec_dict(spec: SweepSpec) -> dict:
    data = dataclasses.asdict(spec)
    data["params"] = {name: {p.kind: p.args} for name, p in spec.params.items()}
    return data
