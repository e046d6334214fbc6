"""What a training run leaves in MLflow: code version, config, dataset, only its own parameters, and a model
that loads and predicts without unpickling anything (real sqlite store, real pyfunc, fresh processes)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_seg import cli
from dist_seg.config import RunConfig, flatten, merge
from dist_seg.tracking import METHOD_PARAM_SECTIONS, run_params

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stego_toy.py")
OTHER_SECTIONS = ("ds2dl.", "baseline.", "maskdistill.")


def test_a_run_logs_the_common_sections_and_only_its_methods_section():
    cfg = merge(RunConfig(), overrides=["method=stego"])
    params = run_params(cfg)
    assert not [k for k in params if k.startswith(OTHER_SECTIONS)], "a STEGO run reads no other method's section"
    assert {k for k in flatten(cfg) if k.startswith("stego.")} <= set(params), "every stego.* key is logged"
    common = {k for k in flatten(cfg) if k.split(".")[0] in ("method", "num_classes", "data", "backbone", "extract",
                                                                "train", "eval", "tracking")}
    assert set(params) == common | {k for k in flatten(cfg) if k.startswith("stego.")}
    assert len(params) < len(flatten(cfg)) - 40, (len(params), len(flatten(cfg)))
    detect = run_params(merge(RunConfig(), overrides=["method=maskrcnn"]))
    assert any(k.startswith("maskdistill.detect.") for k in detect)
    assert not any(k.startswith(("maskdistill.distil.", "stego.")) for k in detect)
    assert set(METHOD_PARAM_SECTIONS) == {"stego", "ds2dl", "baseline", "maskrcnn", "maskdistill"}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A 4-step STEGO toy run tracked in a sqlite store, its model registered as 'toy_stego'."""
    from dist_seg.data.toy import generate_toy

    base = tmp_path_factory.mktemp("record")
    root = base / "toy"
    generate_toy(root, num_train=32, num_val=8, num_classes=3, samples_per_shard=8)
    out = base / "run"
    uri = f"sqlite:///{base / 'mlflow.db'}"
    argv = ["train", RECIPE, f"data.root={root}", f"train.output_dir={out}", "train.num_steps=4", "train.val_every=2",
            "train.checkpoint_every=2", "train.log_every=1", "data.batch_size=8", "data.num_workers=0",
            "eval.num_overlays=2", f"tracking.uri={uri}", "tracking.register_model=toy_stego"]
    assert cli.main(argv) == 0
    return {"base": base, "root": root, "out": out, "uri": uri, "argv": argv}


