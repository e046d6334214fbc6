"""Prediction throughput (images/s) of ``dist-seg predict``'s engine against the per-image loop it replaced, on
the same images in one run, and the peak memory of one large image; with the H200 bound from FLOP counts.

* ``loop``: what ``dist-seg predict`` did before dist_seg/predict/: one image at a time, decoded in the main
  process, the code upsampled to the whole image at once (:func:`dist_seg.predict.predict_image`), PNG written.
* ``engine``: :func:`dist_seg.predict.runner.predict_items`: decoding in DataLoader workers, batches grouped
  by size, label maps in bands, atomic writes.
* ``--large N``: an N x N image through ``dist-seg predict`` in a fresh process; its peak resident memory
  (``ru_maxrss`` of that process) is the figure.

    python tools/bench_predict.py --images 48 --large 11000 --json bench_predict.json

Without ``--checkpoint`` a toy STEGO checkpoint is trained first (seconds); a real checkpoint measures its own
backbone. The bound: each image is encoded twice (flip averaging); a ViT's forward costs
``2 L (12 N d^2 + 2 N^2 d)`` FLOPs for ``N`` tokens of width ``d`` over ``L`` blocks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_common import REPO, commit, machine, write_record  # noqa: E402 - puts this checkout on sys.path first
from PIL import Image  # noqa: E402

H200_BF16_FLOPS = 790e12  # dense bf16 tensor-core peak used for the bound (docs/benchmarks.md)
VITS = {"ViT-B/8 (DINO)": dict(depth=12, width=768, patch=8), "ViT-L/16 (DINOv3)": dict(depth=24, width=1024, patch=16)}


def encode_flops(*, depth: int, width: int, patch: int, res: int) -> float:
    """FLOPs of one image's flip-averaged encode (two forwards) at ``res`` x ``res``."""
    tokens = (res // patch) ** 2
    return 2 * 2 * depth * (12 * tokens * width**2 + 2 * tokens**2 * width)


def toy_checkpoint(tmp: Path) -> Path:
    from dist_seg.config import merge
    from dist_seg.data.toy import generate_toy
    from dist_seg.runtime import load_recipe
    from dist_seg.trainer import train

    generate_toy(tmp / "toy", num_train=32, num_val=8, samples_per_shard=8)
    cfg = merge(load_recipe(str(REPO / "recipes" / "stego_toy.py"))(), overrides=[
        f"data.root={tmp / 'toy'}", f"train.output_dir={tmp / 'run'}", "data.batch_size=8", "data.num_workers=0",
        "stego.feature_samples=5", "train.num_steps=4", "train.val_every=0", "tracking.enabled=false"])
    train(cfg)
    return tmp / "run" / "checkpoints" / "step-00000004.pt"


def make_images(folder: Path, num: int, sizes: list[int]) -> None:
    from dist_seg.data.toy import toy_sample

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        side = sizes[i % len(sizes)]
        image = toy_sample(i, split="val", size=64, num_classes=5, seed=0).image
        Image.fromarray(image).resize((side * 4 // 3, side), Image.BILINEAR).save(folder / f"{i:04d}.png")


def run_loop(checkpoint: Path, folder: Path, out: Path, device: str, res: int | None) -> float:
    from dist_seg.predict import Predictor, list_images, predict_image

    predictor = Predictor(checkpoint, device=device)
    out.mkdir(parents=True, exist_ok=True)
    paths = list_images(folder)
    start = time.perf_counter()
    for path in paths:
        image = np.array(Image.open(path).convert("RGB"))
        labels = predict_image(predictor.method, predictor.backbone, image, res=res or predictor.default_res,
                               device=predictor.device, assignment=predictor.assignment)
        Image.fromarray(labels.astype(np.uint8)).save(out / f"{path.stem}.png")
    if device == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def run_engine(checkpoint: Path, folder: Path, out: Path, device: str, res: int | None, batch: int,
               workers: int) -> float:
    from dist_seg.predict import Predictor
    from dist_seg.predict.inputs import folder_items
    from dist_seg.predict.runner import PredictOptions, predict_items
    from dist_seg.predict.writers import Writer

    predictor = Predictor(checkpoint, device=device)
    items = folder_items(folder)
    start = time.perf_counter()
    summary = predict_items(predictor, items, Writer(out), PredictOptions(res=res, batch_size=batch,
                                                                           num_workers=workers, max_pixels=0),
                            progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    assert summary.written == len(items), summary
    return len(items) / (time.perf_counter() - start)


def large_peak(checkpoint: Path, side: int, tmp: Path, device: str) -> dict:
    from dist_seg.data.toy import toy_sample

    folder = tmp / "large"
    folder.mkdir()
    tiles = [toy_sample(i, split="val", size=64, num_classes=5, seed=0).image for i in range(4)]
    mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    Image.fromarray(mosaic).resize((side, side), Image.BILINEAR).save(folder / "large.png", compress_level=1)
    del mosaic
    script = (
        "import sys\nfrom dist_seg import cli\n"
        f"code = cli.main(['predict', '--checkpoint', {str(checkpoint)!r}, '--images', {str(folder)!r}, '--out', "
        f"{str(tmp / 'large_out')!r}, '--max-pixels', '0', '--num-workers', '0', '--no-overlays', "
        f"'--device', {device!r}])\n"
        # VmHWM: this process's own peak (ru_maxrss also keeps the RSS of the process that forked it).
        "print('PEAK_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
        "sys.exit(code)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    peak = int(proc.stdout.split("PEAK_KB")[1].split()[0]) * 1024
    labels = Image.open(tmp / "large_out" / "labels" / "large.png")
    assert labels.size == (side, side)
    return {"side": side, "peak_rss_gib": round(peak / 2**30, 3), "seconds": round(time.perf_counter() - start, 1),
            "image_gib": round(side * side * 3 / 2**30, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a training checkpoint (default: train a toy one)")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--sizes", type=int, nargs="+", default=[240, 360, 480], help="image heights (4:3)")
    parser.add_argument("--res", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--large", type=int, default=0, help="side of the large image (0: skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        checkpoint = Path(args.checkpoint) if args.checkpoint else toy_checkpoint(tmp)
        make_images(tmp / "images", args.images, args.sizes)
        # Warm both paths once (imports, allocator), then measure each on the same images.
        run_loop(checkpoint, tmp / "images", tmp / "warm", args.device, args.res)
        loop = run_loop(checkpoint, tmp / "images", tmp / "loop", args.device, args.res)
        engine = run_engine(checkpoint, tmp / "images", tmp / "engine", args.device, args.res, args.batch_size,
                            args.num_workers)
        same = all((tmp / "loop" / p.name).read_bytes() == p.read_bytes()
                   for p in (tmp / "engine" / "labels").glob("*.png"))
        result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"), "commit": commit(),
                  "machine": machine(args.device),
                  "command": " ".join(["python", "tools/bench_predict.py", *sys.argv[1:]]),
                  "images": args.images, "sizes": args.sizes, "device": args.device,
                  "loop_images_per_s": round(loop, 2), "engine_images_per_s": round(engine, 2),
                  "speedup": round(engine / loop, 2), "same_label_maps": same}
        print(f"{'path':<10}{'images/s':>10}")
        print(f"{'loop':<10}{loop:>10.2f}")
        print(f"{'engine':<10}{engine:>10.2f}   ({engine / loop:.2f}x; same label maps: {same})")
        if args.large:
            result["large"] = large_peak(checkpoint, args.large, tmp, args.device)
            print(f"{args.large}x{args.large} image: peak RSS {result['large']['peak_rss_gib']} GiB "
                  f"(the image alone {result['large']['image_gib']} GiB), {result['large']['seconds']} s")
        bound = {}
        for name, vit in VITS.items():
            flops = encode_flops(**vit, res=320)
            bound[name] = round(H200_BF16_FLOPS / flops)
            print(f"H200 bound, {name} at 320 px with flip averaging: {flops / 1e9:.0f} GFLOP/image -> "
                  f"<= {bound[name]} images/s at {H200_BF16_FLOPS / 1e12:.0f} TFLOP/s")
        result["h200_bound_images_per_s_at_320"] = bound
        write_record(args.json, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
