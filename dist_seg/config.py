"""Typed run configuration.

Every knob of a run lives in a keyword-only dataclass. A recipe is a Python function returning a full
:class:`RunConfig`; YAML files and ``key.sub=value`` overrides are merged on top through OmegaConf's
structured configs, which reject unknown keys and values of the wrong type. The resolved config is saved
beside every run (:func:`save_config`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_seg.maskdistill.config import MaskDistillConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration error (unknown key, wrong type, inconsistent values)."""


# ----------------------------------------------------------------------------------------------- data
@dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how crops are shaped.

    ``root`` is a folder written by ``dist-seg prepare DATASET`` (it holds ``manifest.json``). ``batch_size`` is the
    *global* batch: each of ``W`` ranks loads ``batch_size / W`` crops per step.
    """

    dataset: str = "toy"
    root: str = "data/toy"
    train_split: str = "train"
    val_split: str = "val"
    res: int = 224
    eval_res: int = 320
    batch_size: int = 32
    num_workers: int = 2
    shuffle_buffer: int = 1000
    feature_cache: Optional[str] = None
    knn_table: Optional[str] = None
    max_val_samples: Optional[int] = None
    decode_device: str = "cpu"


# -------------------------------------------------------------------------------------------- extract
@dataclass(kw_only=True)
class ExtractConfig:
    """Inference passes over a whole split (``dist-seg extract``, the KNN descriptor pass).

    ``batch_size`` is the *global* number of images per backbone forward, split over the ranks like
    ``data.batch_size``; it is independent of the training batch because inference holds no gradients.
    """

    batch_size: int = 256


# ------------------------------------------------------------------------------------------- backbone
@dataclass(kw_only=True)
class BackboneConfig:
    """Frozen feature extractor (SPEC §1)."""

    name: str = "dino_vits8"
    weights: Optional[str] = None
    allow_download: bool = False
    # Autocast dtype of the frozen backbone on CUDA: "auto" = train.mixed_precision when that is bf16/fp16,
    # else bf16 where the GPU supports it (fp32 otherwise); "fp32" forces full precision. CPUs always run fp32.
    # docs/decisions.md (issue 20, precision) gives the measured effect on the features.
    dtype: str = "auto"


# -------------------------------------------------------------------------------------------- methods
@dataclass(kw_only=True)
class StegoConfig:
    """STEGO head and correlation loss (SPEC §3); names follow the reference configs."""

    dim: int = 70
    projection_type: str = "nonlinear"
    dropout: float = 0.1
    feature_samples: int = 11
    neg_samples: int = 5
    num_neighbors: int = 7
    pos_intra_weight: float = 0.67
    pos_intra_shift: float = 0.08
    pos_inter_weight: float = 0.25
    pos_inter_shift: float = 0.02
    neg_inter_weight: float = 0.63
    neg_inter_shift: float = 0.76
    zero_clamp: bool = True
    pointwise: bool = True
    stabilize: bool = False
    lr: float = 5e-4
    probe_lr: float = 5e-3


@dataclass(kw_only=True)
class DS2DLConfig:
    """DS²DL head, prototypes and losses (SPEC §4).

    ``affinity_target``: ``backbone`` (SPEC §4 as revised: pair similarity from the frozen backbone features,
    spatially centred when ``spatial_center``, soft labels ``L_i·L_j`` with gradient) or ``code`` (the first
    reading, kept for comparison only: similarity of the head's own code, with gradient, labels detached;
    ``spatial_center`` does not apply). ``bias_init`` / ``bias_lr``: the affinity bias ``b``'s start and its
    own optimiser group's learning rate. ``l2g_grad_to_code``: let the local-to-global loss train the head
    too (the first reading); by default it sees the code detached and trains the local prototypes only.
    """

    dim: int = 64
    dropout: float = 0.1
    feature_samples: int = 11
    tau: float = 0.1
    r: float = 2.1
    affinity_target: str = "backbone"
    spatial_center: bool = True
    bias_init: float = -0.5
    bias_lr: float = 5e-4
    l2g_grad_to_code: bool = False
    ema_momentum: float = 0.998
    sinkhorn_eps: float = 0.1
    sinkhorn_iters: int = 3
    intra_weight: float = 1.0
    cross_weight: float = 1.0
    affinity_weight: float = 1.0
    l2g_weight: float = 1.0
    orth_weight: float = 1.0
    self_label_weight: float = 1.0
    lr: float = 1e-4
    prototype_lr: float = 5e-4
    probe_lr: float = 5e-3
    optimizer: str = "radam"
    train_probes: bool = True


@dataclass(kw_only=True)
class BaselineConfig:
    """Backbone-feature baselines of paper 002 (SPEC §5): only the probes are trained."""

    kind: str = "raw"
    dim: int = 70
    fit_samples: int = 2000
    probe_lr: float = 5e-3


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation loop, checkpoints and validation."""

    num_steps: int = 5000
    seed: int = 0
    deterministic: bool = False
    mode: str = "online"
    mixed_precision: str = "no"
    # TF32 for float32 matmuls and convolutions on CUDA (the head, losses, probes); the exact KNN search
    # always runs in full float32 whatever this says (dist_seg.knn._full_precision_matmul).
    allow_tf32: bool = True
    device: str = "auto"  # auto: what Accelerate picks; cuda: stop with an error unless CUDA is usable; cpu
    grad_clip: Optional[float] = None
    deepspeed_config: Optional[str] = None
    # Collective timeouts (docs/scaling.md, "A rank hangs"; torchtitan uses 300 s and 100 s). Start-up and the
    # pauses of the loop: how long a collective waits for a rank busy alone (a slow node joining, rank 0 merging
    # MaskDistill candidates, CRF validation on a rank with more shards, a resumed extract) before the run is
    # aborted. Training steps after the first: a wait this long means a rank stopped (the hang watch names it).
    init_timeout_min: float = 60.0
    step_timeout_s: float = 300.0
    # The former name of init_timeout_min (configs and checkpoints written before issue 28): moved there on load.
    dist_timeout_min: Optional[float] = None
    output_dir: str = "runs/default"
    checkpoint_every: int = 500
    keep_last: int = 3
    val_every: int = 500
    log_every: int = 10
    resume: bool = True


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation protocol (SPEC §6)."""

    crf: bool = False
    flip_tta: bool = True
    crf_workers: int = 2
    num_overlays: int = 8


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow tracking; ``uri`` falls back to ``MLFLOW_TRACKING_URI`` then ``sqlite:///mlflow.db``."""

    enabled: bool = True
    uri: Optional[str] = None
    experiment: str = "dist_seg"
    run_name: Optional[str] = None
    # The final checkpoint as an MLflow pyfunc model (dist_seg/serving.py), registered under this name if set.
    log_model: bool = True
    register_model: Optional[str] = None