def _only_run(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dist_seg").experiment_id])
    assert len(runs) == 1, f"one MLflow run expected, got {[r.info.run_name for r in runs]}"
    return client, runs[0]


def test_a_run_records_code_config_dataset_and_description(toy_run):
    client, run = _only_run(toy_run["uri"])
    tags = run.data.tags
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = commit.stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit, "the commit of the code that trained"
    assert tags["git.dirty"] in ("true", "false")
    assert RECIPE in tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    assert "stego on toy" in tags["mlflow.note.content"], "the run has a description"
    experiment = client.get_experiment(run.info.experiment_id)
    assert "mlflow.note.content" in experiment.tags, "the experiment has a description"
    assert tags["dataset"] == str(toy_run["root"].resolve()), "the dataset tag is an absolute path"

    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(toy_run["base"] / "dl")))
    assert config.read_text() == (toy_run["out"] / "config.yaml").read_text(), "the resolved config is an artifact"

    # Two inputs: the split it trained on (context training) and the one its scores come from (evaluation),
    # each profiled by its sample counts and identified by the manifest's digest.
    inputs = {t.value: i for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert set(inputs) == {"training", "evaluation"} and len(run.inputs.dataset_inputs) == 2, run.inputs
    digest = hashlib.sha256((toy_run["root"] / "manifest.json").read_bytes()).hexdigest()
    for context, split, count in (("training", "train", 32), ("evaluation", "val", 8)):
        dataset = inputs[context].dataset
        assert dataset.name == f"toy/{split}" and dataset.digest == digest[:16]
        profile = json.loads(dataset.profile)
        assert profile["num_samples"] == count and profile["samples_per_split"] == {"train": 32, "val": 8}, profile
        input_tags = {t.key: t.value for t in inputs[context].tags}
        assert input_tags["root"] == str(toy_run["root"].resolve()) and input_tags["manifest_sha256"] == digest

    params = run.data.params
    assert not [k for k in params if k.startswith(OTHER_SECTIONS)], "a STEGO run logs no other method's params"
    cfg = merge(RunConfig(), yaml_files=[toy_run["out"] / "config.yaml"])
    logged = {k for k, v in run_params(cfg).items() if v is not None}
    assert set(params) == logged, "the params are the common sections + stego.*, None values left out"
    assert "None" not in params.values(), "no param reads the string 'None'"
    unset = tags["unset_params"].split(", ")
    assert "num_classes" in unset and set(unset) == set(run_params(cfg)) - logged, "None values are listed in a tag"
    print(f"STEGO toy run: {len(params)} params + {len(unset)} unset (full config: {len(flatten(cfg))})")


def test_model_loads_in_a_fresh_process_and_predicts_like_dist_seg_predict(toy_run, tmp_path):
    client, run = _only_run(toy_run["uri"])
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 56), (40, 56)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"{i}.png")
    checkpoint = sorted((toy_run["out"] / "checkpoints").glob("step-*.pt"))[-1]
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "p"),
                     "--no-overlays"]) == 0
    model_uri = run.data.tags["model_uri"]
    assert client.get_registered_model("toy_stego").latest_versions, "tracking.register_model registers it"
    script = textwrap.dedent(f"""
        import sys, numpy as np, mlflow
        from PIL import Image
        mlflow.set_tracking_uri({toy_run['uri']!r})
        for uri in ({model_uri!r}, "models:/toy_stego/1"):
            model = mlflow.pyfunc.load_model(uri)
            labels = model.predict(np.stack([np.array(Image.open(f"{images}/{{i}}.png")) for i in range(2)]))
            np.save({str(tmp_path / 'labels.npy')!r}, labels)
        print("loaded", type(model.unwrap_python_model()).__name__, "pickle" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded SegmentationModel" in proc.stdout, proc.stdout
    labels = np.load(tmp_path / "labels.npy")
    expected = np.stack([np.array(Image.open(tmp_path / "p" / "labels" / f"{i}.png")) for i in range(2)])
    assert labels.shape == (2, 40, 56) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected, err_msg="the MLflow model must predict what dist-seg predict does")


def test_a_model_whose_checkpoint_runs_code_is_refused(toy_run, tmp_path):
    import shutil

    import torch

    _, run = _only_run(toy_run["uri"])
    import mlflow

    mlflow.set_tracking_uri(toy_run["uri"])
    model_dir = Path(mlflow.artifacts.download_artifacts(run.data.tags["model_uri"], dst_path=str(tmp_path / "m")))
    [checkpoint] = list((model_dir / "artifacts").glob("step-*.pt"))
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (shutil.copy, (str(checkpoint), str(marker)))

    torch.save({"config": {}, "method": Payload()}, checkpoint)
    script = f"import mlflow; mlflow.pyfunc.load_model({str(model_dir)!r})"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "a checkpoint that runs code must not load"
    assert "weights_only" in proc.stderr or "refus" in proc.stderr.lower(), proc.stderr[-2000:]
    assert not marker.exists(), "loading the model ran the pickle's code"


def test_a_resumed_run_continues_its_own_mlflow_run(toy_run):
    """Re-running with more steps resumes from the checkpoint in the same MLflow run, with one point per step."""
    argv = [a for a in toy_run["argv"] if not a.startswith(("train.num_steps=", "tracking.register_model="))]
    assert cli.main(argv + ["train.num_steps=6"]) == 0
    client, run = _only_run(toy_run["uri"])
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert "train.num_steps" in run.data.tags["resume.changed_params"].split(", ")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6], f"one unbroken history, each step once: {steps}"
    val = [m.step for m in client.get_metric_history(run.info.run_id, "val/cluster_mIoU")]
    assert val == sorted(set(val)) and val[-1] == 6, val


def test_tracker_reopens_its_run_unless_training_starts_over_with_other_settings(tmp_path):
    from mlflow import MlflowClient

    from dist_seg.config import TrackingConfig
    from dist_seg.tracking import Tracker

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="e")

    def tracker(lr, start_step):
        return Tracker(cfg, active=True, params={"stego.lr": lr}, run_dir=tmp_path / "run", resume=True,
                       start_step=start_step)

    first = tracker(0.1, 0)
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 1.0 / step}, step=step)
    run_id = first.run_id
    first.end("KILLED")
    resumed = tracker(0.1, 2)  # from the step-2 checkpoint: replays step 3
    assert resumed.run_id == run_id, "a resumed run continues its MLflow run"
    for step in (3, 4):
        resumed.log_metrics({"train/loss": 1.0 / step}, step=step)
    resumed.end()
    client = MlflowClient(cfg.uri)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert client.get_run(run_id).data.tags["resumes"] == "1"
    same = tracker(0.1, 0)
    same.end()
    assert same.run_id is None and client.get_run(run_id).data.tags["resumes"] == "2", \
        "starting over with the same settings replays the same history in the same run"
    other = tracker(0.5, 0)
    assert other.run_id != run_id, "starting over with other settings is another run"
    other.end()


WRITER = textwrap.dedent("""
    import sys, time
    import mlflow, pandas as pd
    from dist_seg.tracking import ConflictSafeClient, retry_on_conflict

    uri, start, run_id = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("shared")
    data = mlflow.data.from_pandas(pd.DataFrame({"split": ["train"], "num_samples": [32]}), source="/data/toy",
                                   name="toy", digest="0123456789abcdef")
    client = ConflictSafeClient(uri)
    with mlflow.start_run():
        time.sleep(max(start - time.time(), 0))  # every writer at the same moment
        retry_on_conflict(mlflow.log_input, data, context="training")
        client.set_tag(run_id, "sweep.stopped_at_step", "5")
    print("ok")
""")


def test_processes_writing_the_same_rows_at_once_all_succeed(tmp_path):
    """Concurrent sweep trials log one dataset, and a trial and the driver tag one run, at the same moment: MLflow's
    SQL store inserts after a separate lookup, so all but one writer hit a unique constraint unless they retry."""
    import time

    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment("shared")
    with mlflow.start_run() as run:
        pass
    start = time.time() + 15  # after every process has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(start), run.info.run_id], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-1500:] for _, err in results)
    client = MlflowClient(uri)
    assert client.get_run(run.info.run_id).data.tags["sweep.stopped_at_step"] == "5"
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_id != '{run.info.run_id}'")
    assert len(runs) == 4 and all(len(r.inputs.dataset_inputs) == 1 for r in runs)
    assert {r.inputs.dataset_inputs[0].dataset.digest for r in runs} == {"0123456789abcdef"}


@pytest.fixture(scope="module")
def two_models(toy_run):
    """Two more finished 2-step toy runs (different learning rates) in experiment 'choose' of the same store."""
    ids = []
    for lr in ("2e-3", "1e-5"):
        out = toy_run["base"] / f"choose_{lr}"
        argv = ["train", RECIPE, f"data.root={toy_run['root']}", f"train.output_dir={out}", "train.num_steps=2",
                "train.val_every=2", "train.checkpoint_every=2", "train.log_every=1", "data.batch_size=8",
                "data.num_workers=0", "eval.num_overlays=0", f"stego.lr={lr}", f"tracking.uri={toy_run['uri']}",
                "tracking.experiment=choose", f"tracking.run_name=stego-lr{lr}"]
        assert cli.main(argv) == 0
        ids.append(json.loads((out / "mlflow_run.json").read_text())["run_id"])
    return ids


def test_logged_models_carry_their_scores_and_the_best_is_the_runs_best(toy_run, two_models, capsys):
    """MLflow 3's model search ranks the runs' models by their linked final scores, as `dist-seg runs --best`
    ranks the runs; `--best --register NAME` registers that model."""
    import mlflow

    mlflow.set_tracking_uri(toy_run["uri"])
    experiment = mlflow.get_experiment_by_name("choose").experiment_id
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list",
                                         order_by=[{"field_name": "metrics.final/cluster_mIoU", "ascending": False}])
    assert sorted(m.source_run_id for m in models) == sorted(two_models), "one logged model per finished run"
    digest = hashlib.sha256((toy_run["root"] / "manifest.json").read_bytes()).hexdigest()[:16]
    for model in models:
        run = mlflow.get_run(model.source_run_id)
        assert model.name == "stego-toy-toy", "named <method>-<backbone>-<dataset>"
        assert model.tags["method"] == "stego" and model.tags["checkpoint"] == "step-00000002.pt", model.tags
        assert model.tags["mlflow.source.name"] == run.data.tags["mlflow.source.name"], "logged from the recipe"
        assert "final/cluster_mIoU" in model.tags["mlflow.note.content"], "the model page describes it"
        scores = {m.key: m for m in model.metrics}
        final = scores["final/cluster_mIoU"]
        assert final.value == run.data.metrics["final/cluster_mIoU"], "the run's final score, linked to its model"
        assert (final.step, final.dataset_name, final.dataset_digest) == (2, "toy/val", digest), final
        assert scores["val/cluster_mIoU"].dataset_name == "toy/val"
        assert [m for m in model.metrics if m.key == "final/cluster_mIoU"] == [final], "linked once"
    best = models[0]
    scores = [{x.key: x.value for x in m.metrics}["final/cluster_mIoU"] for m in models]
    assert scores == sorted(scores, reverse=True), "ordered by the linked metric"

    assert cli.main(["runs", "--uri", toy_run["uri"], "--experiment", "choose", "--best", "--register",
                     "choose_best"]) == 0
    out = capsys.readouterr().out
    assert f"# best run: {mlflow.get_run(best.source_run_id).info.run_name} ({best.source_run_id})" in out, out
    version = mlflow.MlflowClient().get_model_version("choose_best", "1")
    assert version.source == f"models:/{best.model_id}" and "as models:/choose_best/1" in out, (version, out)
    by_dataset = mlflow.search_logged_models(experiment_ids=[experiment], datasets=[{"dataset_name": "toy/val"}],
                                             filter_string="metrics.`final/cluster_mIoU` > -1", output_format="list")
    assert {m.model_id for m in by_dataset} == {m.model_id for m in models}, "searchable by evaluation dataset"
