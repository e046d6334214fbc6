"""Benchmark the dense CRF of evaluation: images/s in this process (serial) vs :class:`CRFPool` workers.

Inputs are shaped like evaluation's (SPEC §6): toy scenes of ``--size`` px (320 by default) and
``log_softmax(2·scores)`` unaries for ``--num-classes`` clusters at full resolution, where ``scores``
are smooth random maps (a low-resolution grid upsampled bilinearly, like an upsampled code). For every
worker count the pool is started once (start-up timed separately, as evaluation starts one pool per
pass), then it refines the same images as the serial run; the outputs must be identical. ``CRFPool(1)``
runs in the calling process (the pool's rule for ``num_workers <= 1``): it shows the pool's own overhead.

Start-up is the first call of a fresh pool on one image (worker start plus one refinement). The bound
next to each pool rate is perfect scaling of the serial rate over ``min(workers, cores)``;
a pool also pays for pickling the unaries to the workers and the marginals back
(``2·K·H·W·4`` bytes per image, printed).

Example::

    python tools/bench_crf.py --images 16 --workers 1 2 4 --json bench_crf.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from bench_common import machine  # noqa: E402 - puts this checkout on sys.path first

from dist_seg.data.toy import toy_sample
from dist_seg.eval.crf import CRFPool, dense_crf


def make_inputs(num: int, *, size: int, num_classes: int, grid: int, seed: int) -> tuple[list, list]:
    """``num`` uint8 RGB images ``[size, size, 3]`` and ``log_softmax(2·scores)`` unaries ``[K, size, size]``."""
    gen = torch.Generator().manual_seed(seed)
    images = [toy_sample(i, split="val", num_classes=min(num_classes, 8), size=size, seed=seed).image
              for i in range(num)]
    coarse = torch.rand(num, num_classes, grid, grid, generator=gen) * 2 - 1  # cosine-like scores
    scores = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    unaries = F.log_softmax(2 * scores, dim=1).numpy()
    return images, list(unaries)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=320, help="image side (evaluation crops are 320)")
    parser.add_argument("--num-classes", type=int, default=27)
    parser.add_argument("--grid", type=int, default=40, help="side of the low-resolution score grid")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": machine(), "images": args.images, "size": args.size, "num_classes": args.num_classes}
    print(f"# {info['machine']}")
    images, unaries = make_inputs(args.images, size=args.size, num_classes=args.num_classes, grid=args.grid,
                                  seed=args.seed)
    dense_crf(images[0], unaries[0])  # import and first-call costs stay out of the timing
    pools = {w: CRFPool(w) for w in args.workers}
    startup: dict[int, float] = {}
    serial_out = None
    samples: dict[str, list[float]] = {"serial": [], **{f"pool-{w}": [] for w in args.workers}}
    identical = True
    try:
        for w, pool in pools.items():
            if w > 1:
                start = time.perf_counter()
                pool.map(images[:1], unaries[:1])  # starts the workers (and refines one image)
                startup[w] = time.perf_counter() - start
        for round_index in range(args.repeats):
            order = ["serial"] + [f"pool-{w}" for w in args.workers]
            shift = round_index % len(order)
            for name in order[shift:] + order[:shift]:
                start = time.perf_counter()
                if name == "serial":
                    out = [dense_crf(im, un) for im, un in zip(images, unaries)]
                    serial_out = out if serial_out is None else serial_out
                else:
                    out = pools[int(name.split("-")[1])].map(images, unaries)
                samples[name].append(len(images) / (time.perf_counter() - start))
                if serial_out is not None and name != "serial" and len(out) == len(serial_out):
                    identical &= all(np.array_equal(a, b) for a, b in zip(out, serial_out))
            print(f"# round {round_index + 1}/{args.repeats}: "
                  + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items()), flush=True)
    finally:
        for pool in pools.values():
            pool.close()

    serial = statistics.median(samples["serial"])
    moved = 2 * args.num_classes * args.size * args.size * 4
    results = {}
    print(f"{'case':>8} {'images/s':>9} {'x serial':>8} {'bound/s':>8} {'% bound':>7} {'start-up s':>10}")
    for name, values in samples.items():
        median = statistics.median(values)
        entry = {"images_per_s_median": median, "images_per_s": values}
        if name == "serial":
            bound, start = serial, "-"
        else:
            w = int(name.split("-")[1])
            ratios = [v / s for v, s in zip(values, samples["serial"])]
            bound = serial * min(max(w, 1), os.cpu_count() or 1)
            entry.update(ratio_median=statistics.median(ratios), startup_s=startup.get(w))
            start = f"{startup[w]:.2f}" if w in startup else "in-process"
        entry.update(bound_images_per_s=bound, fraction_of_bound=median / bound)
        results[name] = entry
        print(f"{name:>8} {median:>9.2f} {entry.get('ratio_median', 1.0):>8.2f} {bound:>8.2f} "
              f"{100 * median / bound:>6.1f}% {start:>10}")
    print(f"# pool outputs identical to serial: {identical}; {moved / 2**20:.1f} MiB pickled per image")
    info.update(results=results, pool_equals_serial=identical, pickled_bytes_per_image=moved,
                load_avg_after=[round(x, 2) for x in os.getloadavg()])
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
