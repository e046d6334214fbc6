"""The MLflow model (dist_seg/serving.py) takes what users pass, warns about nothing they did, and carries
what `mlflow models serve` needs (real sqlite store, real pyfunc, a fresh process with warnings as errors)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from dist_seg import cli

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stego_toy.py")


def test_pyfunc_takes_an_image_a_batch_and_a_list_without_warnings(tmp_path):
    from dist_seg.data.toy import generate_toy

    generate_toy(tmp_path / "toy", num_train=16, num_val=8, num_classes=3, samples_per_shard=8)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["train", RECIPE, f"data.root={tmp_path / 'toy'}", f"train.output_dir={tmp_path / 'run'}",
                     "train.num_steps=2", "train.val_every=2", "train.checkpoint_every=2", "data.batch_size=8",
                     "data.num_workers=0", "stego.feature_samples=5", f"tracking.uri={uri}"]) == 0
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1]
    script = textwrap.dedent(f"""
        import json, warnings
        import numpy as np, mlflow, mlflow.pyfunc  # MLflow's own import-time warnings are not load/predict's
        from mlflow import MlflowClient
        mlflow.set_tracking_uri({uri!r})
        client = MlflowClient()
        [run] = client.search_runs([client.get_experiment_by_name("dist_seg").experiment_id])
        # The model as `mlflow models serve` gets it: a folder (the sqlite store's own warnings are not the model's).
        local = mlflow.artifacts.download_artifacts(run.data.tags["model_uri"], dst_path={str(tmp_path / 'm')!r})
        print("MODEL", local)
        warnings.simplefilter("error")  # from here, a warning the user did not cause fails the test
        model = mlflow.pyfunc.load_model(local)
        rng = np.random.default_rng(0)
        one = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        one.setflags(write=False)  # what MLflow's request parsing hands over
        batch = rng.integers(0, 255, (2, 32, 48, 3), dtype=np.uint8)
        mixed = [rng.integers(0, 255, (30, 20, 3), dtype=np.uint8), rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)]
        out = {{"one": model.predict(one), "batch": model.predict(batch), "mixed": model.predict(mixed)}}
        np.savez({str(tmp_path / 'out.npz')!r}, one=out["one"], batch=out["batch"], m0=out["mixed"][0],
                 m1=out["mixed"][1],
                 i_one=one, i_batch=batch, i0=mixed[0], i1=mixed[1])
        try:
            model.predict(np.zeros((5, 500, 7), np.uint8))
        except Exception as err:
            print("ERROR", str(err).replace(chr(10), " "))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR"))
    assert "(5, 500, 7)" in error and len(error) < 300, error
    from dist_seg.predict import Predictor

    predictor = Predictor(checkpoint)
    got = np.load(tmp_path / "out.npz")
    assert got["one"].shape == (40, 56) and np.array_equal(got["one"], predictor(got["i_one"]))
    assert got["batch"].shape == (2, 32, 48)
    assert all(np.array_equal(got["batch"][i], predictor(got["i_batch"][i])) for i in range(2))
    assert np.array_equal(got["m0"], predictor(got["i0"])) and np.array_equal(got["m1"], predictor(got["i1"]))
    model_dir = Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("MODEL")).split(" ", 1)[1])
    requirements = (model_dir / "requirements.txt").read_text()
    assert "webdataset==" in requirements and "torch==" in requirements, requirements
    assert (model_dir / "code" / "dist_seg" / "predict" / "engine.py").is_file(), "the model carries dist_seg"
