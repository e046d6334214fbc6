"""Sweep files → Ray Tune search spaces, their validation, and an end-to-end sweep on 2 CPUs."""

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from dist_seg import tune as T
from dist_seg.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "recipes" / "sweep.yaml"
SWEEP_TOY = REPO / "recipes" / "sweep_toy.yaml"


def minimal(**params) -> dict:
    return {"name": "s", "recipe": str(REPO / "recipes" / "stego_toy.py"), "params": params}


# ----------------------------------------------------------------------------- YAML → search space
def test_distributions_map_to_ray_tune_domains():
    from ray.tune.search import sample

    spec = T.parse_sweep(minimal(**{
        "stego.pos_intra_weight": {"uniform": [0.1, 0.9]},
        "stego.lr": {"loguniform": [1e-4, 1e-2]},
        "stego.projection_type": {"choice": ["linear", "nonlinear"]},
        "stego.pointwise": {"grid": [True, False]},
        "stego.dim": {"randint": [16, 33]},
        "stego.dropout": {"quniform": [0.0, 0.5, 0.1]},
    }))
    space = T.search_space(spec)
    w = space["stego.pos_intra_weight"]
    assert isinstance(w, sample.Float) and (w.lower, w.upper) == (0.1, 0.9)
    assert isinstance(w.get_sampler(), sample.Float._Uniform), "uniform must sample uniformly"
    lr = space["stego.lr"]
    assert isinstance(lr, sample.Float) and isinstance(lr.get_sampler(), sample.Float._LogUniform)
    draws = np.array(lr.sample(size=4000, random_state=0))
    assert draws.min() >= 1e-4 and draws.max() <= 1e-2
    assert abs(np.median(np.log10(draws)) + 3) < 0.1, "loguniform's median must be the geometric mean"
    assert isinstance(space["stego.projection_type"], sample.Categorical)
    assert space["stego.projection_type"].categories == ["linear", "nonlinear"]
    assert space["stego.pointwise"] == {"grid_search": [True, False]}
    dim = space["stego.dim"]
    assert isinstance(dim, sample.Integer) and (dim.lower, dim.upper) == (16, 33)
    drop = space["stego.dropout"]
    assert isinstance(drop.get_sampler(), sample.Quantized) and drop.get_sampler().q == 0.1
    assert all(abs(v * 10 - round(v * 10)) < 1e-9 for v in drop.sample(size=50, random_state=0))


def test_nested_keys_become_nested_config_values():
    spec = T.parse_sweep(minimal(**{"stego.lr": {"loguniform": [1e-4, 1e-2]},
                                    "data.batch_size": {"choice": [8, 16]}}))
    assert set(T.search_space(spec)) == {"stego.lr", "data.batch_size"}, "keys keep their dotted config names"
    ctx = T.TrialContext(base_config=T.to_dict(RunConfig()), fixed_overrides=["train.num_steps=7"],
                         parent_run_id="p", tracking_uri="sqlite:////tmp/x.db", experiment="e", sweep_name="s",
                         metric="val/cluster_mIoU")
    overrides = T.trial_overrides(ctx, {"stego.lr": np.float64(0.00123), "data.batch_size": 16},
                                  output_dir="/tmp/trial/run", run_name="trial_1")
    cfg = T._resolve_trial_config(ctx, overrides)
    assert cfg.stego.lr == pytest.approx(0.00123) and cfg.data.batch_size == 16
    assert cfg.train.num_steps == 7 and cfg.train.output_dir == "/tmp/trial/run"
    assert (cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.run_name) == ("sqlite:////tmp/x.db", "e", "trial_1")