@dataclass(kw_only=True)
class RunConfig:
    """Everything one training run needs."""

    method: str = "stego"
    num_classes: Optional[int] = None
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    stego: StegoConfig = field(default_factory=StegoConfig)
    ds2dl: DS2DLConfig = field(default_factory=DS2DLConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    maskdistill: MaskDistillConfig = field(default_factory=MaskDistillConfig)

    def __post_init__(self) -> None:
        if self.train.dist_timeout_min is not None:  # the former name of train.init_timeout_min
            self.train.init_timeout_min, self.train.dist_timeout_min = self.train.dist_timeout_min, None
        validate(self)


_CHOICES = {
    ("method",): ("stego", "ds2dl", "baseline", "maskrcnn", "maskdistill"),
    ("baseline", "kind"): ("raw", "pca", "rp"),
    ("stego", "projection_type"): ("linear", "nonlinear"),
    ("ds2dl", "optimizer"): ("adam", "radam"),
    ("ds2dl", "affinity_target"): ("backbone", "code"),
    ("train", "mode"): ("online", "cached"),
    ("data", "decode_device"): ("cpu", "cuda"),
    ("train", "mixed_precision"): ("no", "bf16", "fp16"),
    ("backbone", "dtype"): ("auto", "fp32", "bf16", "fp16"),
    ("train", "device"): ("auto", "cuda", "cpu"),
    ("maskdistill", "detect", "init"): ("ssl", "random"),
    ("maskdistill", "distil", "init"): ("ssl", "random"),
    ("maskdistill", "distil", "student"): ("deeplab", "head"),
    ("maskdistill", "distil", "sync_bn"): ("auto", "off"),
}


def validate(cfg: RunConfig) -> None:
    """Check value constraints that types alone cannot express; raise :class:`ConfigError`."""
    for path, allowed in _CHOICES.items():
        value: Any = cfg
        for part in path:
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"{'.'.join(path)}={value!r} is not one of {list(allowed)}")
    positive = {
        "data.res": cfg.data.res,
        "data.eval_res": cfg.data.eval_res,
        "data.batch_size": cfg.data.batch_size,
        "extract.batch_size": cfg.extract.batch_size,
        "train.num_steps": cfg.train.num_steps,
        "stego.dim": cfg.stego.dim,
        "stego.feature_samples": cfg.stego.feature_samples,
        "ds2dl.dim": cfg.ds2dl.dim,
        "ds2dl.feature_samples": cfg.ds2dl.feature_samples,
        "train.init_timeout_min (or its former name train.dist_timeout_min)": cfg.train.init_timeout_min,
        "train.step_timeout_s": cfg.train.step_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.ds2dl.r <= 0:
        raise ConfigError(f"ds2dl.r must be positive (r = 1 is plain BCE), got {cfg.ds2dl.r}")
    dc = cfg.maskdistill.distil
    if not 0 < dc.top_fraction <= 1:
        raise ConfigError(f"maskdistill.distil.top_fraction must be in (0, 1], got {dc.top_fraction}")
    if dc.crf_rounds < 0 or dc.epochs < 1 or dc.linear_epochs < 1 or dc.size < 1:
        raise ConfigError("maskdistill.distil.crf_rounds must be >= 0 and epochs, linear_epochs, size positive")
    if cfg.num_classes is not None and cfg.num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {cfg.num_classes}")


# ------------------------------------------------------------------------------------ merging / io
def yaml_error_text(err: yaml.YAMLError, *, position: bool = True) -> str:
    """PyYAML's error as one line: what is wrong and (with ``position``) where: ``line L, column C``, both
    counted from 1."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x) \
        or str(err).splitlines()[0]
    if mark is None or not position:
        return what
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}"


def load_yaml_file(path: str | Path, *, what: str = "config file") -> Any:
    """The YAML document of ``path``; a missing or malformed file raises :class:`ConfigError` in one line
    (the file, line and column of the first error) instead of PyYAML's multi-line traceback."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {yaml_error_text(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} {path}: {err}") from None


def _wrap(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    where = f" (key '{key}')" if key else ""
    return ConfigError(f"invalid config from {source}{where}: {msg}")


def _is_str_field(cls: Any, key: str) -> bool:
    """Whether the dotted ``key`` names a ``str`` (or ``Optional[str]``) field of dataclass ``cls``."""
    import typing

    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return False
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        cls = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    return cls is str


def _dotlist_item(base: Any, item: str) -> str:
    """``key=value`` with the value kept as text when ``key`` is a string field.

    Dotlist values are parsed as YAML 1.1 scalars, where ``no``/``off``/``yes`` are booleans: without
    this ``train.mixed_precision=no`` would arrive as the string ``'False'``.
    """
    key, value = item.split("=", 1)
    if value in ("null", "~", "") or value[:1] in ("'", '"') or not _is_str_field(type(base), key):
        return item
    return f"{key}={yaml.safe_dump(value, default_style=chr(39)).strip()}"


def override_value(value: Any) -> str:
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


def merge(base: T, *, yaml_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """Return ``base`` with YAML files then ``a.b=value`` overrides merged on top.

    Args:
        base: a dataclass instance (a recipe's config).
        yaml_files: YAML mappings with the same nesting as the dataclass.
        overrides: dotlist strings such as ``train.num_steps=100``; values are parsed as YAML scalars.

    Raises:
        ConfigError: naming the offending key for unknown keys, wrong types or malformed overrides.
    """
    try:
        merged = OmegaConf.structured(base)
    except OmegaConfBaseException as err:  # pragma: no cover - programming error in a dataclass
        raise _wrap(err, type(base).__name__) from None
    for path in yaml_files:
        path = Path(path)
        data = load_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as err:
            raise _wrap(err, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key = item.split("=", 1)[0]
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([_dotlist_item(base, item)]))
        except OmegaConfBaseException as err:
            raise _wrap(err, f"override {item!r}") from None
        except yaml.YAMLError as err:  # a malformed value such as `[480,`: OmegaConf parses values as YAML
            raise ConfigError(f"override {item!r}: the value of '{key}' is not valid YAML "
                              f"({yaml_error_text(err, position=False)}); quote lists and mappings for the shell, "
                              f"e.g. '{key}=[1, 2]'") from None
    try:
        result = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _wrap(err, "merged config") from None
    return result  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_yaml(cls: type[T], text: str) -> T:
    """Build ``cls`` from YAML text (missing keys keep their defaults)."""
    data = yaml.safe_load(text) or {}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _wrap(err, "yaml") from None


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.num_steps": 100, ...}`` for tracking params and sweep diffs."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
