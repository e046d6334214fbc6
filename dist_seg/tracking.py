"""MLflow tracking, and the ``dist-seg runs`` comparison table.

Tracking is on by default with MLflow's local default store (``sqlite:///mlflow.db`` in the working
directory); ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` point it elsewhere and ``tracking.enabled=false``
turns it off. Only the main process logs: a :class:`Tracker` built on another rank does nothing.

``dist-seg runs`` reads the runs back (:func:`search`) and prints them like the papers' tables
(:func:`format_runs`): one row per run, a sweep's trials under their parent run, the scores, and the
parameters that differ between the rows listed, sorted by a metric and fitted to the terminal.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import shutil
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from dist_seg.config import TrackingConfig
from dist_seg.runtime import SOURCE_ENV

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_RUN_ENV = "DIST_SEG_PARENT_RUN_ID"
# Tags (a JSON object) that a run started in this process carries from its creation on, and its model too: a
# sweep sets {"sweep.name": ..., "sweep.trial_id": ...} for its trials.
RUN_TAGS_ENV = "DIST_SEG_RUN_TAGS"
# Config keys whose value is None: MLflow params are strings, so these are not logged as params (a param
# reading "None" would compare and sort as text) but listed in this tag, from which `runs --best` restores them.
UNSET_PARAMS_TAG = "unset_params"


RUN_ID_FILE = "mlflow_run.json"
# The config sections each method reads besides the common ones (data, backbone, train, eval, tracking).
METHOD_PARAM_SECTIONS: dict[str, tuple[str, ...]] = {
    "stego": ("stego.",), "ds2dl": ("ds2dl.",), "baseline": ("baseline.",),
    "maskrcnn": ("maskdistill.detect.",), "maskdistill": ("maskdistill.distil.",),
}
_OWNED_SECTIONS = ("stego.", "ds2dl.", "baseline.", "maskdistill.")
# Metrics measured on the evaluation split (they carry its dataset).
SCORE_PREFIXES = ("val/", "final/")
# What a pyfunc model needs to run; pinned to the versions that logged it.
# What dist_seg.serving imports (through dist_seg.predict); dist_seg itself travels in the model's code/.
_MODEL_REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "pillow", "pyyaml", "omegaconf", "scipy", "webdataset",
                       "tqdm", "mlflow")
SERVING_CODE = Path(__file__).with_name("serving.py")
# Methods whose checkpoints are not segmenters of images (Mask R-CNN predicts instances): no pyfunc model.
NO_PYFUNC_METHODS = ("maskrcnn",)
EXPERIMENT_DESCRIPTION = (
    "dist_seg runs: unsupervised semantic segmentation heads (STEGO, DS2DL, MaskDistill) trained on frozen "
    "DINO features. Each run logs its parameters (common sections + its method's), the resolved config.yaml, "
    "its dataset as inputs (the training split, context training; the validation split, context evaluation), "
    "train/* and val/* metrics (mIoU and Acc in percent), evaluation figures and the final model, named "
    "<method>-<backbone>-<dataset>, with its final/* and val/* scores linked to it (Models tab; a pyfunc: "
    "mlflow.pyfunc.load_model(uri).predict(uint8 images [N, H, W, 3]) -> label maps).")


def tracking_uri(cfg_uri: Optional[str] = None) -> str:
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _is_write_conflict(err: BaseException) -> bool:
    """Whether an MLflow error is a SQL store's unique-constraint failure (sqlite, PostgreSQL, MySQL)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if type(err).__name__ == "IntegrityError" or "UNIQUE constraint failed" in text or (
                "duplicate key value" in text or "Duplicate entry" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


def retry_on_conflict(call, *args, attempts: int = 5, **kwargs):
    """``call(*args, **kwargs)``, again when another process wrote the same row at the same moment.

    MLflow's SQL stores look for a tag (or a dataset input, or an experiment tag) in one statement and insert
    it in the next, so two processes writing the same key at once (concurrent sweep trials logging the same
    dataset, a stopped trial and the sweep driver settling one run) make the second insert fail with a
    unique-constraint error. By then the row exists, and the same call again updates or reuses it.
    """
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts):
        try:
            return call(*args, **kwargs)
        except MlflowException as err:
            if not _is_write_conflict(err):
                raise
            time.sleep(0.05 * attempt)
    return call(*args, **kwargs)


class ConflictSafeClient:
    """An ``MlflowClient`` whose writes go through :func:`retry_on_conflict` (processes that share a store)."""

    _WRITES = frozenset({"set_tag", "delete_tag", "set_terminated", "log_batch", "log_text", "set_experiment_tag",
                         "log_inputs", "log_param", "log_metric"})

    def __init__(self, uri: Optional[str] = None):
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name in self._WRITES:
            return lambda *args, **kwargs: retry_on_conflict(attr, *args, **kwargs)
        return attr


def run_params(cfg) -> dict[str, Any]:
    """The flattened config of a run without the sections of methods it does not train.

    A STEGO run logs the common sections and ``stego.*``, never ``ds2dl.*``, ``baseline.*`` or
    ``maskdistill.*``: those are defaults it never reads, and MLflow's compare view would plot them.
    """
    from dist_seg.config import flatten

    own = METHOD_PARAM_SECTIONS.get(cfg.method, ())
    return {k: v for k, v in flatten(cfg).items() if not k.startswith(_OWNED_SECTIONS) or k.startswith(own)}


def git_tags(path: str | Path) -> dict[str, str]:
    """MLflow's source tags of the git checkout holding ``path``: commit, branch, remote URL, and
    ``git.dirty`` (uncommitted changes to tracked files). Empty when ``path`` is not in a checkout."""
    import subprocess

    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {MLFLOW_GIT_COMMIT: commit, "git.dirty": "true" if git("status", "--porcelain", "--untracked-files=no")
            else "false"}
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags[MLFLOW_GIT_BRANCH] = branch
    remote = git("remote", "get-url", "origin")
    if remote:
        tags[MLFLOW_GIT_REPO_URL] = remote
    return tags