def test_trial_names_start_with_an_index_and_say_what_the_trial_tried():
    from dist_seg.sweeps.spec import trial_name

    config = {"stego.lr": np.float64(0.00123456), "stego.pos_intra_weight": 0.4, "data.root": "data/toy"}
    assert trial_name("ab12c_00003", config) == "t03 lr=0.00123 pos_intra_weight=0.4 root=toy"
    names = [trial_name(f"ab12c_{i:05d}", {f"stego.param_{k}": 0.123456 for k in range(9)}) for i in range(12)]
    assert all(len(n) <= 64 for n in names) and len({n[:24] for n in names}) == 12, names
    spec = T.parse_sweep({**minimal(**{"stego.dim": {"choice": [16, 32]}, "stego.lr": {"grid": [1e-3, 1e-2]}}),
                          "search": "grid", "num_samples": 3})
    assert T.planned_trials(spec) == 12, "num_samples x the grid"
    assert T.planned_trials(T.parse_sweep(minimal(**{"stego.lr": {"loguniform": [1e-4, 1e-2]}}))) == 1


def test_grid_search_enumerates_choices_too():
    spec = T.parse_sweep({**minimal(**{"stego.dim": {"choice": [16, 32]}, "stego.lr": {"grid": [1e-3]}}),
                          "search": "grid"})
    assert T.search_space(spec) == {"stego.dim": {"grid_search": [16, 32]}, "stego.lr": {"grid_search": [1e-3]}}


def test_shipped_sweep_files_parse():
    spec = T.parse_sweep(SWEEP)
    assert spec.metric == "val/cluster_mIoU" and spec.mode == "max" and spec.search == "optuna"
    for key in ("pos_intra_weight", "pos_inter_weight", "neg_inter_weight",
                "pos_intra_shift", "pos_inter_shift", "neg_inter_shift"):
        assert f"stego.{key}" in spec.params, f"sweep.yaml must search stego.{key}"
    assert spec.scheduler.type == "asha" and spec.resources.gpu == 1
    assert T.base_config(spec).train.num_steps == spec.budget.max_steps
    toy = T.parse_sweep(SWEEP_TOY)
    assert toy.num_samples >= 4 and toy.resources.gpu == 0


def test_documented_ds2dl_block_is_valid():
    text = SWEEP.read_text()
    block = re.search(r"# BEGIN DS2DL PARAMS\n(.*?)# END DS2DL PARAMS", text, re.S).group(1)
    params = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))["params"]
    for key in ("bias_init", "r", "tau", "sinkhorn_eps", "affinity_weight", "l2g_weight", "orth_weight",
                "self_label_weight", "intra_weight", "cross_weight"):
        assert f"ds2dl.{key}" in params, f"the DS2DL block must search ds2dl.{key}"
    data = {**yaml.safe_load(text), "params": params, "recipe": "recipes/ds2dl_coco.py"}
    spec = T.parse_sweep(data)
    assert T.base_config(spec).method == "ds2dl"
    with pytest.raises(T.SweepError, match=r"belong to a method this sweep never trains"):
        T.base_config(T.parse_sweep({**data, "recipe": "recipes/stego_coco.py"}))


def test_command_line_overrides_of_the_sweep_file():
    spec = T.parse_sweep(SWEEP_TOY, ["num_samples=2", "scheduler.type=none", "overrides+=data.root=/data/x",
                                     "params.stego.dim={choice: [16, 32]}", "name=other"])
    assert spec.num_samples == 2 and spec.scheduler.type == "none" and spec.name == "other"
    assert spec.overrides[-1] == "data.root=/data/x" and "train.val_every=5" in spec.overrides
    assert spec.params["stego.dim"] == T.ParamSpec(name="stego.dim", kind="choice", args=[16, 32])


