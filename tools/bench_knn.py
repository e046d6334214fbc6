"""Benchmark exact KNN: STEGO-style full-row brute force vs dist_seg's torch and faiss backends.

For each N it times

* ``reference``: STEGO's ``precompute_knns`` approach: similarity rows of the whole key set for a chunk
  of queries (N/16 rows per chunk, fewer if that block exceeds ``--ref-block-gb``) and ``torch.topk``,
  with the diagonal masked so that it answers the same question (self excluded);
* ``torch``: :func:`dist_seg.knn.knn` with ``backend="torch"``;
* ``faiss``: the same with ``backend="faiss"`` (faiss CPU exact search);
* ``faiss-gpu``: when faiss has GPU support and a GPU is visible;
* ``gemm``: only the float32 matrix products of the torch backend's blocks, nothing selected: the
  cost floor of any exact method at this moment (the machine may be shared, so the burst rate below
  can overstate what a minutes-long run gets),

checks that torch and faiss give identical tables, that both equal a float64 brute force on sampled
rows, and that the float32 reference agrees except at float32 near-ties. It also measures the
machine's fp32 matmul rate (best of several large GEMMs, before and after each N) and prints each
time divided by the matmul bound ``2·N²·d / rate``.

On a shared, oversubscribed CPU, OpenMP's default spin-waiting makes every parallel region wait for
descheduled threads (5x slower small ops were observed at load 8 on 2 cores); run with
``OMP_WAIT_POLICY=PASSIVE`` there (it applies to all methods alike).

Example::

    OMP_WAIT_POLICY=PASSIVE python tools/bench_knn.py --sizes 100000 200000 --dim 384 --json bench_knn.json
    python tools/bench_knn.py --sizes 1000000 --dim 768 --methods torch faiss   # large machines
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from bench_common import machine  # noqa: E402 - puts this checkout on sys.path first

from dist_seg.knn import _has_faiss_gpu, knn


def matmul_rate(dim: int, repeats: int = 5) -> float:
    """Best observed fp32 GEMM rate (FLOP/s) for a [4096, d] @ [d, 32768] product."""
    a, b = torch.randn(4096, dim), torch.randn(dim, 32768)
    out = torch.empty(4096, 32768)
    torch.mm(a, b, out=out)  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * a.shape[0] * dim * b.shape[1] / (time.perf_counter() - start))
    return best


def make_data(n: int, dim: int, seed: int) -> torch.Tensor:
    """Unit descriptors from a Gaussian mixture (clusters like real image descriptors), with a few
    exact duplicates (repeated images) so the tie rule is exercised."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(n // 100, 1), dim, generator=gen)
    x = centres[torch.randint(0, centres.shape[0], (n,), generator=gen)] + 0.9 * torch.randn(n, dim, generator=gen)
    x[1:6] = x[0]
    return F.normalize(x, dim=1)


