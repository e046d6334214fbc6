"""Exact k-nearest-neighbour tables of global image descriptors (SPEC §2, STEGO §3.3).

Similarity is the cosine: the inner product of L2-normalised vectors. "Exact" means equal to a float64
brute force: the same indices, rows sorted by decreasing similarity, ties broken towards the lower
key index.

How exactness survives fast float32 arithmetic: a backend (chunked torch matmul, faiss CPU or GPU)
proposes ``K = k + margin`` candidates per query from float32 scores. Float32 and float64 cosines of
the same pair differ by less than ``delta = (3d + 16) * 2**-24`` (a worst-case rounding bound for
d-term dot products and the normalisation), and every key left out scored at most the K-th candidate's
``c_K``. With ``c_k`` the k-th candidate score, the true k-th similarity is at least ``c_k - delta``,
so if ``c_K < c_k - 2 delta`` no left-out key can reach the top k and the row is certified; rows that
fail (heavy ties, many duplicates) are recomputed by a float64 brute force over all keys. Among the
candidates, only those within ``2 delta`` of a neighbour in the float32 order (near-ties, duplicates)
can be out of order; they alone are re-scored in float64 (elementwise, so duplicates tie exactly) and
everything is sorted with the tie rule. The returned similarities are those scores: float64 values
for re-scored pairs, float32 ones (within ``delta``, typically ~1e-7) for the others. Nothing ever
builds the full N×N matrix.

The torch backend computes blocks ``Q_chunk @ K_blockᵀ`` and keeps a running top-K per query. Within
a block it first takes the maximum of each group of ``GROUP`` consecutive columns, keeps the K groups
with the largest maxima (the K-th largest group maximum is a lower bound of the K-th largest entry,
so no top-K entry lives in another group) and runs ``topk`` only on those ``K * GROUP`` entries. This
replaces a full ``topk`` over every row (about 1.3 ns per entry on a 2-core CPU, a third of the
matmul's time at d=384) with a max-reduction that runs at memory speed. When the queries are the keys
(the table of a whole split on one process), the score matrix is symmetric and only the blocks on and
above the diagonal are multiplied, each serving its rows and, transposed, its columns: half the flops
(:func:`_symmetric_candidates`).

Cross-rank: :func:`distributed_knn` gathers every rank's descriptors (rank order = global index
order), computes this rank's rows and gathers the rows back, so every rank holds the full table,
identical to a one-process computation.

This module is the algorithm only: tensors in, tensors out. The training set's table (descriptors,
provenance, files, ``dist-seg knn``) is :mod:`dist_seg.knn_table`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dist_seg import distributed as D

__all__ = ["BACKENDS", "FaissEnvironment", "choose_backend", "distributed_knn", "faiss_environment", "knn"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss", "faiss-gpu")
GROUP = 64  # columns per group in the block pre-selection
_UNIT_ROUNDOFF_FP32 = 2.0**-24


# ------------------------------------------------------------------------------------------- helpers
def _normalize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.normalize(x.to(dtype), dim=-1, eps=1e-10)


def _float32_error_bound(dim: int) -> float:
    """Upper bound of |float32 cosine - float64 cosine| for unit vectors of ``dim`` components."""
    return (3 * dim + 16) * _UNIT_ROUNDOFF_FP32


@contextmanager
def _full_precision_matmul() -> Iterator[None]:
    # TF32 / bf16 matmuls (allowed by "high"/"medium") would void the float32 error bound.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _default_budget(device: torch.device) -> int:
    """Bytes for one float32 score block."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(2 << 30, free // 4))
    return 256 << 20


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("the faiss backends need faiss: pip install 'dist_seg[cpu]' (CPU) or "
                          "faiss-gpu-cu12 (GPU, see docs/scaling.md)") from err
    return faiss


