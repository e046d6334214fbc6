"""`dist-seg eval` (checkpoints and the paper-002 baselines) and `dist-seg predict` on generated data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_seg import cli
from dist_seg.config import merge
from dist_seg.runtime import load_recipe
from dist_seg.trainer import train

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stego_toy.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dist_seg.data.toy import generate_toy

    tmp = tmp_path_factory.mktemp("evalpred")
    generate_toy(tmp / "toy", num_train=48, num_val=16, samples_per_shard=8)
    overrides = [f"data.root={tmp / 'toy'}", f"train.output_dir={tmp / 'run'}", "data.batch_size=8",
                 "data.num_workers=0", "stego.feature_samples=5", "train.num_steps=4", "train.val_every=0",
                 "tracking.enabled=false"]
    train(merge(load_recipe(RECIPE)(), overrides=overrides))
    return tmp, overrides


def test_baselines_table_from_one_command(trained, capsys):
    tmp, overrides = trained
    code = cli.main(["eval", "--baselines", "raw", "pca", "rp", "--recipe", RECIPE, "--out", str(tmp / "base"),
                     *overrides])
    assert code == 0
    out = capsys.readouterr().out
    for row in ("baseline raw", "baseline pca", "baseline rp"):
        line = next((ln for ln in out.splitlines() if ln.startswith(row)), None)
        assert line is not None, f"missing row {row} in:\n{out}"
        numbers = [float(x) for x in line[len(row):].split()]
        assert len(numbers) == 4 and all(0 <= x <= 100 for x in numbers), line
    assert (tmp / "base" / "baseline_pca.json").is_file()


def test_eval_checkpoint(trained, capsys):
    tmp, _ = trained
    ckpt = tmp / "run" / "checkpoints" / "step-00000004.pt"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp / "ev")]) == 0
    assert "stego (step 4)" in capsys.readouterr().out
    assert (tmp / "ev" / "stego_step_4.json").is_file()
    assert cli.main(["eval", "--checkpoint", str(tmp / "missing.pt")]) == 2


def test_eval_crf_reports_beside_the_plain_ones(trained, capsys):
    import json

    tmp, _ = trained
    ckpt = tmp / "run" / "checkpoints" / "step-00000004.pt"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp / "evcrf")]) == 0
    plain = (tmp / "evcrf" / "stego_step_4.json").read_text()
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp / "evcrf"), "--crf",
                     "eval.crf_workers=0"]) == 0
    out = capsys.readouterr().out
    assert "stego (step 4) + CRF" in out and "dense CRF" in out, out
    assert (tmp / "evcrf" / "stego_step_4.json").read_text() == plain, "the plain report is kept"
    assert json.loads(plain)["crf"] is False
    assert json.loads((tmp / "evcrf" / "stego_step_4_crf.json").read_text())["crf"] is True


def test_predict_folder_of_any_size(trained, capsys):
    tmp, _ = trained
    images = tmp / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"a.png": (50, 70), "b.jpg": (64, 64), "sub/c.png": (97, 33)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.png").write_bytes(b"not an image")
    code = cli.main(["predict", "--checkpoint", str(tmp / "run" / "checkpoints" / "step-00000004.pt"),
                     "--images", str(images), "--out", str(tmp / "pred"), "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert "1 unreadable or refused" in captured.out and "broken.png: unreadable" in captured.err, captured
    for name, (h, w) in sizes.items():
        label = np.asarray(Image.open(tmp / "pred" / "labels" / Path(name).with_suffix(".png")))
        assert label.shape == (h, w), f"{name}: label {label.shape} != image {(h, w)}"
        assert label.max() < 5, "labels are class ids mapped through the stored matching"
        assert (tmp / "pred" / "overlays" / Path(name).with_suffix(".png")).is_file()
