"""`dist-seg predict` as a subsystem (dist_seg/predict/): bounded memory, sliding window, many images on
several ranks, resume after a kill, shard inputs scored like `dist-seg eval`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dist_seg import cli
from dist_seg.config import merge
from dist_seg.runtime import load_recipe
from dist_seg.trainer import train

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stego_toy.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dist_seg.data.toy import generate_toy

    tmp = tmp_path_factory.mktemp("predict")
    generate_toy(tmp / "toy", num_train=48, num_val=16, samples_per_shard=8)
    overrides = [f"data.root={tmp / 'toy'}", f"train.output_dir={tmp / 'run'}", "data.batch_size=8",
                 "data.num_workers=0", "stego.feature_samples=5", "train.num_steps=4", "train.val_every=0",
                 "tracking.enabled=false"]
    train(merge(load_recipe(RECIPE)(), overrides=overrides))
    return tmp, tmp / "run" / "checkpoints" / "step-00000004.pt"


def _toy_images(tmp: Path, n: int) -> list[np.ndarray]:
    from dist_seg.predict.inputs import shard_items, ImageDataset

    items = shard_items(str(tmp / "toy" / "val"))[:n]
    ds = ImageDataset(items, shards=str(tmp / "toy" / "val"))
    return [ds[i]["image"].numpy() for i in range(len(items))]


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- bands
@pytest.mark.parametrize("shape", [(40, 40, 3000, 3000), (13, 17, 97, 33), (7, 9, 501, 499), (5, 5, 5, 9),
                                   (6, 4, 3, 2)])
@pytest.mark.parametrize("channels", [3, 64])
def test_band_rows_equal_whole_interpolation(shape, channels):
    from dist_seg.predict.bands import band_starts, is_exact, upsample_rows

    # The CPU kernel has a 3-channel path of its own that no band formula reproduces bit for bit.
    exact = is_exact("cpu", channels)
    assert exact == (channels != 3)
    h, w, big_h, big_w = shape
    code = torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(h * w))
    full = F.interpolate(code, size=(big_h, big_w), mode="bilinear", align_corners=False)
    bands = list(band_starts(big_h, big_w, channels, band_elements=channels * big_w * 37))
    assert len(bands) == -(-big_h // 37)
    parts = torch.cat([upsample_rows(code, (big_h, big_w), a, b) for a, b in bands], dim=2)
    if exact:
        assert torch.equal(parts, full), f"max diff {(parts - full).abs().max()}"
    else:
        torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)


def test_bounded_labels_equal_whole_image_path_3000(trained):
    from dist_seg.predict import Predictor, predict_image

    _, ckpt = trained
    predictor = Predictor(ckpt, band_elements=64 * 3000 * 100)  # 30 bands
    rng = np.random.default_rng(0)
    cells = _toy_images(trained[0], 4)
    # A 3000 x 3000 image with structure (toy scenes blown up) plus noise.
    image = np.concatenate([np.concatenate(cells[:2], 1), np.concatenate(cells[2:4], 1)], 0)
    image = np.asarray(Image.fromarray(image).resize((3000, 3000), Image.BILINEAR))
    image = np.clip(image.astype(int) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    whole = predict_image(predictor.method, predictor.backbone, image, res=64, device=torch.device("cpu"),
                          assignment=predictor.assignment)
    bounded = predictor(image, res=64)
    assert bounded.shape == (3000, 3000)
    assert len(np.unique(whole)) > 1, "a label map with one class tests nothing"
    assert np.array_equal(bounded, whole), f"{(bounded != whole).sum()} pixels differ"


def test_peak_memory_is_bounded_by_the_image(trained, tmp_path):
    """A 4000 x 4000 image in a real process: the whole-image path needs 64 x 16M floats (4 GiB) for the code
    alone; the bounded path stays within the image, its float copy and one band."""
    _, ckpt = trained
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (4000, 4000, 3), dtype=np.uint8)).save(
        tmp_path / "big.png")
    script = (
        "import resource, sys; from dist_seg import cli\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"code = cli.main(['predict', '--checkpoint', '{ckpt}', '--images', '{tmp_path}', '--out', "
        f"'{tmp_path / 'out'}', '--num-workers', '0', '--device', 'cpu'])\n"
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split("PEAK_KB")[1].split()[0]) * 1024
    image_bytes = 4000 * 4000 * 3
    # Model + libraries ~0.6 GiB; the image, its float copy (4x), decode buffers (~2x) and bands below 1.2 GiB.
    assert peak < 2.0 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB for a {image_bytes / 2**20:.0f} MiB image"
    assert np.asarray(Image.open(tmp_path / "out" / "labels" / "big.png")).shape == (4000, 4000)


def test_decompression_bomb_limit_is_one_line_naming_the_option(trained, tmp_path, capsys):
    _, ckpt = trained
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "in" / "wide.png")
    args = ["predict", "--checkpoint", str(ckpt), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
            "--num-workers", "0", "--device", "cpu"]
    assert cli.main([*args, "--max-pixels", "100000"]) == 2
    err = capsys.readouterr().err
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1 and "--max-pixels 120000" in error_lines[0], err
    assert "Traceback" not in err and "DecompressionBomb" not in err
    assert cli.main([*args, "--max-pixels", "120000"]) == 0
    assert (tmp_path / "o" / "labels" / "wide.png").is_file()
