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
    from dist_seg.predict.inputs import ImageDataset, shard_items

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
        "import sys; from dist_seg import cli\n"
        f"code = cli.main(['predict', '--checkpoint', '{ckpt}', '--images', '{tmp_path}', '--out', "
        f"'{tmp_path / 'out'}', '--num-workers', '0', '--device', 'cpu'])\n"
        # VmHWM is this process's own peak; ru_maxrss would also count the forking pytest process's RSS.
        "print('PEAK_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
        "sys.exit(code)\n")
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


# ------------------------------------------------------------------------------------ sliding window
def test_sliding_window_on_a_mosaic_matches_the_cells(trained):
    from dist_seg.predict import Predictor

    tmp, ckpt = trained
    predictor = Predictor(ckpt)
    cells = _toy_images(tmp, 6)
    mosaic = np.concatenate([np.concatenate(cells[:3], 1), np.concatenate(cells[3:6], 1)], 0)  # 128 x 192
    per_image = np.concatenate([np.concatenate([predictor(c, res=64) for c in cells[:3]], 1),
                                np.concatenate([predictor(c, res=64) for c in cells[3:6]], 1)], 0)
    assert len(np.unique(per_image)) > 1
    tiled = predictor(mosaic, res=64, tile=64, stride=64)
    assert np.array_equal(tiled, per_image), f"{(tiled != per_image).sum()} pixels differ with stride = tile"
    overlapping = predictor(mosaic, res=64, tile=64, stride=32)
    agree = (overlapping == per_image).mean()
    assert agree >= 0.9, f"50% overlap agrees on {agree:.3f} of the pixels"
    assert not np.array_equal(overlapping, tiled), "overlapping tiles are blended, not overwritten"


def test_tile_grid_covers_the_image():
    from dist_seg.predict.bands import tile_grid

    assert tile_grid(192, 64, 64) == [0, 64, 128]
    assert tile_grid(200, 64, 64) == [0, 64, 128, 136]
    assert tile_grid(50, 64, 32) == [0]
    with pytest.raises(ValueError, match="stride"):
        tile_grid(100, 64, 65)


# ----------------------------------------------------------------------------- many images, ranks
def _folder(tmp: Path, name: str, sizes: list[tuple[int, int]]) -> Path:
    folder = tmp / name
    cells = _toy_images(tmp, len(sizes))
    for i, ((h, w), cell) in enumerate(zip(sizes, cells)):
        (folder / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(cell).resize((w, h), Image.BILINEAR).save(folder / f"d{i % 2}" / f"img{i:02d}.png")
    return folder


def test_two_gloo_ranks_write_each_image_once_identical_to_one_rank(trained):
    tmp, ckpt = trained
    folder = _folder(tmp, "ranks", [(64, 64), (64, 64), (80, 64), (64, 64), (70, 90), (64, 64), (64, 80)])
    common = ["predict", "--checkpoint", str(ckpt), "--images", str(folder), "--batch-size", "2",
              "--num-workers", "1", "--areas", "--device", "cpu"]
    assert cli.main([*common, "--out", str(tmp / "one")]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "dist_seg.cli", *common, "--out", str(tmp / "two")],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 7 label map(s)") == 1, proc.stdout  # rank 0 reports the sum over ranks
    one, two = _outputs(tmp / "one"), _outputs(tmp / "two")
    one.pop("summary.json"), two.pop("summary.json")
    assert len([k for k in one if k.startswith("labels/")]) == 7
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one), \
        [k for k in one if one[k] != two.get(k)]