# ------------------------------------------------------------------------------------ clear errors
@pytest.mark.parametrize("params, pattern", [
    ({"stego.pos_intra_wieght": {"uniform": [0, 1]}},
     r"params\.stego\.pos_intra_wieght.*'pos_intra_wieght' is not a field"),
    ({"optim.lr": {"uniform": [0, 1]}}, r"params\.optim\.lr.*'optim' is not a field of RunConfig"),
    ({"stego": {"choice": [1]}}, r"'stego' is a config section"),
    ({"stego.lr": {"normal": [0, 1]}}, r"params\.stego\.lr: unknown distribution 'normal'"),
    ({"stego.lr": {"uniform": [0.1]}}, r"params\.stego\.lr: uniform takes \[low, high\]"),
    ({"stego.lr": {"uniform": [0.5, 0.1]}}, r"params\.stego\.lr: uniform needs low < high"),
    ({"stego.lr": {"loguniform": [0, 0.1]}}, r"params\.stego\.lr: loguniform needs 0 < low"),
    ({"stego.lr": {"uniform": ["a", 1]}}, r"params\.stego\.lr: uniform bound #1 must be a finite number"),
    ({"stego.lr": {"quniform": [0, 1, -1]}}, r"quniform step q must be positive"),
    ({"stego.lr": {"choice": []}}, r"params\.stego\.lr: choice needs a non-empty list"),
    ({"stego.lr": [0.1, 0.2]}, r"params\.stego\.lr must be a one-entry mapping"),
    ({"stego.dim": {"uniform": [8, 64]}}, r"'stego\.dim' is int; use randint or choice"),
    ({"stego.dim": {"randint": [8.5, 64]}}, r"randint bounds must be integers"),
    ({"stego.projection_type": {"choice": ["linear", "cubic"]}}, r"value 'cubic'.*not one of"),
    ({"ds2dl.r": {"uniform": [0.0, 2.0]}}, r"params\.ds2dl\.r \(value 0\.0\).*must be positive"),
    ({"train.output_dir": {"choice": ["a"]}}, r"set by the sweep for each trial"),
])
def test_bad_parameters_are_named(params, pattern):
    with pytest.raises(T.SweepError, match=pattern):
        T.parse_sweep(minimal(**params))


@pytest.mark.parametrize("change, pattern", [
    ({"num_sample": 3}, r"unknown key\(s\) \['num_sample'\] in the sweep file"),
    ({"scheduler": {"grace": 3}}, r"unknown key\(s\) \['grace'\] in scheduler"),
    ({"scheduler": {"type": "hyperband"}}, r"scheduler\.type must be one of"),
    ({"search": "bayes"}, r"search must be one of"),
    ({"mode": "maximise"}, r"mode must be 'max' or 'min'"),
    ({"num_samples": "many"}, r"sweep\.num_samples must be an integer"),
    ({"resources": {"gpu": "one"}}, r"resources\.gpu must be a number"),
    ({"overrides": ["train.num_stepz=5"]}, r"overrides entry 'train\.num_stepz=5'.*num_stepz"),
    ({"overrides": ["tracking.uri=x"]}, r"set by the sweep"),
    ({"overrides": ["stego.lr=0.1"]}, r"both searched \(params\) and fixed"),
    ({"search": "grid"}, r"search: grid enumerates values, but \['stego\.lr'\]"),
    ({"search": "optuna", "params": {"stego.lr": {"grid": [0.1]}}}, r"optuna cannot enumerate grids"),
    ({"recipe": None}, r"needs `recipe:`"),
    ({"budget": {"max_steps": 5}, "overrides": ["train.num_steps=7"]}, r"both set train\.num_steps"),
])
def test_bad_sweep_entries_are_named(change, pattern):
    data = {**minimal(**{"stego.lr": {"loguniform": [1e-4, 1e-2]}}), **change}
    with pytest.raises(T.SweepError, match=pattern):
        T.parse_sweep(data)


def test_missing_sweep_file_and_bad_cli_override():
    with pytest.raises(T.SweepError, match="sweep file not found"):
        T.parse_sweep("nope.yaml")
    with pytest.raises(T.SweepError, match="must look like key=value"):
        T.parse_sweep(SWEEP_TOY, ["num_samples"])


def test_cli_reports_errors_without_a_traceback(capsys):
    from dist_seg import cli

    assert cli.main(["sweep", str(SWEEP_TOY), "params.stego.bogus={uniform: [0, 1]}"]) == 2
    assert "params.stego.bogus" in capsys.readouterr().err