def source_name() -> str:
    """What started the run, for ``mlflow.source.name``: ``$DIST_SEG_SOURCE`` (the recipe the process loaded,
    :func:`dist_seg.runtime.load_recipe`; a sweep sets it for its trials), else the script on the command line."""
    import sys

    if os.environ.get(SOURCE_ENV):
        return os.environ[SOURCE_ENV]
    argv = [a for a in sys.argv if not a.startswith("-")]
    script = next((a for a in argv if a.endswith(".py") and Path(a).is_file()), None)
    entry = Path(argv[0]).name if argv else "python"
    if script is None:
        return " ".join([entry, *argv[1:2]])
    script = str(Path(script).resolve())
    return script if argv and Path(argv[0]).resolve() == Path(script) else f"{entry} {' '.join(argv[1:2])} {script}"


def _description(cfg) -> str:
    head = (f"{cfg.method} on {cfg.data.dataset} ({cfg.data.root}), backbone {cfg.backbone.name}, "
            f"{cfg.train.num_steps} steps of {cfg.data.batch_size} crops; "
            f"output in {Path(cfg.train.output_dir).resolve()}.")
    return head + (f" Metrics: train/* every {cfg.train.log_every} steps, val/* every {cfg.train.val_every} steps "
                   f"(mIoU and Acc in percent), final/* at the end (per-class IoU in eval/final_per_class_iou.csv).")


def model_name(method: str, backbone: str, dataset: str) -> str:
    """The name of a run's logged model: what it is, ``<method>-<backbone>-<dataset>`` (``stego-dino_vits8-toy``)."""
    return "-".join(str(part) for part in (method, backbone, dataset))


def run_tags_from_env() -> dict[str, str]:
    """The tags of :data:`RUN_TAGS_ENV` (set by a sweep for its trial processes)."""
    text = os.environ.get(RUN_TAGS_ENV)
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except ValueError:
        log.warning("ignoring $%s: not a JSON object (%r)", RUN_TAGS_ENV, text[:200])
        return {}
    return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {}


def _dataset_class():
    """:class:`mlflow.data.meta_dataset.MetaDataset` with a profile: a split of a prepared dataset."""
    from mlflow.data.meta_dataset import MetaDataset

    class ShardDataset(MetaDataset):
        """One split of a prepared (sharded) dataset as an MLflow dataset: no data, its manifest digest, and a
        profile of sample counts (MLflow's dataset panel shows it, where a table's profile says rows)."""

        def __init__(self, source, *, name: str, digest: str, profile: Mapping[str, Any]):
            self._profile = dict(profile)
            super().__init__(source=source, name=name, digest=digest)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    return ShardDataset