# ------------------------------------------------------------------------------------ backend choice
# Exact torch search is the dependable default on every device; faiss-gpu is taken by ``auto`` only where a
# GPU build of faiss is installed, imports with its GPU API, sees a GPU and declares support for this GPU's
# compute capability (a wheel without kernels for the device fails at the first search, e.g.
# faiss-gpu-cu12 1.14 on Hopper). The facts are read by :func:`faiss_environment` and judged by
# :func:`choose_backend`, a pure function the tests call with made-up facts.
@dataclass(frozen=True)
class FaissEnvironment:
    """What decides whether faiss can serve a search on a device.

    Attributes:
        distributions: installed distributions providing the ``faiss`` package (normalised name -> version),
            e.g. ``{"faiss-cpu": "1.15.1", "faiss-gpu-cu12": "1.14.1.post1"}``.
        importable: ``import faiss`` works.
        gpu_api: the imported module has ``StandardGpuResources`` (a GPU build won the import).
        num_gpus: GPUs faiss sees (``faiss.get_num_gpus()``; 0 without the GPU API).
        declared: per GPU distribution, the compute-capability range its metadata declares
            (``((7, 0), (8, 9))``), or None when it declares none.
        capability: the CUDA device's compute capability, None off CUDA.
    """

    distributions: Mapping[str, str] = field(default_factory=dict)
    importable: bool = False
    gpu_api: bool = False
    num_gpus: int = 0
    declared: Mapping[str, Optional[tuple[tuple[int, int], tuple[int, int]]]] = field(default_factory=dict)
    capability: Optional[tuple[int, int]] = None

    @property
    def gpu_distributions(self) -> list[str]:
        return sorted(d for d in self.distributions if d != "faiss-cpu")


_RANGE = re.compile(r"Compute\s+Capability\s*\(?\s*(\d+)\.(\d+)\s*(?:–|—|~|-|to)\s*(\d+)\.(\d+)", re.IGNORECASE)


def declared_capability_range(metadata_text: str) -> Optional[tuple[tuple[int, int], tuple[int, int]]]:
    """The ``Compute Capability A.B–C.D`` range a faiss GPU wheel declares in its description, if any."""
    match = _RANGE.search(metadata_text or "")
    if match is None:
        return None
    a, b, c, d = (int(g) for g in match.groups())
    return (a, b), (c, d)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def faiss_environment(device: Optional[torch.device] = None) -> FaissEnvironment:
    """The installed faiss distributions, what ``import faiss`` gives and the device's compute capability."""
    import importlib.metadata as md

    distributions, declared = {}, {}
    for dist in md.distributions():
        name = _normalise(dist.metadata.get("Name") or "")
        files = dist.read_text("top_level.txt") or ""
        if not (name.startswith("faiss") or "faiss" in files.split()):
            continue
        distributions[name] = dist.version
        if name != "faiss-cpu":
            text = (dist.metadata.get("Summary") or "") + "\n" + (dist.metadata.get_payload() or "")
            declared[name] = declared_capability_range(text + "\n" + (dist.metadata.get("Description") or ""))
    importable = gpu_api = False
    num_gpus = 0
    try:
        import faiss

        importable = True
        gpu_api = hasattr(faiss, "StandardGpuResources")
        num_gpus = int(faiss.get_num_gpus()) if gpu_api else 0
    except ImportError:
        pass
    capability = None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        capability = tuple(torch.cuda.get_device_capability(device))
    return FaissEnvironment(distributions, importable, gpu_api, num_gpus, declared, capability)


