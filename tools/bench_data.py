"""Benchmark the shard reader: decoded records/s (and per worker) of every shard format we write.

It writes a temporary dataset with the project's own writers (unless ``--root`` names an existing one
written by an earlier run with ``--keep``):

* image shards: toy scenes (:func:`dist_seg.data.toy.toy_sample`) of ``--image-size`` px, once for each
  of ``--formats`` ``jpg`` (what the real converters write) and ``png`` (lossless, ``--image-format png``),
  through :func:`dist_seg.data.shards.write_split`;
* feature shards: records laid out like the feature cache (``feat.npy`` fp16 ``[C, h, w]``, ``gap.npy``,
  ``label.png``, ``json``) through :func:`dist_seg.data.shards.write_records`, with random values of
  the size a backbone produces (default ViT-S/8 at 224 px: 384 × 28 × 28).

Then, interleaved and repeated, it times

* ``stream``: :func:`dist_seg.data.shards.make_loader` (the trainer's loader: shuffled, infinite) with
  ``--workers`` worker processes (default 1 and 2): the first batch separately (worker start-up), then
  ``--batches`` batches in steady state; the rate per worker is the rate divided by the workers (by 1
  for 0 workers: the training process decodes);
* ``indexed``: :class:`dist_seg.data.shards.IndexedShards` ``get_batch`` on random indices, the way the
  trainer fetches KNN partners (in the training process, synchronously).

The physical bound printed next to each rate is the file read rate of the shards (measured by reading
them back; they were just written, so this is the page cache, i.e. memory, unless the dataset is larger
than RAM) divided by the bytes per record.

Example::

    python tools/bench_data.py --workers 1 2 --json bench_data.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import machine  # noqa: E402 - puts this checkout on sys.path first

from dist_seg.data.shards import IndexedShards, encode_label, make_loader, write_records, write_split
from dist_seg.data.toy import toy_sample

FORMATS = ("jpg", "png", "features")


def write_datasets(root: Path, *, formats: list[str], num_samples: int, samples_per_shard: int, image_size: int,
                   num_classes: int, feat_shape: tuple[int, int, int], label_side: int, seed: int) -> dict[str, Path]:
    """Shards of each format under ``root/<format>`` (split ``train``): image shards for ``jpg``/``png``,
    feature-cache records for ``features``."""
    dirs = {}
    for fmt in formats:
        dirs[fmt] = root / fmt
        if fmt == "features":
            continue
        write_split((toy_sample(i, split="train", num_classes=num_classes, size=image_size, seed=seed)
                     for i in range(num_samples)),
                    dirs[fmt], "train", samples_per_shard=samples_per_shard, image_format=fmt)
    if "features" in formats:
        c, h, w = feat_shape
        rng = np.random.default_rng(seed)

        def records():
            for i in range(num_samples):
                feat = rng.standard_normal((c, h, w), dtype=np.float32)
                gap = feat.mean(axis=(1, 2))
                label = rng.integers(0, num_classes, size=(label_side, label_side), dtype=np.uint8)
                yield {"feat.npy": feat.astype(np.float16), "gap.npy": gap / np.linalg.norm(gap),
                       "label.png": encode_label(label), "json": {"index": i}}

        write_records(records(), dirs["features"], "train", samples_per_shard=samples_per_shard)
    return dirs


def decode_of(fmt: str) -> str:
    return "features" if fmt == "features" else "image"


def read_rate(split_dir: Path) -> tuple[float, float]:
    """(bytes/s reading every shard of the split once, bytes per record)."""
    shards = sorted(split_dir.glob("*.tar"))
    index = json.loads((split_dir / "wids.json").read_text())
    records = sum(s["nsamples"] for s in index["shardlist"])
    total = 0
    start = time.perf_counter()
    for shard in shards:
        with open(shard, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start), total / records


def time_stream(root: Path, decode: str, *, workers: int, batch: int, batches: int, res: int, seed: int) -> dict:
    loader, _ = make_loader(root, "train", batch_size=batch, res=res, num_workers=workers, seed=seed, shuffle=True,
                            infinite=True, decode=decode, shuffle_buffer=100)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    steady = time.perf_counter() - start
    del it  # shuts the workers down
    return {"first_batch_s": first, "samples_per_s": batches * batch / steady}


def time_indexed(reader: IndexedShards, *, batch: int, batches: int, rng: random.Random) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        reader.get_batch([rng.randrange(len(reader)) for _ in range(batch)])
    return batches * batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="dataset folder to use or create (default: a temporary one)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the dataset this run writes under --root (an existing one is never removed)")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=320, help="side of the stored images")
    parser.add_argument("--res", type=int, default=224, help="training resolution (images are resized/cropped)")
    parser.add_argument("--feat-dim", type=int, default=384, help="C of the stored features (ViT-S: 384)")
    parser.add_argument("--patch", type=int, default=8, help="patch size: the feature grid is res/patch")
    parser.add_argument("--num-classes", type=int, default=27)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="steady-state batches per timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    grid = args.res // args.patch
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": machine(), "batch": args.batch, "res": args.res,
            "feature_shape": [args.feat_dim, grid, grid], "image_size": args.image_size,
            "formats": args.formats}
    print(f"# {info['machine']}")
    owned = args.root is None
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_data_"))
    created = False
    try:
        start = time.perf_counter()
        dirs = {fmt: root / fmt for fmt in args.formats}
        if not all((d / "train" / "wids.json").is_file() for d in dirs.values()):
            dirs = write_datasets(root, formats=args.formats, num_samples=args.num_samples,
                                  samples_per_shard=args.samples_per_shard, image_size=args.image_size,
                                  num_classes=args.num_classes, feat_shape=(args.feat_dim, grid, grid),
                                  label_side=args.res, seed=args.seed)
            created = True
        info["write_s"] = time.perf_counter() - start
        files = {d: read_rate(dirs[d] / "train") for d in args.formats}
        num_shards = len(list((dirs[args.formats[0]] / "train").glob("*.tar")))
        workers = [w for w in args.workers if w <= num_shards]

        cases = [(d, "stream", w) for d in args.formats for w in workers] + [(d, "indexed", None) for d in args.formats]
        readers = {d: IndexedShards(dirs[d], "train", res=args.res, decode=decode_of(d)) for d in args.formats}
        rng = random.Random(args.seed)
        samples: dict[str, list[float]] = {}
        first: dict[str, list[float]] = {}
        for round_index in range(args.repeats):
            shift = round_index % len(cases)
            for decode, kind, w in cases[shift:] + cases[:shift]:
                name = f"{decode}-{kind}" + (f"-w{w}" if w is not None else "")
                if kind == "stream":
                    out = time_stream(dirs[decode], decode_of(decode), workers=w, batch=args.batch,
                                      batches=args.batches, res=args.res, seed=args.seed + round_index)
                    samples.setdefault(name, []).append(out["samples_per_s"])
                    first.setdefault(name, []).append(out["first_batch_s"])
                else:
                    samples.setdefault(name, []).append(
                        time_indexed(readers[decode], batch=args.batch, batches=args.batches, rng=rng))
            print(f"# round {round_index + 1}/{args.repeats}: "
                  + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()), flush=True)
        for reader in readers.values():
            reader.close()

        results = {}
        print(f"{'case':>22} {'samples/s':>10} {'per worker':>10} {'first batch s':>13} {'bound/s':>9} {'% bound':>7}"
              "  bytes/record")
        for decode, kind, w in cases:
            name = f"{decode}-{kind}" + (f"-w{w}" if w is not None else "")
            rate, record_bytes = files[decode]
            bound = rate / record_bytes
            median = statistics.median(samples[name])
            entry = {"samples_per_s_median": median, "samples_per_s": samples[name], "bound_samples_per_s": bound,
                     "fraction_of_bound": median / bound,
                     "samples_per_s_per_worker": median / max(1, w or 0)}
            if name in first:
                entry["first_batch_s_median"] = statistics.median(first[name])
            results[name] = entry
            fb = f"{entry['first_batch_s_median']:.2f}" if name in first else "-"
            print(f"{name:>22} {median:>10.0f} {entry['samples_per_s_per_worker']:>10.0f} {fb:>13} {bound:>9.0f} "
                  f"{100 * median / bound:>6.2f}%  "
                  f"{record_bytes / 1024:.0f} KiB")
        info.update(results=results, file_read_bytes_per_s={d: files[d][0] for d in files},
                    record_bytes={d: files[d][1] for d in files}, num_shards=num_shards,
                    load_avg_after=[round(x, 2) for x in os.getloadavg()])
        print("# file read rate (page cache): " + ", ".join(f"{d} {files[d][0] / 1e9:.2f} GB/s" for d in files))
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
        elif created and not args.keep:
            for d in args.formats:
                shutil.rmtree(root / d, ignore_errors=True)
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