def test_killed_run_resumes_without_redoing_finished_images(trained):
    tmp, ckpt = trained
    folder = _folder(tmp, "resume", [(160, 160)] * 8)
    common = ["predict", "--checkpoint", str(ckpt), "--images", str(folder), "--tile", "64", "--stride", "16",
              "--num-workers", "0", "--device", "cpu"]
    assert cli.main([*common, "--out", str(tmp / "reference")]) == 0
    out = tmp / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dist_seg.cli", *common, "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(list((out / "labels").rglob("*.png"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in (out / "labels").rglob("*.png")}
    assert 2 <= len(finished) < 8, f"killed after {len(finished)} of 8 images; the test needs a half-way kill"
    resumed = subprocess.run([sys.executable, "-m", "dist_seg.cli", *common, "--out", str(out)], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"wrote {8 - len(finished)} label map(s), skipped {len(finished)} already complete" in resumed.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items()), "a finished image was written again"
    reference, again = _outputs(tmp / "reference"), _outputs(out)
    reference.pop("summary.json"), again.pop("summary.json")
    assert reference == again, "the resumed run's outputs differ from an uninterrupted run's"


# ----------------------------------------------------------------------------------- shard input
def test_shards_input_scores_like_dist_seg_eval(trained):
    import json

    tmp, ckpt = trained
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp / "ev")]) == 0
    evaluated = json.loads((tmp / "ev" / "stego_step_4.json").read_text())["cluster"]
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--shards", str(tmp / "toy" / "val"), "--out",
                     str(tmp / "sh"), "--no-overlays", "--num-workers", "0", "--device", "cpu"]) == 0
    summary = json.loads((tmp / "sh" / "summary.json").read_text())
    assert summary["written"] == 16 and (tmp / "sh" / "labels" / "000000015.png").is_file()
    assert summary["scores"] == {"mIoU": evaluated["mIoU"], "Acc": evaluated["Acc"]}, (summary, evaluated)


# ------------------------------------------------------------------------------------------ Ray Data
def test_ray_data_path_writes_the_plain_paths_label_maps(trained):
    import ray

    tmp, ckpt = trained
    folder = _folder(tmp, "ray", [(64, 64), (64, 64), (80, 64), (70, 90), (64, 64)])
    common = ["predict", "--checkpoint", str(ckpt), "--images", str(folder), "--batch-size", "2",
              "--num-workers", "0", "--device", "cpu"]
    assert cli.main([*common, "--out", str(tmp / "plain")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert cli.main([*common, "--out", str(tmp / "ray_out"), "--ray", "--num-actors", "2"]) == 0
    finally:
        ray.shutdown()
    plain, via_ray = _outputs(tmp / "plain"), _outputs(tmp / "ray_out")
    plain.pop("summary.json"), via_ray.pop("summary.json")
    assert len([k for k in plain if k.startswith("labels/")]) == 5
    assert plain == via_ray, [k for k in plain if plain[k] != via_ray.get(k)]


# ------------------------------------------------------------------------------------ inputs, writers
def test_writer_keeps_ids_above_255_in_16_bit_and_writes_areas(tmp_path):
    from dist_seg.predict.engine import label_dtype
    from dist_seg.predict.writers import Writer, read_labels

    labels = np.arange(600, dtype=np.int64).reshape(20, 30).astype(label_dtype(599))
    assert labels.dtype == np.uint16 and label_dtype(255) == np.uint8
    writer = Writer(tmp_path, overlays=True, areas=True)
    writer.write("a/b", labels, np.zeros((20, 30, 3), np.uint8))
    assert writer.complete("a/b") and not writer.complete("a/c")
    back = read_labels(tmp_path / "labels" / "a" / "b.png")
    assert back.dtype == np.uint16 and np.array_equal(back, labels)
    rows = (tmp_path / "areas" / "a" / "b.csv").read_text().splitlines()
    assert rows[0] == "label,pixels,fraction" and len(rows) == 601 and rows[600].startswith("599,1,")
    assert not list(tmp_path.rglob("*.tmp")), "temporary files are renamed into place"


def test_list_file_items(tmp_path):
    from dist_seg.predict.inputs import InputError, list_file_items

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "imgs" / "x.png")
    (tmp_path / "files.txt").write_text("# my images\nimgs/x.png\n\nimgs/missing.png\n")
    items = list_file_items(tmp_path / "files.txt")
    assert [(i.key, i.size) for i in items] == [("imgs/x", (10, 12)), ("imgs/missing", None)]
    (tmp_path / "bad.txt").write_text("../x.png\n")
    with pytest.raises(InputError, match="absolute path"):
        list_file_items(tmp_path / "bad.txt")
