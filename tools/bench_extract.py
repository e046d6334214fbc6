"""Benchmark ``dist-seg extract``: images/s of today's extraction against the one of commit 9368cc6, side by side.

Both run in this process on the same toy dataset (``dist-seg prepare toy``) and the same frozen backbone
(the toy ViT by default), interleaved and repeated, each writing a fresh feature cache:

* ``before``: ``extract_split`` as it was at ``--baseline`` (read with ``git show`` from this checkout's
  history): decoding in the main process, the training batch per forward (``data.batch_size`` / ranks),
  one device-to-host copy and one encode per record;
* ``after``: today's ``extract_split`` with ``data.num_workers`` loader workers, ``extract.batch_size``
  images per forward and one host copy per batch.

It prints images/s for each (median of rounds), the ratio after/before, and checks that both caches hold
the same records (features equal within fp16 rounding). Example::

    python tools/bench_extract.py --num-images 256 --workers 2 --repeats 3 --json bench_extract.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_common import REPO, commit  # noqa: E402 - puts this checkout on sys.path first

BASELINE = "9368cc6"


def load_baseline(commit: str):
    """The ``dist_seg.features`` module of ``commit``, imported under another name (its own imports resolve to
    today's package, which keeps every name that module used)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:dist_seg/features.py"], capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench_extract_")) / f"features_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"features_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def read_cache(split_dir: Path) -> dict[int, np.ndarray]:
    import webdataset as wds

    out = {}
    for shard in sorted(split_dir.glob("shard-*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False).decode():
            if "feat.npy" in sample:
                out[int(sample["json"]["index"])] = sample["feat.npy"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128, help="side of the toy images")
    parser.add_argument("--res", type=int, default=64, help="extraction resolution")
    parser.add_argument("--backbone", default="toy")
    parser.add_argument("--train-batch", type=int, default=32,
                        help="data.batch_size (what the baseline used per forward on one process)")
    parser.add_argument("--extract-batch", type=int, default=256, help="extract.batch_size")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="commit whose extract_split is 'before'")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from dist_seg import features as after_module
    from dist_seg.backbones import load_backbone
    from dist_seg.data.toy import generate_toy

    if args.threads:
        torch.set_num_threads(args.threads)
    before_module = load_baseline(args.baseline)
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "commit": commit(), "baseline": args.baseline, "nproc": os.cpu_count(),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "torch_threads": torch.get_num_threads()}
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        root = tmp / "toy"
        generate_toy(root, num_train=args.num_images, num_val=8, samples_per_shard=args.samples_per_shard,
                     size=args.image_size)
        backbone = load_backbone(args.backbone).eval()
        device = torch.device("cpu")
        cases = {
            "before": lambda cache: before_module.extract_split(
                backbone, root, "train", cache, res=args.res, batch_size=args.train_batch, device=device),
            "after": lambda cache: after_module.extract_split(
                backbone, root, "train", cache, res=args.res, batch_size=args.extract_batch, device=device,
                num_workers=args.workers),
        }
        rates: dict[str, list[float]] = {name: [] for name in cases}
        caches = {}
        for round_index in range(args.repeats):
            order = list(cases) if round_index % 2 == 0 else list(reversed(cases))
            for name in order:
                cache = tmp / f"cache-{name}-{round_index}"
                start = time.perf_counter()
                cases[name](cache)
                rates[name].append(args.num_images / (time.perf_counter() - start))
                caches[name] = cache
            print(f"# round {round_index + 1}/{args.repeats}: "
                  + ", ".join(f"{k} {v[-1]:.1f} images/s" for k, v in rates.items()), flush=True)
        a, b = read_cache(caches["before"] / "train"), read_cache(caches["after"] / "train")
        same = sorted(a) == sorted(b) and all(np.allclose(a[i].astype(np.float32), b[i].astype(np.float32),
                                                          atol=2e-3, rtol=2e-3) for i in a)
        med = {k: statistics.median(v) for k, v in rates.items()}
        info.update(images=args.num_images, image_size=args.image_size, res=args.res, backbone=args.backbone,
                    workers=args.workers, train_batch=args.train_batch, extract_batch=args.extract_batch,
                    images_per_s=rates, median_images_per_s=med, ratio=med["after"] / med["before"],
                    same_features=same, load_avg_after=[round(x, 2) for x in os.getloadavg()])
        print(f"{'case':>8} {'images/s':>10}")
        for k, v in med.items():
            print(f"{k:>8} {v:>10.1f}")
        print(f"ratio after/before: {info['ratio']:.2f}x; same features: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if info["same_features"] else 1


if __name__ == "__main__":
    sys.exit(main())