def reference_knn(x: torch.Tensor, k: int, block_bytes: float) -> tuple[torch.Tensor, torch.Tensor]:
    """STEGO-style: full similarity rows (all N keys) for N/16 queries at a time, then topk."""
    n = x.shape[0]
    step = max(1, n // 16)
    step = max(1, min(step, int(block_bytes // (4 * n))))
    sims, index = [], []
    for i in range(0, n, step):
        block = torch.einsum("nf,mf->nm", x[i : i + step], x)
        rows = torch.arange(block.shape[0])
        block[rows, rows + i] = float("-inf")
        s, j = torch.topk(block, k)
        sims.append(s)
        index.append(j)
        del block
    return torch.cat(sims), torch.cat(index)


def gemm_only(x: torch.Tensor) -> None:
    """The torch backend's block products (same block plan), with the scores thrown away."""
    from dist_seg.knn import _default_budget, _plan, _product

    rows, cols = _plan(x.shape[0], x.shape[0], _default_budget(x.device), None)
    buffer = torch.empty(rows * cols)
    for q0 in range(0, x.shape[0], rows):
        for k0 in range(0, x.shape[0], cols):
            _product(x[q0 : q0 + rows], x[k0 : k0 + cols], buffer)


def float64_rows(x: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Exact (float64 cosine, ties to the lower index) neighbour indices of a few rows."""
    x64 = F.normalize(x.double(), dim=1)
    s = x64[rows] @ x64.T
    s[torch.arange(len(rows)), rows] = float("-inf")
    s_np = s.numpy()
    out = []
    for r in range(len(rows)):
        order = np.lexsort((np.arange(s_np.shape[1]), -s_np[r]))[:k]
        out.append(order)
    return torch.from_numpy(np.stack(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000, 200_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=["reference", "torch", "gemm", "faiss", "faiss-gpu"],
                        choices=["reference", "torch", "faiss", "faiss-gpu", "gemm"])
    parser.add_argument("--ref-block-gb", type=float, default=4.0,
                        help="largest similarity block the reference may build (GiB)")
    parser.add_argument("--check-rows", type=int, default=200, help="rows checked against a float64 brute force")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": machine(), "dim": args.dim, "k": args.k, "results": []}
    methods = [m for m in args.methods if m != "faiss-gpu" or _has_faiss_gpu()]
    print(f"# {info['machine']}")
    header = (f"{'N':>9} {'method':>10} {'time_s':>9} {'bound_s':>8} {'x_bound':>7} {'x_gemm':>7} "
              f"{'speedup_vs_ref':>14}  notes")
    print(header)
    for n in args.sizes:
        x = make_data(n, args.dim, args.seed)
        rate = matmul_rate(args.dim)
        bound = 2 * n * n * args.dim / rate
        times, tables, notes = {}, {}, {}
        for method in methods:
            start = time.perf_counter()
            if method == "gemm":
                gemm_only(x)
                times[method], notes[method] = time.perf_counter() - start, {}
                continue
            if method == "reference":
                sims, index = reference_knn(x, args.k, args.ref_block_gb * 2**30)
                notes[method] = {}
            else:
                device = "cuda" if method == "faiss-gpu" else "cpu"
                sims, index, stats = knn(x.to(device), x.to(device), args.k, exclude_self=True, backend=method,
                                         return_stats=True)
                notes[method] = {key: (round(v, 2) if isinstance(v, float) else v) for key, v in stats.items()}
            times[method] = time.perf_counter() - start
            tables[method] = (sims.cpu(), index.cpu())
        rate = max(rate, matmul_rate(args.dim))  # the machine is shared: keep the best rate seen
        bound = 2 * n * n * args.dim / rate
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: args.check_rows]
        truth = float64_rows(x, rows, args.k)
        checks = {}
        exact = [m for m in methods if m not in ("reference", "gemm")]
        for m in exact:
            checks[f"{m}_equals_float64_rows"] = bool(torch.equal(tables[m][1][rows], truth))
        for a, b in zip(exact, exact[1:]):
            checks[f"{a}_equals_{b}"] = bool(torch.equal(tables[a][1], tables[b][1]))
        if "reference" in tables and exact:
            ours_s, ours_i = tables[exact[0]]
            ref_s, ref_i = tables["reference"]
            differ = (ours_i != ref_i).any(dim=1)
            # A float32 reference may swap neighbours whose similarities differ by float32 rounding only.
            same_values = torch.allclose(ref_s, ours_s, atol=1e-5, rtol=0)
            checks["reference_rows_differing"] = int(differ.sum())
            checks["reference_differences_are_float32_near_ties"] = bool(same_values)
        for method in methods:
            speedup = times["reference"] / times[method] if "reference" in times else float("nan")
            vs_gemm = times[method] / times["gemm"] if "gemm" in times else float("nan")
            print(f"{n:>9} {method:>10} {times[method]:>9.2f} {bound:>8.2f} {times[method] / bound:>7.2f} "
                  f"{vs_gemm:>7.2f} {speedup:>14.2f}  {notes[method]}")
        print(f"{'':>9} checks: {checks}  (matmul rate {rate / 1e9:.0f} GFLOP/s)")
        info["results"].append({"n": n, "times_s": times, "matmul_gflops": rate / 1e9, "bound_s": bound,
                                "ratio_to_bound": {m: t / bound for m, t in times.items()},
                                "ratio_to_gemm": {m: t / times["gemm"] for m, t in times.items()} if "gemm" in times
                                else None, "checks": checks,
                                "stats": notes})
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