def _fmt(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def choose_backend(requested: str, device_type: str, env: FaissEnvironment) -> tuple[str, str]:
    """The search backend for ``requested`` on a ``device_type`` device, and why (one line).

    ``auto``: faiss-gpu on CUDA when :class:`FaissEnvironment` shows a usable GPU build that declares this
    GPU's compute capability, else torch (CPU: always torch). An explicit ``faiss-gpu`` that cannot run
    raises ValueError naming the cause and the fix.

    Raises:
        ValueError: unknown backend, or ``faiss``/``faiss-gpu`` asked for where they cannot run.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {requested!r}")
    gpu_dists = env.gpu_distributions
    fix = "pip uninstall -y faiss-cpu " + " ".join(gpu_dists or ["faiss-gpu-cu12"]) + " && pip install " + \
        " ".join(gpu_dists or ["faiss-gpu-cu12"])
    problem = None  # why faiss-gpu cannot serve this search
    if device_type != "cuda":
        problem = "the search runs on the CPU"
    elif not gpu_dists and not env.gpu_api:
        problem = ("no GPU build of faiss is installed" + (f" (only faiss-cpu {env.distributions['faiss-cpu']})"
                                                           if "faiss-cpu" in env.distributions else ""))
    elif not env.gpu_api:
        if "faiss-cpu" in env.distributions:
            problem = (f"faiss-cpu {env.distributions['faiss-cpu']} shadows {', '.join(gpu_dists)} (both install "
                       f"the same `faiss` package and the CPU build is the one imported); fix: {fix}")
        elif env.importable:
            problem = f"{', '.join(gpu_dists)} is installed but `import faiss` has no GPU API; fix: {fix}"
        else:
            problem = f"{', '.join(gpu_dists)} is installed but `import faiss` fails; fix: {fix}"
    elif env.num_gpus == 0:
        problem = ("faiss sees no GPU (its CUDA runtime may not match the driver: the faiss wheel and torch "
                   "must use the same CUDA major version)")
    else:
        ranges = {d: r for d, r in env.declared.items() if d in gpu_dists}
        known = {d: r for d, r in ranges.items() if r is not None}
        if env.capability is not None and known:
            fits = [d for d, (lo, hi) in known.items() if lo <= env.capability <= hi]
            if not fits:
                span = "; ".join(f"{d} {env.distributions.get(d, '')} declares compute capability "
                                 f"{_fmt(lo)}-{_fmt(hi)}" for d, (lo, hi) in known.items())
                problem = (f"{span}, but this GPU is {_fmt(env.capability)} (no kernels for it: the search "
                           "would fail)")
        elif env.capability is not None:
            problem = ("the installed faiss declares no compute-capability range, so whether it has kernels for "
                       f"this GPU ({_fmt(env.capability)}) is unknown; pass backend=faiss-gpu to use it anyway")
        else:
            problem = "the GPU's compute capability could not be read"
    if requested == "auto":
        if device_type == "cuda" and problem is None:
            return "faiss-gpu", "faiss-gpu: " + ", ".join(f"{d} {env.distributions.get(d, '')}".strip()
                                                          for d in gpu_dists) + " supports this GPU" + \
                (f" ({_fmt(env.capability)})" if env.capability else "")
        reason = "exact torch search" + ("" if device_type != "cuda" else f" on the GPU; faiss-gpu not used: {problem}")
        return "torch", reason
    if requested == "faiss-gpu":
        declared_unknown = problem is not None and problem.startswith("the installed faiss declares no")
        if problem is not None and not declared_unknown:
            raise ValueError(f"backend 'faiss-gpu' cannot run here: {problem}. Use backend='torch' (exact, the "
                             "default) or see docs/scaling.md, 'GPU install'")
        return "faiss-gpu", "faiss-gpu (asked for)" + (f"; warning: {problem}" if declared_unknown else "")
    if requested == "faiss" and not env.importable:
        raise ValueError("backend 'faiss' needs faiss: pip install 'dist_seg[cpu]'; or use backend='torch'")
    return requested, f"{requested} (asked for)"


def _has_faiss_gpu() -> bool:
    """Whether ``auto`` would pick faiss-gpu for CUDA tensors on this machine."""
    if not torch.cuda.is_available():
        return False
    device = torch.device("cuda")
    return choose_backend("auto", "cuda", faiss_environment(device))[0] == "faiss-gpu"


def _resolve_backend(backend: str, device: torch.device) -> tuple[str, str]:
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return choose_backend(backend, device.type, FaissEnvironment())  # no need to import faiss
    if backend == "faiss-gpu" and device.type != "cuda" and torch.cuda.is_available():
        device = torch.device("cuda")  # CPU tensors are searched on the GPU and come back (_faiss_candidates)
    chosen, reason = choose_backend(backend, device.type, faiss_environment(device))
    log.info("KNN backend: %s", reason)
    return chosen, reason


# --------------------------------------------------------------------------------- candidate search
def _block_topk(scores: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``num`` values and column indices of each row of ``scores`` [c, w] (sorted, descending).

    Every entry not returned is <= the smallest returned value of its row.
    """
    rows, width = scores.shape
    groups = width // GROUP
    if groups < 4 * num:
        return scores.topk(min(num, width), dim=1)
    main = scores[:, : groups * GROUP].view(rows, groups, GROUP)
    best_groups = main.amax(dim=2).topk(num, dim=1, sorted=False).indices
    pool = main.gather(1, best_groups.unsqueeze(2).expand(rows, num, GROUP)).reshape(rows, num * GROUP)
    offsets = torch.arange(GROUP, device=scores.device)
    cols = (best_groups.unsqueeze(2) * GROUP + offsets).reshape(rows, num * GROUP)
    if groups * GROUP < width:  # the ragged tail is small: keep all of it in the pool
        tail = torch.arange(groups * GROUP, width, device=scores.device)
        pool = torch.cat([pool, scores[:, groups * GROUP :]], dim=1)
        cols = torch.cat([cols, tail.expand(rows, -1)], dim=1)
    values, where = pool.topk(num, dim=1)
    return values, cols.gather(1, where)


def _same_rows(queries: torch.Tensor, keys: torch.Tensor, query_offset: int) -> bool:
    """Whether the queries are the keys themselves (then the score matrix is symmetric)."""
    if queries.shape != keys.shape or query_offset != 0 or queries.dtype != keys.dtype:
        return False
    same_memory = queries.data_ptr() == keys.data_ptr() and queries.stride() == keys.stride()
    return same_memory or bool(torch.equal(queries, keys))


def _plan(num_queries: int, num_keys: int, budget: int, chunk_size: Optional[int]) -> tuple[int, int]:
    """Rows per query chunk and columns per key block, with rows * cols * 4 bytes <= budget."""
    floats = max(budget // 4, 4096)
    if chunk_size is not None:
        rows = max(1, int(chunk_size))
    else:
        # Full-width rows when at least 256 of them fit; otherwise 1024-row chunks over key blocks.
        rows = floats // max(num_keys, 1)
        rows = min(1024, floats // 4096) if rows < 256 else min(rows, 4096)
    rows = max(1, min(rows, num_queries))
    cols = min(num_keys, max(floats // rows, 256))
    return rows, cols


def _product(a: torch.Tensor, b: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` written into the front of a flat preallocated buffer (no allocation per block)."""
    out = buffer[: a.shape[0] * b.shape[0]].view(a.shape[0], b.shape[0])
    return torch.mm(a, b.T, out=out)


def _torch_candidates(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num: int,
    *,
    self_offset: Optional[int],
    chunk_size: Optional[int],
    memory_budget: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 top-``num`` candidates per query: (values [Nq, num] descending, indices [Nq, num])."""
    nq, nk = queries.shape[0], keys.shape[0]
    device = queries.device
    budget = memory_budget or _default_budget(device)
    rows, cols = _plan(nq, nk, budget, chunk_size)
    out_values = torch.empty((nq, num), dtype=torch.float32, device=device)
    out_index = torch.empty((nq, num), dtype=torch.long, device=device)
    buffer = torch.empty(rows * cols, dtype=torch.float32, device=device)
    with _full_precision_matmul():
        for q0 in range(0, nq, rows):
            q1 = min(q0 + rows, nq)
            chunk = queries[q0:q1]
            best_values = best_index = None
            for k0 in range(0, nk, cols):
                k1 = min(k0 + cols, nk)
                scores = _product(chunk, keys[k0:k1], buffer)
                if self_offset is not None:
                    # Query i is key self_offset + i: mask it where it falls in this key block.
                    own = torch.arange(q0, q1, device=device) + self_offset
                    hit = (own >= k0) & (own < k1)
                    scores[hit.nonzero().squeeze(1), own[hit] - k0] = float("-inf")
                values, index = _block_topk(scores, num)
                index = index + k0
                if best_values is None:
                    best_values, best_index = values, index
                else:
                    merged_values = torch.cat([best_values, values], dim=1)
                    merged_index = torch.cat([best_index, index], dim=1)
                    best_values, where = merged_values.topk(min(num, merged_values.shape[1]), dim=1)
                    best_index = merged_index.gather(1, where)
            out_values[q0:q1] = best_values
            out_index[q0:q1] = best_index
    return out_values, out_index


def _merge_dense(best_v: torch.Tensor, best_i: torch.Tensor, row0: int, values: torch.Tensor,
                 index: torch.Tensor) -> None:
    """Merge candidate lists ``[r, m]`` into the running top lists of rows ``row0 .. row0 + r``."""
    rows = slice(row0, row0 + values.shape[0])
    merged_v = torch.cat([best_v[rows], values], dim=1)
    merged_i = torch.cat([best_i[rows], index], dim=1)
    best_v[rows], where = merged_v.topk(best_v.shape[1], dim=1)
    best_i[rows] = merged_i.gather(1, where)


def _merge_sparse(best_v: torch.Tensor, best_i: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                  index: torch.Tensor) -> None:
    """Merge scattered candidates (row, value, key index) into the running top lists of their rows."""
    if rows.numel() == 0:
        return
    uniq, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    inverse = inverse[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[inverse]
    pad_v = torch.full((uniq.numel(), int(counts.max())), float("-inf"), device=values.device)
    pad_i = torch.full_like(pad_v, -1, dtype=torch.long)
    pad_v[inverse, slot] = values[order]
    pad_i[inverse, slot] = index[order]
    merged_v = torch.cat([best_v[uniq], pad_v], dim=1)
    merged_i = torch.cat([best_i[uniq], pad_i], dim=1)
    top_v, where = merged_v.topk(best_v.shape[1], dim=1)
    best_v[uniq], best_i[uniq] = top_v, merged_i.gather(1, where)


def _above_threshold(scores: torch.Tensor, tau: torch.Tensor, *, dim: int) -> tuple[torch.Tensor, ...]:
    """Entries of ``scores`` [r, c] above the threshold of their row (``dim=1``, ``tau`` [r]) or of their
    column (``dim=0``, ``tau`` [c]).

    Returns ``(owner, other, value)``: the row (or column) whose threshold was passed, the index along
    the other dimension and the score. The maximum of each group of ``GROUP`` consecutive entries along
    ``dim`` is compared first (a contiguous reduction in both layouts), so only the few groups that can
    hold a candidate are read again.
    """
    length = scores.shape[dim]
    groups = length // GROUP
    cut = groups * GROUP
    owners, others, values = [], [], []
    if groups:
        if dim == 1:
            grouped = scores[:, :cut].unflatten(1, (groups, GROUP))  # [r, G, GROUP]
            own, grp = (grouped.amax(dim=2) > tau.unsqueeze(1)).nonzero(as_tuple=True)
            block = grouped[own, grp]  # [P, GROUP]
        else:
            grouped = scores[:cut].unflatten(0, (groups, GROUP))  # [G, GROUP, c]
            grp, own = (grouped.amax(dim=1) > tau.unsqueeze(0)).nonzero(as_tuple=True)
            block = grouped[grp, :, own]  # [P, GROUP]
        hit, offset = (block > tau[own].unsqueeze(1)).nonzero(as_tuple=True)
        owners.append(own[hit])
        others.append(grp[hit] * GROUP + offset)
        values.append(block[hit, offset])
    if cut < length:
        tail = scores[:, cut:] if dim == 1 else scores[cut:].T
        own, other = (tail > tau.unsqueeze(1)).nonzero(as_tuple=True)
        owners.append(own)
        others.append(other + cut)
        values.append(tail[own, other])
    if not owners:
        empty = torch.empty(0, dtype=torch.long, device=scores.device)
        return empty, empty, torch.empty(0, device=scores.device)
    return torch.cat(owners), torch.cat(others), torch.cat(values)


def _symmetric_candidates(
    x: torch.Tensor, num: int, *, exclude_self: bool, memory_budget: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 top-``num`` candidates of every row of ``x`` among the rows of ``x`` (queries = keys).

    The score matrix is symmetric, so only blocks on and above the diagonal are multiplied (half the
    flops of the general search); each off-diagonal block serves its rows and, transposed, its columns.
    Diagonal blocks come first and give every row a threshold (its current ``num``-th best score); later
    blocks only contribute entries above the threshold of their row (or column), found through group
    maxima. Every entry left out is at most the final ``num``-th value of its row, as required by
    :func:`_exact_from_candidates`.
    """
    n = x.shape[0]
    device = x.device
    budget = memory_budget or _default_budget(device)
    side = max(num + 1, 2 * GROUP, int(math.isqrt(max(budget // 4, 1))))
    best_v = torch.full((n, num), float("-inf"), device=device)
    best_i = torch.full((n, num), -1, dtype=torch.long, device=device)
    starts = list(range(0, n, side))
    buffer = torch.empty(min(side, n) ** 2, dtype=torch.float32, device=device)
    with _full_precision_matmul():
        for a in starts:
            a1 = min(a + side, n)
            scores = _product(x[a:a1], x[a:a1], buffer)
            if exclude_self:
                scores.diagonal().fill_(float("-inf"))
            values, index = _block_topk(scores, min(num, a1 - a))
            _merge_dense(best_v, best_i, a, values, index + a)
        for pos, a in enumerate(starts):
            a1 = min(a + side, n)
            for b in starts[pos + 1 :]:
                b1 = min(b + side, n)
                scores = _product(x[a:a1], x[b:b1], buffer)
                # Thresholds are read before either update: both sides see the same block.
                tau_a, tau_b = best_v[a:a1, -1].clone(), best_v[b:b1, -1].clone()
                own, other, value = _above_threshold(scores, tau_a, dim=1)
                _merge_sparse(best_v, best_i, own + a, value, other + b)
                own, other, value = _above_threshold(scores, tau_b, dim=0)
                _merge_sparse(best_v, best_i, own + b, value, other + a)
    return best_v, best_i


_GPU_RESOURCES = None


def _faiss_candidates(
    queries: torch.Tensor, keys: torch.Tensor, num: int, *, gpu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 top-``num`` candidates from faiss' exact inner-product search (no index is built)."""
    faiss = _faiss()
    if gpu:
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch CUDA tensors)

        global _GPU_RESOURCES
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        device = queries.device if queries.is_cuda else torch.device("cuda")
        with _full_precision_matmul():
            values, index = faiss.knn_gpu(
                _GPU_RESOURCES, queries.to(device).contiguous(), keys.to(device).contiguous(), num,
                metric=faiss.METRIC_INNER_PRODUCT,
            )
        return values.to(queries.device), index.to(queries.device).long()
    values, index = faiss.knn(
        np.ascontiguousarray(queries.cpu().numpy()), np.ascontiguousarray(keys.cpu().numpy()), num,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return torch.from_numpy(values).to(queries.device), torch.from_numpy(index).to(queries.device)


# ------------------------------------------------------------------------------------- exact rescoring
def _float64_pair_scores(queries: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         chunk: int = 1 << 13) -> torch.Tensor:
    """float64 cosine ``<q, k> / (|q| |k|)`` of the pairs (queries[rows], keys[cols]).

    Elementwise products summed over d (not a matmul), so a pair with a duplicate key gives a
    bit-identical score and exact ties are decided by the index alone.
    """
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=queries.device)
    for p0 in range(0, rows.shape[0], chunk):
        q = queries.index_select(0, rows[p0 : p0 + chunk]).double()
        k = keys.index_select(0, cols[p0 : p0 + chunk]).double()
        norms = (q * q).sum(dim=1).sqrt().clamp_min(1e-10) * (k * k).sum(dim=1).sqrt().clamp_min(1e-10)
        out[p0 : p0 + chunk] = (q * k).sum(dim=1) / norms
    return out


def _sort_with_ties(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``k`` of each row by decreasing score, equal scores by increasing index."""
    index, order = index.sort(dim=1)
    scores = scores.gather(1, order)
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return scores[:, :k], index.gather(1, order[:, :k])


def _brute_force_rows(
    queries: torch.Tensor, keys: torch.Tensor, k: int, self_index: Optional[torch.Tensor], budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 brute force over all keys for the few queries the candidate test could not certify.

    Scores are elementwise products summed over d (not a matmul), so duplicate keys score bit-identically
    and ties are resolved by index alone.
    """
    nq, nk = queries.shape[0], keys.shape[0]
    dim = keys.shape[1]
    out_s = torch.empty((nq, k), dtype=torch.float64, device=queries.device)
    out_i = torch.empty((nq, k), dtype=torch.long, device=queries.device)
    rows = max(1, min(64, budget // (8 * nk)))
    q64 = _normalize(queries, torch.float64)
    for r0 in range(0, nq, rows):
        r1 = min(r0 + rows, nq)
        q = q64[r0:r1].unsqueeze(1)
        step = max(1, (64 << 20) // (8 * dim * (r1 - r0)))
        scores = torch.cat(
            [(_normalize(keys[j : j + step], torch.float64).unsqueeze(0) * q).sum(dim=-1) for j in range(0, nk, step)],
            dim=1,
        )
        if self_index is not None:
            scores[torch.arange(r1 - r0, device=scores.device), self_index[r0:r1]] = float("-inf")
        thresholds = scores.topk(k, dim=1).values[:, -1]
        for r in range(r1 - r0):
            cols = (scores[r] >= thresholds[r]).nonzero().squeeze(1)  # all keys tied with the k-th, by index
            values, order = scores[r, cols].sort(descending=True, stable=True)
            out_s[r0 + r], out_i[r0 + r] = values[:k], cols[order[:k]]
    return out_s, out_i


def _exact_from_candidates(
    queries: torch.Tensor,
    keys: torch.Tensor,
    cand_values: torch.Tensor,
    cand_index: torch.Tensor,
    bound: torch.Tensor,
    k: int,
    *,
    self_offset: Optional[int],
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Exact top-k from float32 candidates.

    Args:
        cand_values, cand_index: ``[Nq, num]`` float32 candidates sorted by decreasing value, self removed.
        bound: ``[Nq]`` upper bound of the float32 score of every key that is neither a candidate nor
            the query itself (``-inf`` when all keys are candidates).

    Float32 and float64 scores differ by at most ``delta``. With ``c_k`` the k-th candidate value, the
    true k-th similarity is >= ``c_k - delta``, so only the prefix of candidates with
    ``c_i >= c_k - 2 delta`` can be in the top k, and a row is certified when ``bound < c_k - 2 delta``
    (uncertified rows are recomputed by brute force). Inside the prefix, a candidate more than
    ``2 delta`` away from both its neighbours in the float32 order already sits at its true rank; only
    candidates closer than that to a neighbour (near-ties, duplicates) are re-scored in float64. Sorting
    the mix of float32 and float64 values then gives the float64 order, and exact ties go to the lower
    index.

    Returns:
        (similarities float32 [Nq, k], indices int64 [Nq, k], counters).
    """
    delta = _float32_error_bound(queries.shape[1])
    scores = cand_values.double()
    threshold = scores[:, k - 1] - 2 * delta
    certified = bound.double() < threshold
    width = int((scores >= threshold.unsqueeze(1)).sum(dim=1).max())
    scores, cand = scores[:, :width].contiguous(), cand_index[:, :width]
    close = (scores[:, :-1] - scores[:, 1:]) <= 2 * delta
    ambiguous = torch.zeros_like(scores, dtype=torch.bool)
    ambiguous[:, :-1] |= close
    ambiguous[:, 1:] |= close
    ambiguous &= scores >= threshold.unsqueeze(1)
    rows, cols = ambiguous.nonzero(as_tuple=True)
    scores[rows, cols] = _float64_pair_scores(queries, keys, rows, cand[rows, cols])
    sims, index = _sort_with_ties(scores, cand, k)
    counters = {"rescored_pairs": int(rows.numel()), "brute_force_rows": 0}
    bad = (~certified).nonzero().squeeze(1)
    if bad.numel():
        counters["brute_force_rows"] = int(bad.numel())
        self_index = None if self_offset is None else bad + self_offset
        s, i = _brute_force_rows(queries[bad], keys, k, self_index, budget)
        sims[bad], index[bad] = s, i
    return sims.float(), index, counters


# -------------------------------------------------------------------------------------------- public
def knn(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    query_offset: int = 0,
    margin: Optional[int] = None,
    memory_budget: Optional[int] = None,
    return_stats: bool = False,
):
    """Exact top-``k`` keys of each query by cosine similarity.

    Args:
        queries: ``[Nq, d]`` (any float dtype; normalised here).
        keys: ``[Nk, d]``, same device as ``queries``.
        k: neighbours per query.
        exclude_self: query ``i`` is key ``query_offset + i`` and is never its own neighbour.
        backend: ``"torch"`` (chunked matmul, CPU or CUDA), ``"faiss"`` (CPU), ``"faiss-gpu"``, or
            ``"auto"``: torch, except faiss-gpu for CUDA tensors where a GPU build of faiss is installed and
            declares this GPU's compute capability (:func:`choose_backend`; the reason is logged and in the
            stats).
        chunk_size: queries per block for the torch backend (default: chosen from ``memory_budget``).
        query_offset: global index of query 0 among the keys (used with ``exclude_self``).
        margin: extra float32 candidates per query (default ``max(16, k)``); rows with more ties than
            that at the k-th place are recomputed by brute force, still exactly.
        memory_budget: bytes for one float32 score block of the torch backend (default 256 MiB on CPU,
            up to 2 GiB on CUDA).
        return_stats: also return a dict with timings and the number of brute-force rows.

    Returns:
        ``(similarities, indices)``: float32 ``[Nq, k]`` sorted by decreasing similarity (accurate to the
        float32 rounding bound, about 1e-7 in practice) and int64 ``[Nq, k]`` key indices, equal to a
        float64 brute force with ties broken towards the lower index; plus the stats dict if asked.

    Raises:
        ValueError: bad shapes, non-finite values, ``k`` larger than the available keys, unknown backend.
    """
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries [Nq, d] and keys [Nk, d] must share d; got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    nq, nk = queries.shape[0], keys.shape[0]
    available = nk - (1 if exclude_self else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be between 1 and the number of candidate keys ({available})")
    if exclude_self and not 0 <= query_offset <= nk - nq:
        raise ValueError(f"exclude_self: queries {query_offset}..{query_offset + nq - 1} are not all keys (Nk={nk})")
    if keys.device != queries.device:
        raise ValueError(f"queries on {queries.device} but keys on {keys.device}")
    device = queries.device
    backend, reason = _resolve_backend(backend, device)
    stats: dict[str, Any] = {"backend": backend, "backend_reason": reason}
    if nq == 0:
        empty = (torch.empty((0, k), device=device), torch.empty((0, k), dtype=torch.long, device=device))
        return (*empty, stats) if return_stats else empty

    num = min(k + (max(16, k) if margin is None else int(margin)), available)
    self_offset = query_offset if exclude_self else None
    budget = memory_budget or _default_budget(device)
    start = time.perf_counter()
    q32, k32 = _normalize(queries, torch.float32), _normalize(keys, torch.float32)
    for name, unit in (("queries", q32), ("keys", k32)):
        # Unit rows cannot overflow a sum, so one reduction finds any NaN/inf the input had.
        if not bool(torch.isfinite(unit.sum())):
            raise ValueError(f"{name} contain NaN or infinite values; check the descriptors")
    symmetric = backend == "torch" and _same_rows(queries, keys, query_offset) and chunk_size is None
    stats["symmetric"] = symmetric
    if symmetric:
        values, index = _symmetric_candidates(k32, num, exclude_self=exclude_self, memory_budget=memory_budget)
        bound = values[:, -1].clone()
    elif backend == "torch":
        values, index = _torch_candidates(
            q32, k32, num, self_offset=self_offset, chunk_size=chunk_size, memory_budget=memory_budget
        )
        # Self was masked to -inf and never outranks a real key (num <= available keys).
        bound = values[:, -1].clone()
    else:
        # faiss cannot mask the diagonal: ask for one more, then drop self (or the last one if self is absent).
        extra = 1 if exclude_self else 0
        values, index = _faiss_candidates(q32, k32, num + extra, gpu=backend == "faiss-gpu")
        bound = values[:, -1].clone()
        if exclude_self:
            drop = index == (torch.arange(nq, device=device) + query_offset).unsqueeze(1)
            drop[:, -1] |= ~drop.any(dim=1)
            values, index = values[~drop].view(nq, num), index[~drop].view(nq, num)
    if num == available:
        bound.fill_(float("-inf"))  # every key is a candidate
    del q32, k32
    stats["candidates_s"] = time.perf_counter() - start
    start = time.perf_counter()
    sims, index, counters = _exact_from_candidates(
        queries, keys, values, index, bound, k, self_offset=self_offset, budget=budget
    )
    stats.update(rescore_s=time.perf_counter() - start, candidates=num, **counters)
    return (sims, index, stats) if return_stats else (sims, index)


def distributed_knn(
    local_descriptors: torch.Tensor,
    k: int,
    *,
    exclude_self: bool = True,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    keys: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KNN table of descriptors spread over ranks, identical on every rank to a one-process run.

    Args:
        local_descriptors: this rank's contiguous slice ``[n_r, d]`` of the global descriptor matrix;
            rank 0 holds the first rows, rank 1 the next, and so on (slices may differ in length).
        k: neighbours per sample.
        exclude_self: a sample is never its own neighbour.
        backend, chunk_size: as in :func:`knn`.
        keys: the global matrix ``[N, d]`` when the caller already holds it on every rank (e.g.
            ``compute_descriptors(gather=True)``); then it is not gathered a second time (at 590k x 768
            float32 that copy is 1.8 GB per rank). ``local_descriptors`` must be its rows of this rank.

    Returns:
        ``(similarities [N, k] float32, indices [N, k] int64)`` for all N samples, on every rank.
    """
    count = torch.tensor([local_descriptors.shape[0]], dtype=torch.long, device=local_descriptors.device)
    counts = D.all_gather(count)
    offset = int(counts[: D.get_rank()].sum())
    if keys is None:
        keys = D.all_gather_variable(local_descriptors.contiguous())
    elif keys.shape[0] != int(counts.sum()) or keys.shape[1:] != local_descriptors.shape[1:]:
        raise ValueError(f"keys {tuple(keys.shape)} do not hold the {int(counts.sum())} rows the ranks give")
    sims, index = knn(local_descriptors, keys, k, exclude_self=exclude_self, backend=backend,
                      chunk_size=chunk_size, query_offset=offset)
    return D.all_gather_variable(sims.contiguous()), D.all_gather_variable(index.contiguous())