def split_datasets(dataset: Mapping[str, Any], train_split: str, eval_split: Optional[str]) -> dict[str, Any]:
    """The MLflow datasets of a run's data: ``{"training": <train split>, "evaluation": <eval split>}``.

    Each is named ``<dataset>/<split>`` (``toy/train``, ``toy/val``) with the manifest's digest (first 16 hex
    digits; the full sha256 is an input tag), its source the dataset folder and its profile the sample counts.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    cls = _dataset_class()
    with warnings.catch_warnings():  # MLflow notes that a local path could be read as more than one source type
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(dataset["root"])
    splits = dataset["splits"]
    counts = {name: int(info["num_samples"]) for name, info in splits.items()}
    out = {}
    for context, split in (("training", train_split), ("evaluation", eval_split)):
        if not split or split not in splits:
            continue
        info = splits[split]
        profile = {"split": split, "num_samples": counts[split], "num_shards": int(info["num_shards"]),
                   "has_labels": bool(info["has_labels"]), "num_classes": dataset.get("num_classes"),
                   "samples_per_split": counts}
        out[context] = cls(source, name=f"{dataset['name']}/{split}",
                           digest=dataset["digest"][:16], profile=profile)
    return out


class Tracker:
    """A thin wrapper over one MLflow run.

    A run keeps one MLflow run for its whole life: with ``run_dir`` the run id is written to
    ``<run_dir>/mlflow_run.json``, and a resumed run (``resume``) reopens that MLflow run instead of starting
    another, so a trial restarted by ``dist-seg sweep --resume`` or a re-run ``dist-seg train`` continues its
    own metric history. Steps already logged before the interruption are not logged twice (a resumed run
    replays them from its last checkpoint with the same values).

    Args:
        cfg: tracking section of the run config.
        active: False on non-main ranks (and when tracking is disabled): every call is a no-op.
        params: flat ``{"train.num_steps": ...}`` mapping logged as run parameters.
        tags: provenance tags (dataset, backbone, weights hash, ...).
        run_dir: the run's output folder (holds ``mlflow_run.json``).
        resume: reopen the MLflow run recorded in ``run_dir`` when there is one (unless training starts over,
            ``start_step == 0``, with parameters that differ from that run's).
        description: the run's description (MLflow's ``mlflow.note.content``).
        config_text: the resolved config, logged as the artifact ``config.yaml``.
        dataset: :func:`dist_seg.data.manifest.describe_dataset` of the training data, logged as an MLflow
            dataset input.
        checkpoints: folder of the run's ``step-*.pt`` checkpoints; when the run ends FINISHED the newest one
            is logged as the run's model (:meth:`log_model`).
        backbone_weights: a local backbone weights file, bundled with the model so that it serves anywhere.
        start_step: the step training starts from (0: from scratch).
        splits: ``(training split, evaluation split)`` of ``dataset``: logged as two dataset inputs (contexts
            ``training`` and ``evaluation``); ``val/*`` and ``final/*`` metrics name the evaluation one.
        model_name: the logged model's name (:func:`model_name`); ``model`` when not given.
        model_tags: tags of the logged model (method, backbone, dataset, ...); the run's
            :data:`RUN_TAGS_ENV` tags (a sweep's trial and sweep) are added.
        final_step: the run's last step (``train.num_steps``): its scores are logged after the model, so that
            MLflow links them to it with their dataset (:meth:`end`).

    Tags given here, and those of :data:`RUN_TAGS_ENV`, are set when the MLflow run is created (one write), so a
    run is never seen without them.
    """

    def __init__(self, cfg: TrackingConfig, *, active: bool, params: Mapping[str, Any] = (),
                 tags: Mapping[str, str] = (), run_dir: Optional[str | Path] = None, resume: bool = False,
                 description: Optional[str] = None, config_text: Optional[str] = None,
                 dataset: Optional[Mapping[str, Any]] = None, checkpoints: Optional[str | Path] = None,
                 backbone_weights: Optional[str] = None, start_step: int = 0,
                 splits: tuple[str, Optional[str]] = ("train", "val"), model_name: Optional[str] = None,
                 model_tags: Mapping[str, str] = (), final_step: Optional[int] = None) -> None:
        self.active = bool(active and cfg.enabled)
        self.run_id: Optional[str] = None
        self.cfg = cfg
        self.checkpoints = Path(checkpoints) if checkpoints else None
        self.backbone_weights = backbone_weights
        self.model_uri: Optional[str] = None
        self.model_id: Optional[str] = None
        self.model_name = model_name or "model"
        self._last_step: dict[str, int] = {}
        self._eval_dataset = None
        self.final_step = final_step
        self._held: dict[str, float] = {}  # the scores of the final step, logged after the model (see end)
        extra_tags = run_tags_from_env()
        self.model_tags = {**dict(model_tags), **extra_tags}
        if os.environ.get(PARENT_RUN_ENV):  # a sweep's trial: its model names the sweep's run too
            self.model_tags["sweep.parent_run_id"] = os.environ[PARENT_RUN_ENV]
        if not self.active:
            return
        import mlflow

        self._mlflow = mlflow
        uri = tracking_uri(cfg.uri)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(cfg.experiment)
        client = ConflictSafeClient(uri)
        if "mlflow.note.content" not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)
        system_metrics = _has("psutil")
        previous = self._previous_run(client, run_dir, uri, experiment.experiment_id) if resume else None
        if previous is not None and start_step == 0 and previous.data.metrics and any(
                previous.data.params.get(k, v) != v for k, v in _param_values(params).items()):
            # Training starts over (no checkpoint to resume from) with other settings: another history, another
            # run. With the same settings it replays the logged steps exactly (deterministic), so it continues.
            log.info("no checkpoint to resume from and the config changed: starting a new MLflow run instead of "
                     "%s", previous.info.run_id)
            previous = None
        all_tags = {"mlflow.source.name": source_name(), "mlflow.source.type": "LOCAL",
                    **git_tags(Path(__file__).resolve().parent), **dict(tags), **extra_tags}
        # The model says where it comes from as the run does (else MLflow names the process: Ray's worker).
        self._source_tags = {k: v for k, v in all_tags.items() if k.startswith("mlflow.source.") or k == "git.dirty"}
        unset = sorted(k for k, v in dict(params).items() if v is None)
        if unset:
            all_tags[UNSET_PARAMS_TAG] = ", ".join(unset)[:4900]
        if previous is not None:
            run = mlflow.start_run(run_id=previous.info.run_id, log_system_metrics=system_metrics)
            self._last_step = self._logged_steps(client, previous)
            # A resumed run must not look interrupted or failed any more (the error is kept as previous_error);
            # it records how often it was resumed.
            old_tags = previous.data.tags
            if "error" in old_tags:
                all_tags["previous_error"] = old_tags["error"]
            for key in ("sweep.interrupted", "sweep.stopped_at_step", "error", "error.type"):
                if key in old_tags:
                    client.delete_tag(previous.info.run_id, key)
            all_tags["resumes"] = str(int(previous.data.tags.get("resumes", "0")) + 1)
        else:
            parent = os.environ.get(PARENT_RUN_ENV)
            # Created with its tags: a sweep trial is never seen without sweep.trial_id / sweep.name.
            run = mlflow.start_run(run_name=cfg.run_name, parent_run_id=parent or None, nested=bool(parent),
                                   description=description, log_system_metrics=system_metrics, tags=all_tags)
        self.run_id = run.info.run_id
        # MLflow ends a still-active run as FINISHED when the process exits; a process that exits mid-run (a
        # Ray trial stopped with its sweep, sys.exit in a callback) ends it as KILLED instead (atexit: LIFO).
        atexit.register(self._end_at_exit)
        if run_dir is not None:
            path = Path(run_dir) / RUN_ID_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"run_id": self.run_id, "experiment_id": experiment.experiment_id,
                                        "tracking_uri": uri}))
        if previous is not None:
            retry_on_conflict(mlflow.set_tags, all_tags)
        if params:
            self._log_params(params, previous)
        if config_text is not None:
            mlflow.log_text(config_text, "config.yaml")
        if dataset is not None:
            self._log_dataset(dataset, splits)

    # -- set-up helpers ---------------------------------------------------------------------------
    @staticmethod
    def _previous_run(client, run_dir, uri: str, experiment_id: str):
        """The MLflow run recorded in ``run_dir`` when it is in this store and experiment and not deleted."""
        if run_dir is None or not (Path(run_dir) / RUN_ID_FILE).is_file():
            return None
        try:
            record = json.loads((Path(run_dir) / RUN_ID_FILE).read_text())
            if record.get("tracking_uri") != uri or record.get("experiment_id") != experiment_id:
                return None
            run = client.get_run(record["run_id"])
        except Exception as err:  # noqa: BLE001 - an unusable record just means a new run
            log.warning("not continuing the MLflow run recorded in %s (%s): starting a new one", run_dir, err)
            return None
        return run if run.info.lifecycle_stage == "active" else None

    @staticmethod
    def _logged_steps(client, run) -> dict[str, int]:
        return {key: max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=-1)
                for key in run.data.metrics}

    def _log_params(self, params: Mapping[str, Any], previous) -> None:
        values = _param_values(params)
        if previous is not None:
            # MLflow refuses to change a logged param: a resumed run logs only new keys and tags the changes.
            old = previous.data.params
            changed = sorted(k for k, v in values.items() if k in old and old[k] != v)
            if changed:
                self._mlflow.set_tag("resume.changed_params", ", ".join(changed)[:4900])
            values = {k: v for k, v in values.items() if k not in old}
        if values:
            # MLflow caps a param value at a few thousand characters; ours are short scalars.
            self._mlflow.log_params(values)

    def _log_dataset(self, dataset: Mapping[str, Any], splits: tuple[str, Optional[str]]) -> None:
        """The training and evaluation splits as dataset inputs (:func:`split_datasets`), each tagged with its
        context (MLflow's ``mlflow.data.context``), the dataset's root and the manifest's full sha256."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        found = split_datasets(dataset, *splits)
        self._eval_dataset = found.get("evaluation")
        inputs = [DatasetInput(data._to_mlflow_entity(),
                               [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("root", dataset["root"]),
                                InputTag("manifest_sha256", dataset["digest"])])
                  for context, data in found.items()]
        if inputs:
            ConflictSafeClient(tracking_uri(self.cfg.uri)).log_inputs(self.run_id, inputs)

    @classmethod
    def for_run(cls, run_cfg, *, active: bool, tags: Mapping[str, str] = (),
                dataset: Optional[Mapping[str, Any]] = None, checkpoints: Optional[str | Path] = None,
                start_step: int = 0) -> Tracker:
        """The tracker of a training run: its parameters (:func:`run_params`), description, resolved config,
        dataset input, and its model at the end (from ``checkpoints``); reopens the run's MLflow run on
        resume."""
        from dist_seg.config import to_yaml

        weights = run_cfg.backbone.weights
        images_in = run_cfg.method == "maskdistill" and run_cfg.maskdistill.distil.student == "deeplab"
        if run_cfg.method in NO_PYFUNC_METHODS or images_in:  # not what dist-seg predict (and the pyfunc) runs
            checkpoints = None
        data_name = (dataset or {}).get("name") or run_cfg.data.dataset
        return cls(run_cfg.tracking, active=active, params=run_params(run_cfg), tags=tags,
                   run_dir=run_cfg.train.output_dir, resume=run_cfg.train.resume, description=_description(run_cfg),
                   config_text=to_yaml(run_cfg), dataset=dataset, checkpoints=checkpoints,
                   backbone_weights=weights if weights and Path(weights).is_file() else None, start_step=start_step,
                   splits=(run_cfg.data.train_split, run_cfg.data.val_split),
                   model_name=model_name(run_cfg.method, run_cfg.backbone.name, data_name),
                   model_tags={"method": run_cfg.method, "backbone": run_cfg.backbone.name, "dataset": data_name},
                   final_step=run_cfg.train.num_steps)

    # -- logging ----------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if step is not None and self._last_step:
            # Steps a resumed run replays were logged before the interruption (with the same values).
            clean = {k: v for k, v in clean.items() if step > self._last_step.get(k, -1)}
        if not clean:
            return
        scored = {k: v for k, v in clean.items() if k.startswith(SCORE_PREFIXES)}
        if scored and step is not None and step == self.final_step and self._will_log_model():
            # The final checkpoint is written after the final validation, and the model after it: its scores wait
            # for the model (end), so that MLflow links them to it, with their dataset, when they are logged.
            self._held.update(scored)
            clean = {k: v for k, v in clean.items() if k not in scored}
            scored = {}
        self._log_scored(scored, step)
        clean = {k: v for k, v in clean.items() if k not in scored}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def _log_scored(self, scored: Mapping[str, float], step: Optional[int]) -> None:
        """Scores, measured on the evaluation split, name its dataset: a model they are linked to (a logged
        model at ``step``) shows which data and step they come from."""
        if scored:
            self._mlflow.log_metrics(dict(scored), step=step, dataset=self._eval_dataset)

    def _will_log_model(self) -> bool:
        return self.checkpoints is not None and bool(self.cfg.log_model)

    def _flush_held(self) -> None:
        held, self._held = self._held, {}
        try:
            self._log_scored(held, self.final_step)
        except Exception as err:  # noqa: BLE001 - the run ends in any case
            log.warning("could not log the final scores of run %s to MLflow: %s", self.run_id, err)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.active and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            self._mlflow.set_tags(dict(tags))

    def log_model(self, checkpoint: str | Path) -> Optional[str]:
        """Log ``checkpoint`` as the run's MLflow model and return its URI (registered as
        ``tracking.register_model`` when set).

        The model is an MLflow 3 logged model named for what it is (``stego-dino_vits8-toy``), at the step of its
        checkpoint: MLflow links the run's metrics of that step to it (``final/*``, ``val/*``, each naming the
        evaluation dataset), so the experiment's Models tab and ``mlflow.search_logged_models(order_by=...)``
        rank models by their scores. Its tags say what it is and, for a sweep's trial, which trial and sweep.

        The model is a models-from-code pyfunc (:mod:`dist_seg.serving`): loading it reads the checkpoint with
        ``torch.load(weights_only=True)`` and unpickles nothing; ``predict`` takes a uint8 RGB image ``[H, W, 3]``,
        a batch ``[N, H, W, 3]`` or a list of images and returns ``dist-seg predict``'s label maps.
        """
        if not self.active:
            return None
        from importlib.metadata import PackageNotFoundError, version

        requirements = []
        for name in _MODEL_REQUIREMENTS:
            try:
                requirements.append(f"{name}=={version(name)}")
            except PackageNotFoundError:
                continue
        artifacts = {"checkpoint": str(checkpoint)}
        if self.backbone_weights:
            artifacts["backbone_weights"] = str(self.backbone_weights)
        with warnings.catch_warnings():
            # pyfunc asks for type hints / an input example; serving.py checks its input itself, and an example
            # would load the whole model in the training process.
            warnings.simplefilter("ignore", UserWarning)
            info = self._mlflow.pyfunc.log_model(
                # No signature: none says "[H, W, 3], [N, H, W, 3] or a list of sizes"; predict checks its input.
                name=self.model_name, python_model=str(SERVING_CODE), artifacts=artifacts,
                code_paths=[str(SERVING_CODE.parent)], pip_requirements=requirements,
                registered_model_name=self.cfg.register_model or None,
                metadata={"checkpoint": Path(checkpoint).name, "dist_seg_source": "dist_seg/serving.py"},
                step=checkpoint_step(checkpoint),
                tags={**self._source_tags, **self.model_tags, "checkpoint": Path(checkpoint).name,
                      "mlflow.note.content": self._model_description(checkpoint)})
        self.model_uri = info.model_uri
        self.model_id = info.model_id
        self._mlflow.set_tags({"model_uri": info.model_uri, "model_id": info.model_id})
        return info.model_uri


    def _model_description(self, checkpoint: str | Path) -> str:
        """What the model page says: what it is, where it comes from, its scores."""
        run = self._mlflow.active_run()
        tags = self.model_tags
        text = (f"{tags.get('method', 'dist_seg')} segmentation model on {tags.get('dataset', 'its dataset')} "
                f"(backbone {tags.get('backbone', '?')}): checkpoint {Path(checkpoint).name} of run "
                f"'{run.info.run_name if run else self.run_id}'")
        if "sweep.name" in tags:
            text += f", trial {tags.get('sweep.trial_id')} of sweep '{tags['sweep.name']}'"
        scores = {k: v for k, v in self._held.items() if k.startswith("final/")}
        if scores:
            data = f" on {self._eval_dataset.name}" if self._eval_dataset is not None else ""
            text += ". Scores" + data + ": " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(scores.items()))
        # No angle brackets: the web UI renders the description as Markdown.
        return text + ('. A pyfunc: mlflow.pyfunc.load_model("models:/" + its Model ID).predict(uint8 RGB images '
                       "[N, H, W, 3]) returns class ids [N, H, W], as dist-seg predict does.")

    def _end_at_exit(self) -> None:
        if self.run_id is not None and self._mlflow.active_run() is not None:
            self._flush_held()
            self._mlflow.set_tag("ended_by", "the process exited before the run ended")
            self._mlflow.end_run(status="KILLED")
        self.run_id = None

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status``; a run ended while ``SystemExit``/``KeyboardInterrupt`` propagates (Ctrl-C,
        Ray Tune stopping a trial) is KILLED, not FAILED: it was stopped, nothing went wrong."""
        import sys

        if not (self.active and self.run_id is not None):
            return
        atexit.unregister(self._end_at_exit)
        if status == "FAILED" and isinstance(sys.exc_info()[1], (SystemExit, KeyboardInterrupt)):
            status = "KILLED"
        if status == "FINISHED" and self._will_log_model():
            final = sorted(self.checkpoints.glob("step-*.pt"))
            try:
                if final:
                    # At its checkpoint's step: MLflow links the metrics of that step to the model, and the
                    # final scores logged next (_flush_held) with their dataset.
                    self.log_model(final[-1])
            except Exception as err:  # noqa: BLE001 - the run itself succeeded; say why it has no model
                log.warning("could not log the model of run %s to MLflow: %s", self.run_id, err)
                self._mlflow.set_tag("model_error", f"{type(err).__name__}: {err}"[:4900])
        self._flush_held()
        self._mlflow.end_run(status=status)
        self.run_id = None


def _param_values(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them (strings); None values are not params (:data:`UNSET_PARAMS_TAG`)."""
    return {k: str(v) for k, v in dict(params).items() if v is not None}


def checkpoint_step(path: str | Path) -> int:
    """The training step of a ``step-XXXXXXXX.pt`` checkpoint (0 for another name)."""
    stem = Path(path).stem
    try:
        return int(stem.split("-", 1)[1]) if stem.startswith("step-") else 0
    except ValueError:
        return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------- runs table
# Column label -> the search_runs column it shows (first one present wins) and how it is printed.
COLUMNS: dict[str, tuple[tuple[str, ...], str]] = {
    "run": (("tags.mlflow.runName",), "text"),
    "method": (("tags.method", "params.method"), "text"),
    "dataset": (("params.data.dataset", "tags.dataset"), "text"),
    "status": (("status",), "text"),
    "steps": (("steps",), "text"),
    "cluster mIoU": (("metrics.val/cluster_mIoU",), "score"),
    "cluster Acc": (("metrics.val/cluster_Acc",), "score"),
    "linear mIoU": (("metrics.val/linear_mIoU",), "score"),
    "label-free": (("metrics.val/label_free",), "fraction"),
}
DEFAULT_COLUMNS = tuple(COLUMNS)
# Parameters that differ between any two runs but say nothing about the model.
NOISY_PARAMS = ("train.output_dir", "tracking.", "sweep.", "space.")
# Config sections that belong to one method (cfg.method): shown only for that method's runs.
METHOD_SECTIONS = ("stego", "ds2dl", "baseline")
PARENT_TAG = "tags.mlflow.parentRunId"
GAP = "  "


class RunsError(LookupError):
    """No runs to show; the message says which experiments exist."""


def _store_experiments(uri: str) -> list[tuple[str, int]]:
    """(name, number of runs) of every active experiment in the store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    out = []
    for exp in client.search_experiments():
        out.append((exp.name, len(client.search_runs([exp.experiment_id], max_results=1000))))
    return out


def missing_store(uri: str) -> Optional[Path]:
    """The file of a local ``sqlite:///`` store that does not exist yet (``None`` for any other URI)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri[len("sqlite:///"):])
    return None if path.exists() else path


def search(experiment: Optional[str] = None, *, uri: Optional[str] = None, filter_string: str = ""):
    """The runs of ``experiment`` (or of every experiment) as MLflow's pandas table, plus a ``steps`` column.

    Args:
        experiment: an experiment name; ``None`` searches every experiment of the store.
        uri: tracking URI (default: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        filter_string: MLflow search syntax, e.g. ``"params.method = 'stego' and metrics.`val/cluster_mIoU` > 20"``.

    Raises:
        RunsError: nothing found; the message lists the experiments that exist (and their run counts).
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    named = client.get_experiment_by_name(experiment) if experiment else None
    table = None
    if not experiment or named is not None:
        kwargs = {"experiment_ids": [named.experiment_id]} if named else {"search_all_experiments": True}
        try:
            table = mlflow.search_runs(filter_string=filter_string, **kwargs)
        except mlflow.exceptions.MlflowException as err:
            raise RunsError(f"bad --filter {filter_string!r}: {str(err).splitlines()[0]}") from None
    if table is None or table.empty:
        existing = [f"'{name}' ({count} runs)" for name, count in _store_experiments(uri) if count]
        where = f"experiment '{experiment}'" if experiment else "any experiment"
        match = f" matching {filter_string!r}" if filter_string else ""
        known = ("; experiments with runs: " + ", ".join(existing)) if existing else "; the store has no runs yet"
        raise RunsError(f"no runs{match} in {where} at {uri}{known}")
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    table = table.assign(experiment=table["experiment_id"].map(names))
    steps = []
    for _, row in table.iterrows():
        # The last step the trainer logged (every train.log_every steps and at the end) of the planned steps.
        history = client.get_metric_history(row["run_id"], "train/loss")
        done = max((m.step for m in history), default=None)
        planned = row.get("params.train.num_steps")
        if done is None:
            steps.append("")
        else:
            steps.append(f"{done}/{planned}" if isinstance(planned, str) and planned else str(done))
    return table.assign(steps=steps)


def _value(row, label: str):
    sources, _ = COLUMNS.get(label, ((label,), "raw"))
    for col in sources:
        if col in row.index and not _missing(row[col]):
            value = row[col]
            if col == "tags.dataset" and isinstance(value, str):
                return Path(value).name  # the tag holds data.root; its last folder names the dataset
            return value
    return None


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _fmt_cell(value, kind: str) -> str:
    if _missing(value):
        return "-"
    if kind == "score":
        return f"{float(value):.2f}"
    if kind == "fraction":
        return f"{float(value):.4f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    try:  # params are strings: shorten long floats ("0.00123456789" -> "0.001235")
        number = float(text)
        if "." in text or "e" in text.lower():
            return f"{number:.4g}"
    except ValueError:
        pass
    return text


def _metric_column(sort: str) -> str:
    """``--sort`` as a search_runs column: a column label, ``val/x``, or ``metrics.val/x``."""
    if sort in COLUMNS:
        return COLUMNS[sort][0][0]
    if sort.startswith(("metrics.", "params.", "tags.", "attributes.")) or sort in ("status", "start_time"):
        return sort
    return f"metrics.{sort}"


def _order(table, sort: str, ascending: bool):
    """Rows in display order: top-level runs by ``sort``, a sweep's trials right under it, sorted alike.

    A parent run without the metric itself (a sweep) is placed by its best trial. Returns a list of
    ``(row, depth)`` with depth 1 for trials.
    """
    col = _metric_column(sort)

    def key(value):
        missing = _missing(value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
            missing = True
        return (missing, number if ascending else -number)

    ids = set(table["run_id"])
    parent_of = table[PARENT_TAG] if PARENT_TAG in table else None
    children: dict[str, list] = {}
    top = []
    for _, row in table.iterrows():
        parent = None if parent_of is None else parent_of.get(row.name)
        if not _missing(parent) and parent in ids:
            children.setdefault(parent, []).append(row)
        else:
            top.append(row)

    def own(row):
        return row[col] if col in row.index else None

    def group_key(row):
        values = [own(row)] + [own(c) for c in children.get(row["run_id"], [])]
        keys = sorted(key(v) for v in values)
        return keys[0]

    out = []
    for row in sorted(top, key=group_key):
        out.append((row, 0))
        for child in sorted(children.get(row["run_id"], []), key=lambda r: key(own(r))):
            out.append((child, 1))
    return out


def differing_params(rows: Sequence, *, all_params: bool = False) -> list[str]:
    """Parameter keys (without ``params.``) whose values differ between ``rows`` (or all, with ``all_params``)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(c for c in row.index if c.startswith("params.") and c not in keys)
    # A sweep's parent run logs only sweep.* / space.* params: it must not make every trial parameter look different.
    rows = [r for r in rows if any(not _missing(r.get(c)) for c in keys
                                   if not c[len("params."):].startswith(NOISY_PARAMS))]
    out = []
    for col in sorted(keys):
        name = col[len("params."):]
        if name.startswith(NOISY_PARAMS) or name == "method":  # the method has its own column
            continue
        # A method's section (stego.*) only differs between runs of that method: the STEGO settings of a
        # DS2DL run are defaults nobody read.
        own = [row for row in rows if _reads(row, name)]
        values = {str(row.get(col)) if not _missing(row.get(col)) else "-" for row in own}
        if own and (all_params or len(values) > 1):
            out.append(name)
    return out


def _reads(row, param: str) -> bool:
    """Whether the run ``row`` uses ``param``: a method section's keys belong to runs of that method only."""
    section = param.split(".", 1)[0]
    if section not in METHOD_SECTIONS:
        return True
    return _value(row, "method") == section


def _display_name(row, depth: int, siblings: Sequence[str]) -> str:
    name = str(_value(row, "run") or row["run_id"][:8])
    if depth == 0:
        return name
    # Trials of one sweep share a long prefix (dist_seg_trial_<sweep id>_): show what tells them apart.
    prefix = os.path.commonprefix(list(siblings)) if len(siblings) > 1 else ""
    prefix = prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""
    return "└ " + (name[len(prefix):] or name)


def _fit(headers: list[str], cells: list[list[str]], width: int, fixed: int) -> tuple[list[int], int]:
    """Column widths within ``width``: drops trailing optional columns (index >= ``fixed``), then shortens
    the first column. Returns (widths of the kept columns, how many columns were dropped)."""
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    dropped = 0
    while len(widths) > fixed and sum(widths) + len(GAP) * (len(widths) - 1) > width:
        widths.pop()
        dropped += 1
    total = sum(widths) + len(GAP) * (len(widths) - 1)
    if total > width:
        widths[0] = max(8, widths[0] - (total - width))
    while sum(widths) + len(GAP) * (len(widths) - 1) > width and len(widths) > 1:
        widths.pop()
        dropped += 1
    return widths, dropped


def _line(values: Sequence[str], widths: Sequence[int], right: Sequence[bool]) -> str:
    parts = []
    for i, w in enumerate(widths):
        text = _clip(values[i], w)
        parts.append(text.rjust(w) if right[i] else text.ljust(w))
    return GAP.join(parts).rstrip()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table_rows(table, *, sort: str = "cluster mIoU", ascending: bool = False, columns: Optional[Sequence[str]] = None,
               all_params: bool = False) -> tuple[list[str], list[dict], int]:
    """The runs table as data: (column labels, one dict per row in display order, number of fixed columns).

    Rows carry every label's value plus ``run_id``, ``parent_run_id``, ``experiment`` and ``depth`` (1 for a
    sweep's trials). Without ``columns`` the labels are :data:`DEFAULT_COLUMNS` (those with no value in any
    row left out) followed by the parameters that differ between the rows.
    """
    ordered = _order(table, sort, ascending)
    rows = [r for r, _ in ordered]
    if columns:
        labels = list(columns)
        fixed = len(labels)
    else:
        labels = [c for c in DEFAULT_COLUMNS
                  if c in ("run", "status") or any(not _missing(_value(r, c)) for r in rows)]
        fixed = len(labels)
        labels += differing_params(rows, all_params=all_params)
    siblings: dict[str, list[str]] = {}
    for row, depth in ordered:
        if depth:
            siblings.setdefault(row[PARENT_TAG], []).append(str(_value(row, "run") or ""))
    out = []
    for row, depth in ordered:
        record = {"run_id": row["run_id"], "experiment": row.get("experiment"), "depth": depth,
                  "parent_run_id": row[PARENT_TAG] if depth else None}
        for label in labels:
            if label == "run":
                record[label] = _display_name(row, depth, siblings.get(row.get(PARENT_TAG), []))
                record["run_name"] = _value(row, "run")
            elif label in COLUMNS:
                record[label] = _value(row, label)
            else:
                key = label if label.startswith(("metrics.", "params.", "tags.")) or label in row.index \
                    else f"params.{label}"
                value = row.get(key)
                unread = key.startswith("params.") and not _reads(row, key[len("params."):])
                record[label] = None if _missing(value) or unread else value
        out.append(record)
    return labels, out, fixed


def format_runs(table, *, sort: str = "cluster mIoU", ascending: bool = False,
                columns: Optional[Sequence[str]] = None, all_params: bool = False, limit: Optional[int] = None,
                width: Optional[int] = None) -> str:
    """The runs of a :func:`search` table as fixed-width text no wider than ``width`` (default: the terminal's,
    120 when it is not a terminal), one section per experiment."""
    width = width or terminal_width()
    lines: list[str] = []
    experiments = list(dict.fromkeys(table["experiment"])) if "experiment" in table else [None]
    for experiment in experiments:
        part = table if experiment is None else table[table["experiment"] == experiment]
        labels, records, fixed = table_rows(part, sort=sort, ascending=ascending, columns=columns,
                                            all_params=all_params)
        shown = records[:limit] if limit else records
        kinds = [COLUMNS[label][1] if label in COLUMNS else "raw" for label in labels]
        cells = [[str(r[label]) if label == "run" else _fmt_cell(r[label], kind) for label, kind in zip(labels, kinds)]
                 for r in shown]
        widths, dropped = _fit(labels, cells, width, fixed)
        if experiment is not None:
            lines.append(_clip(f"experiment '{experiment}': {len(records)} runs, sorted by {sort}"
                               f" ({'ascending' if ascending else 'descending'})", width))
        right = [kind not in ("text", "raw") for kind in kinds]
        lines.append(_line(labels, widths, right))
        lines.append("-" * min(width, sum(widths) + len(GAP) * (len(widths) - 1)))
        lines.extend(_line(c, widths, right) for c in cells)
        notes = []
        if dropped:
            notes.append(f"{dropped} more column(s) do not fit in {width} characters: "
                         f"{', '.join(labels[len(widths):])}; choose with --columns, or use --csv/--json")
        if limit and len(records) > limit:
            notes.append(f"{len(records) - limit} more run(s): --limit N")
        for note in notes:
            lines.extend(textwrap.wrap("(" + note + ")", width, break_on_hyphens=False))
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def terminal_width(default: int = 120) -> int:
    """Columns of the terminal on stdout, ``default`` when stdout is not a terminal."""
    import sys

    if not sys.stdout.isatty():
        return default
    return shutil.get_terminal_size((default, 24)).columns


def export_runs(table, fmt: str, *, sort: str = "cluster mIoU", ascending: bool = False,
                columns: Optional[Sequence[str]] = None, all_params: bool = False) -> str:
    """The rows of :func:`table_rows` as CSV or JSON (full run ids, raw values, nothing clipped)."""
    import json

    import pandas as pd

    out = []
    for experiment in (list(dict.fromkeys(table["experiment"])) if "experiment" in table else [None]):
        part = table if experiment is None else table[table["experiment"] == experiment]
        labels, records, _ = table_rows(part, sort=sort, ascending=ascending, columns=columns, all_params=all_params)
        for r in records:
            if "run" in r:
                r["run"] = r.pop("run_name")
            out.append(r)
    if fmt == "json":
        def plain(v):
            if hasattr(v, "item"):
                return v.item()
            return None if _missing(v) else v
        return json.dumps([{k: plain(v) for k, v in r.items()} for r in out], indent=2, default=str)
    return pd.DataFrame(out).to_csv(index=False)


def _logged_value(text: Any) -> Any:
    """A run parameter back as the Python value it was logged from (MLflow keeps ``str(value)``)."""
    import ast

    if not isinstance(text, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    # Only plain data comes back (numbers, booleans, None, lists): anything else stays the logged text.
    return value if isinstance(value, (int, float, bool, list, tuple, type(None))) else text


def best_overrides(table, *, exclude=("data.root", "train.output_dir", "tracking.", "sweep.")) -> list[str]:
    """Recipe overrides (``key=value``) of the first row of a sorted runs table.

    Sorted by key, each shell-quoted where needed, so that the line can be pasted after
    ``dist-seg train RECIPE`` (lists keep their spaces inside one quoted word; ``None`` becomes ``null``).
    """
    import shlex

    from dist_seg.config import override_value

    row = table.iloc[0]
    values = {}
    for col in table.columns:
        if col.startswith("params.") and not _missing(row[col]):
            values[col[len("params."):]] = _logged_value(row[col])
    # Keys whose value was None are not params; the run lists them in a tag.
    unset = row.get(f"tags.{UNSET_PARAMS_TAG}")
    for key in ([] if _missing(unset) else str(unset).split(", ")):
        values.setdefault(key, None)
    out = []
    for key in sorted(values):
        if not any(key.startswith(e) for e in exclude):
            value = values[key]
            out.append(shlex.quote(f"{key}={override_value(list(value) if isinstance(value, tuple) else value)}"))
    return out


# ------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment name (default: every experiment, one table each)")
    parser.add_argument("--uri", default=None, help=f"tracking URI (default: $MLFLOW_TRACKING_URI or {DEFAULT_URI})")
    parser.add_argument("--sort", default="cluster mIoU",
                        help="column label or metric to sort by, e.g. 'label-free' or val/linear_mIoU "
                             "(default: cluster mIoU, descending)")
    parser.add_argument("--ascending", action="store_true", help="sort ascending (for losses)")
    parser.add_argument("--filter", default="", dest="filter_string", metavar="EXPR",
                        help="MLflow search syntax, e.g. \"params.method = 'stego' and status = 'FINISHED'\"")
    parser.add_argument("--columns", default=None,
                        help="comma-separated columns instead of the default ones: labels "
                             f"({', '.join(DEFAULT_COLUMNS)}), parameter keys (stego.lr) or metrics.* / tags.*")
    parser.add_argument("--limit", type=int, default=50, help="rows to show per experiment (default 50)")
    parser.add_argument("--all-params", action="store_true", help="show every param, not only those that differ")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="print every row as CSV (for scripts)")
    out.add_argument("--json", action="store_true", help="print every row as JSON (for scripts)")
    parser.add_argument("--best", action="store_true", help="print the best run's config as recipe overrides")
    parser.add_argument("--register", default=None, metavar="NAME",
                        help="with --best: register the best run's logged model as a new version of the "
                             "registered model NAME (mlflow.register_model)")


def run(args: argparse.Namespace) -> int:
    import sys

    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    store = missing_store(tracking_uri(args.uri))
    if store is not None:  # asking MLflow would create an empty database file there
        print(f"error: no MLflow store at {store}: no run was tracked from this folder yet (give --uri or set "
              f"MLFLOW_TRACKING_URI to where your runs were logged)", file=sys.stderr)
        return 1
    try:
        table = search(args.experiment, uri=args.uri, filter_string=args.filter_string)
    except RunsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.register and not args.best:
        print("error: --register NAME registers the best run's model: add --best", file=sys.stderr)
        return 2
    options = dict(sort=args.sort, ascending=args.ascending, columns=columns, all_params=args.all_params)
    if args.csv or args.json:
        print(export_runs(table, "json" if args.json else "csv", **options), end="" if args.csv else "\n")
        return 0
    print(format_runs(table, limit=args.limit, **options))
    if args.best:
        labels, records, _ = table_rows(table, sort=args.sort, ascending=args.ascending)
        best = next((r for r in records if r["depth"] or not (table.get(PARENT_TAG) is not None and
                     (table[PARENT_TAG] == r["run_id"]).any())), records[0])
        row = table[table["run_id"] == best["run_id"]]
        print(f"\n# best run: {best['run_name']} ({best['run_id']})")
        print(" ".join(best_overrides(row)))
        if args.register:
            try:
                version = register_best(best["run_id"], args.register, uri=args.uri)
            except RunsError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            print(f"# registered {version.source} as models:/{args.register}/{version.version}")
    return 0


def run_model(run_id: str, *, uri: Optional[str] = None):
    """The logged model a run produced (MLflow 3 ``LoggedModel``; the newest when there are several), or None."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    run = mlflow.get_run(run_id)
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'",
                                        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
                                        output_format="list")
    return found[0] if found else None


def register_best(run_id: str, name: str, *, uri: Optional[str] = None):
    """Register the logged model of run ``run_id`` as a new version of ``name`` (``mlflow.register_model``).

    Raises:
        RunsError: the run logged no model (it did not finish, or ``tracking.log_model`` was off).
    """
    import mlflow

    model = run_model(run_id, uri=uri)
    if model is None:
        status = mlflow.get_run(run_id).info.status
        raise RunsError(f"the best run {run_id} ({status}) has no logged model to register: only runs that "
                        f"finished log one (pick another with --filter \"status = 'FINISHED'\")")
    return mlflow.register_model(f"models:/{model.model_id}", name)