def test_tracking_uri_is_made_absolute(tmp_path):
    assert T.absolute_tracking_uri("sqlite:///mlflow.db", str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    assert T.absolute_tracking_uri("sqlite:////abs/m.db", str(tmp_path)) == "sqlite:////abs/m.db"
    assert T.absolute_tracking_uri("mlruns", str(tmp_path)) == str(tmp_path / "mlruns")
    assert T.absolute_tracking_uri("http://mlflow:5000", str(tmp_path)) == "http://mlflow:5000"


def test_runs_of_trials_stopped_by_the_scheduler_are_settled(tmp_path):
    """After the sweep, a run whose trial ASHA interrupted is KILLED and tagged; errors stay FAILED."""
    from types import SimpleNamespace

    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    names = {"a": "RUNNING", "b": "FAILED", "c": "FINISHED", "d": "RUNNING"}
    ids = {}
    for key, status in names.items():
        run = client.create_run(exp, run_name=f"t0{key}", tags={MLFLOW_PARENT_RUN_ID: parent, "sweep.trial_id": key,
                                                                "sweep.name": "s"})
        ids[key] = run.info.run_id
        if status != "RUNNING":
            client.set_terminated(ids[key], status=status)
    grid = [SimpleNamespace(metrics={"trial_id": "a", "step": 5}, error=None, path="a"),
            SimpleNamespace(metrics={"trial_id": "b", "step": 5}, error=RuntimeError("boom"), path="b"),
            SimpleNamespace(metrics={"trial_id": "c", "step": 10}, error=None, path="c"),
            SimpleNamespace(metrics={"trial_id": "d", "step": 10}, error=None, path="d"),
            SimpleNamespace(metrics={}, error=RuntimeError("never reported"), path="e")]
    ctx = T.TrialContext(base_config={}, fixed_overrides=[], parent_run_id=parent, tracking_uri=uri, experiment="e",
                         sweep_name="s", metric="val/cluster_mIoU")
    T.reconcile_runs(grid, ctx, num_steps=10)
    runs = {k: client.get_run(v) for k, v in ids.items()}
    assert runs["a"].info.status == "KILLED" and runs["a"].data.tags["sweep.early_stopped"] == "true"
    assert runs["a"].data.tags["sweep.stopped_at_step"] == "5"
    assert runs["b"].info.status == "FAILED" and "boom" in runs["b"].data.tags["error"]
    assert runs["c"].info.status == "FINISHED" and "sweep.early_stopped" not in runs["c"].data.tags
    assert runs["d"].info.status == "FINISHED", "a trial that ran every step is finished"


def test_resume_needs_an_existing_sweep(tmp_path):
    spec = T.parse_sweep({**minimal(**{"stego.lr": {"loguniform": [1e-4, 1e-2]}}), "storage_path": str(tmp_path)})
    with pytest.raises(T.SweepError, match="nothing to resume"):
        T.run_sweep(spec, resume=True)


# ------------------------------------------------------------------------------ paths in sweep files
def test_recipe_of_a_sweep_file_resolves_from_any_directory(tmp_path, monkeypatch):
    """`recipe: recipes/stego_toy.py` means the project's recipe wherever the sweep is started from."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = T.parse_sweep(SWEEP_TOY)
    assert spec.recipe == "recipes/stego_toy.py" and spec.base_dir == str(SWEEP_TOY.parent)
    assert T.recipe_search_dirs(spec) == [SWEEP_TOY.parent, REPO], "the sweep's folder, then its project root"
    cfg = T.base_config(spec)
    assert cfg.method == "stego" and cfg.train.num_steps == 10, "recipe + the sweep's budget.max_steps"
    assert T.recipe_path(spec) == str(REPO / "recipes" / "stego_toy.py")

    # a sweep file beside its own recipe, in a project of its own
    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (project / "recipes" / "mine.py").write_text((REPO / "recipes" / "stego_toy.py").read_text())
    (project / "sweeps").mkdir()
    own = project / "sweeps" / "s.yaml"
    own.write_text(yaml.safe_dump({"name": "s", "recipe": "recipes/mine.py",
                                   "params": {"stego.lr": {"loguniform": [1e-4, 1e-2]}}}))
    assert T.base_config(T.parse_sweep(own)).method == "stego"
    assert T.recipe_path(T.parse_sweep(own)) == str(project / "recipes" / "mine.py")

    # a recipe that is nowhere: the error names every place tried
    own.write_text(yaml.safe_dump({"name": "s", "recipe": "recipes/missing.py",
                                   "params": {"stego.lr": {"loguniform": [1e-4, 1e-2]}}}))
    with pytest.raises(T.SweepError) as err:
        T.base_config(T.parse_sweep(own))
    message = str(err.value)
    for place in (project / "sweeps" / "recipes" / "missing.py", project / "recipes" / "missing.py",
                  elsewhere / "recipes" / "missing.py"):
        assert str(place) in message, f"{place} not listed in: {message}"


# ------------------------------------------------------------------------------ end-to-end sweep
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("data") / "toy"
    # 8 samples per shard: enough shards for 2 ranks in the multi-worker test
    generate_toy(root, num_train=32, num_val=16, num_classes=3, samples_per_shard=8)
    return root


def _children(tmp_path, experiment):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[experiment])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1, f"one parent run per sweep expected, got {len(parents)}"
    return parents.iloc[0], runs[runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]]


@pytest.mark.slow
def test_toy_sweep_tracks_every_trial_survives_a_failure_and_resumes(tmp_path, monkeypatch, capsys, toy_root,
                                                                      ray_cluster):
    """recipes/sweep_toy.yaml on 2 CPUs: 4 trials on the toy data plus one on a missing dataset."""
    import shutil

    from dist_seg import cli

    monkeypatch.chdir(tmp_path)  # relative paths below resolve here, in the driver and in the trials
    shutil.copytree(toy_root, "toy")
    argv = ["sweep", str(SWEEP_TOY), "num_samples=1", f"recipe={REPO / 'recipes' / 'stego_toy.py'}",
            "storage_path=ray", "tracking.uri=sqlite:///mlflow.db", "tracking.experiment=toy_sweep", "verbose=0",
            # a grid over datasets: 4 trials on the toy data, one on a folder that does not exist
            "params.data.root={grid: [toy, toy, toy, toy, no_such_dataset]}"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"the sweep must succeed although one trial fails:\n{out}\n{err[-3000:]}"

    parent, children = _children(tmp_path, "toy_sweep")
    assert parent["status"] == "FINISHED", parent
    assert len(children) == 5, f"every trial must be a run nested under the sweep's run, got {len(children)}"
    good = children[children["params.data.root"] == "toy"]
    bad = children[children["params.data.root"] == "no_such_dataset"]
    assert len(good) == 4 and len(set(good["params.stego.lr"])) == 4, "4 trials must train sampled values"
    stopped = good["status"] == "KILLED"
    assert (good["status"].isin(["FINISHED", "KILLED"])).all(), good[["status", "tags.error"]]
    if stopped.any():  # whether ASHA stops one of 4 toy trials depends on their order of arrival
        assert (good.loc[stopped, "tags.sweep.early_stopped"] == "true").all(), "ASHA stops are tagged"
    assert (good["status"] == "FINISHED").any(), "ASHA keeps the best trial running to the end"
    assert good["metrics.val/cluster_mIoU"].notna().all(), "every trial reports val/cluster_mIoU"
    assert len(bad) == 1 and bad.iloc[0]["status"] == "FAILED", bad[["status"]]
    assert "no dataset at" in bad.iloc[0]["tags.error"], bad.iloc[0]["tags.error"]

    best = good.sort_values("metrics.val/cluster_mIoU", ascending=False).iloc[0]
    assert f"val/cluster_mIoU = {best['metrics.val/cluster_mIoU']:.4f}" in out, out
    line = next(row for row in out.splitlines() if row.startswith("best overrides: "))
    assert "data.root=toy" in line, line
    best_lr = float(re.search(r"stego\.lr=([0-9.e-]+)", line).group(1))
    assert math.isclose(best_lr, float(best["params.stego.lr"]), rel_tol=1e-6), (line, best["params.stego.lr"])
    assert parent["tags.sweep.best_overrides"] == line[len("best overrides: "):]

    # --resume trains nothing twice; with --retry-failed the failed trial runs again once its data exists
    shutil.copytree(toy_root, "no_such_dataset")
    assert cli.main(argv + ["--resume", "--retry-failed"]) == 0, capsys.readouterr().out
    _, children = _children(tmp_path, "toy_sweep")
    retried = children[children["params.data.root"] == "no_such_dataset"]
    assert list(retried["status"]) == ["FINISHED"], "the retried trial continues its own (failed) MLflow run"
    assert "no dataset at" in retried.iloc[0]["tags.previous_error"] and pd_missing(retried.iloc[0].get("tags.error"))
    assert len(children) == 5, "only the failed trial may run again on resume, in the same MLflow run"


@pytest.mark.slow
def test_multi_worker_trial_runs_as_a_torch_trainer(tmp_path, monkeypatch, capsys, toy_root, ray_cluster):
    """trial_workers=2: the trial is a Ray Train TorchTrainer over 2 gloo processes (CPU)."""
    from dist_seg import cli

    monkeypatch.chdir(tmp_path)
    argv = ["sweep", str(SWEEP_TOY), "num_samples=1", "trial_workers=2", "scheduler.type=none",
            f"recipe={REPO / 'recipes' / 'stego_toy.py'}", f"overrides+=data.root={toy_root}",
            "storage_path=ray", "tracking.uri=sqlite:///mlflow.db", "tracking.experiment=workers", "verbose=0",
            "budget.time_budget_s=240"]
    assert cli.main(argv) == 0, capsys.readouterr().out
    _, children = _children(tmp_path, "workers")
    assert len(children) == 1 and children.iloc[0]["status"] == "FINISHED", children[["status", "tags.error"]]
    assert children.iloc[0]["tags.world_size"] == "2", "the trial must train on 2 processes"
    assert children.iloc[0]["metrics.val/cluster_mIoU"] > 0


@pytest.mark.slow
def test_sweep_started_elsewhere_and_plain_runs_lists_its_trials(tmp_path, monkeypatch, capsys, toy_root,
                                                                ray_cluster):
    """`cd /tmp && dist-seg sweep /path/to/recipes/sweep_toy.yaml` (3 trials), then a plain `dist-seg runs` shows
    the trials; their MLflow runs and models say which sweep and trial they are."""
    import shutil
    import subprocess

    from dist_seg import cli

    monkeypatch.chdir(tmp_path)  # no recipes/ here: the sweep file's project provides recipes/stego_toy.py
    shutil.copytree(toy_root, tmp_path / "data" / "toy")  # the recipe's data.root=data/toy, relative to here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    argv = ["sweep", str(SWEEP_TOY), "num_samples=3", "scheduler.type=none", "budget.max_steps=2",
            "storage_path=ray", "verbose=0"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"{out}\n{err[-3000:]}"
    assert "recipe not found" not in err
    assert f"reproduce: dist-seg train {REPO / 'recipes' / 'stego_toy.py'}" in out, out
    summary = out[out.index("experiment 'dist_seg_sweeps'"):]
    assert summary.count("FINISHED") == 3 and "cluster mIoU" in summary, summary

    assert cli.main(["runs"]) == 0, "runs of every experiment, the sweep's included"
    listing = capsys.readouterr().out
    assert "experiment 'dist_seg_sweeps': 4 runs" in listing, listing
    trials = [line for line in listing.splitlines() if line.startswith("└")]
    assert len(trials) == 3 and all("2/2" in t for t in trials), listing
    assert all(len(line) <= 120 for line in listing.splitlines())

    # The MLflow record: trial names that stay distinct when cut, a parent run that explains the sweep, and
    # each trial's model saying where it comes from.
    import mlflow

    parent, children = _children(tmp_path, "dist_seg_sweeps")
    names = list(children["tags.mlflow.runName"])
    assert len({name[:24] for name in names}) == 3, f"trial names must differ in their first 24 characters: {names}"
    assert sorted(name.split()[0] for name in names) == ["t00", "t01", "t02"], names
    assert (children["tags.sweep.name"] == "stego_toy_sweep").all() and children["tags.sweep.trial_id"].notna().all()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert parent["tags.mlflow.source.git.commit"] == commit.strip(), "the parent run names the code's commit"
    assert parent["tags.mlflow.source.name"] == str(SWEEP_TOY) and parent["tags.mlflow.source.type"] == "LOCAL"
    assert "Ray Tune sweep 'stego_toy_sweep'" in parent["tags.mlflow.note.content"], "the parent has a description"
    spec = T.parse_sweep(SWEEP_TOY)
    for key, p in spec.params.items():
        assert parent[f"params.space.{key}"] == f"{p.kind}({', '.join(map(str, p.args))})", key
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(parent["run_id"], "sweep_file")]
    assert artifacts == ["sweep_file/sweep_toy.yaml"], artifacts
    best = children.sort_values("metrics.val/cluster_mIoU", ascending=False).iloc[0]
    assert parent["tags.sweep.best_run_id"] == best["run_id"] and parent["tags.sweep.best_trial"] == \
        best["tags.mlflow.runName"], "the parent names its best trial"
    models = mlflow.search_logged_models(experiment_ids=[parent["experiment_id"]], output_format="list")
    assert {m.tags["sweep.trial_id"] for m in models} == set(children["tags.sweep.trial_id"])
    assert all(m.tags["sweep.name"] == "stego_toy_sweep" and m.tags["sweep.parent_run_id"] == parent["run_id"]
               for m in models)
    assert all("(dist-seg sweep stego_toy_sweep)" in m.tags["mlflow.source.name"] for m in models), \
        "logged from the sweep's recipe, not from Ray's worker script"


def pd_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


SIGINT_SWEEP = {
    "name": "sig", "recipe": str(REPO / "recipes" / "stego_toy.py"), "metric": "val/cluster_mIoU", "mode": "max",
    "search": "random", "seed": 0, "num_samples": 2, "max_concurrent_trials": 1, "max_failures": 0,
    "scheduler": {"type": "none"}, "resources": {"cpu": 1, "gpu": 0}, "budget": {"max_steps": 12},
    "overrides": ["train.val_every=4", "train.checkpoint_every=2", "train.log_every=2", "data.batch_size=8",
                  "data.num_workers=0", "data.max_val_samples=8", "eval.num_overlays=0", "data.root=toy"],
    "params": {"stego.lr": {"loguniform": [1.0e-4, 5.0e-3]}},
    "storage_path": "ray", "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "sig"}, "verbose": 0,
}


@pytest.mark.slow
def test_an_interrupted_sweep_says_so_and_resumes_each_trial_in_its_own_run(tmp_path, toy_root, ray_cluster):
    """Ctrl-C after the first checkpoint: non-zero exit, runs KILLED + sweep.interrupted, the resume command; one
    trial at a time (max_concurrent_trials: 1). --resume: one MLflow run per trial, each with one history."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    shutil.copytree(toy_root, tmp_path / "toy")
    (tmp_path / "sig.yaml").write_text(yaml.safe_dump(SIGINT_SWEEP))
    command = [sys.executable, "-c", "import sys; from dist_seg.cli import main; sys.exit(main(sys.argv[1:]))",
               "sweep", "sig.yaml", "--num-cpus", "2"]
    # MLflow's system metrics every second (default 10 s): a toy trial runs for seconds.
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 240
    while not list((tmp_path / "ray" / "sig").glob("*/run/checkpoints/step-*.pt")):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before its first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, f"an interrupted sweep must exit non-zero ({proc.returncode}):\n{out}\n{err[-3000:]}"
    assert "INTERRUPTED" in out and "resume with: dist-seg sweep sig.yaml --resume" in out, out
    assert "best trial" not in out and "reproduce:" not in out, "nothing finished: no best trial"
    both = out + err
    assert both.count("--resume") == 1 and "Resume experiment" not in both and "Tuner.restore" not in both, \
        f"one resume line, ours:\n{both}"
    assert "FileNotFoundError" not in both and "Failed to fetch metrics" not in both, err[-3000:]
    assert "1 of the 1 trials started did not finish" in out and "1 not started" in out, out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sig").experiment_id

    def runs():
        found = client.search_runs([experiment])
        parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1
        return parents[0], [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]

    parent, trials = runs()
    assert parent.info.status == "KILLED" and parent.data.tags.get("sweep.interrupted") == "true"
    assert len(trials) == 1, "max_concurrent_trials: 1 runs one trial at a time"
    for run in trials:
        assert run.info.status == "KILLED" and run.data.tags.get("sweep.interrupted") == "true", run.data.tags
        assert "sweep.early_stopped" not in run.data.tags, "the scheduler (none) stopped nothing"
        assert run.data.tags["sweep.name"] == "sig" and run.data.tags["sweep.trial_id"], run.data.tags

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                             env=env)
    assert resumed.returncode == 0, f"{resumed.stdout}\n{resumed.stderr[-3000:]}"
    parent, trials = runs()
    assert parent.info.status == "FINISHED" and "sweep.interrupted" not in parent.data.tags
    assert len(trials) == 2 and len({r.info.run_name for r in trials}) == 2, "one MLflow run per trial"
    for run in trials:
        assert run.info.status == "FINISHED" and "sweep.interrupted" not in run.data.tags, run.data.tags
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(2, 13, 2)), f"{run.info.run_name}: one unbroken history, got {steps}"
        val = [m.step for m in client.get_metric_history(run.info.run_id, "val/cluster_mIoU")]
        assert val == [4, 8, 12], f"{run.info.run_name}: validations {val}"
        assert "system/cpu_utilization_percentage" in run.data.metrics, "trials log MLflow's system metrics"
    assert sum(r.data.tags.get("resumes") == "1" for r in trials) == 1, "the interrupted trial continued its run"

    from ray import tune

    grid = tune.Tuner.restore(str(tmp_path / "ray" / "sig"), trainable=T.TRAINABLE_NAME).get_results()
    assert all(r.checkpoint is not None for r in grid), "trials report their checkpoints to Tune"
    with grid[0].checkpoint.as_directory() as folder:
        assert [p.name for p in Path(folder).glob("step-*.pt")] == ["step-00000012.pt"]

    listing = subprocess.run([sys.executable, "-c", "import sys; from dist_seg.cli import main; "
                              "sys.exit(main(sys.argv[1:]))", "runs", "--uri", "sqlite:///mlflow.db",
                              "--experiment", "sig"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    rows = [line for line in listing.stdout.splitlines() if line.startswith("└")]
    assert len(rows) == 2 and len({row.split()[1] for row in rows}) == 2, listing.stdout


def test_metric_agreement_is_a_rank_correlation():
    import pandas as pd

    frame = pd.DataFrame({"val/label_free": [0.1, 0.3, 0.2, 0.5, None],
                          "val/cluster_mIoU": [10.0, 35.0, 30.0, 90.0, 50.0]})
    rho, n = T.metric_agreement(frame)
    assert n == 4 and rho == pytest.approx(1.0), "monotone agreement must give rho = 1 over the 4 complete rows"
    frame["val/cluster_mIoU"] = [90.0, 30.0, 35.0, 10.0, 50.0]
    assert T.metric_agreement(frame)[0] == pytest.approx(-1.0)
    assert T.metric_agreement(frame[["val/cluster_mIoU"]]) is None, "no label-free column, no agreement"
