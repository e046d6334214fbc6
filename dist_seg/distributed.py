"""The only module that talks to ``torch.distributed``.

Every helper works unchanged on a single process (no process group): gathers return their input,
reductions are the identity and barriers return at once.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (identity on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer of ``module`` from rank ``src`` to all ranks, in place (no-op on one process).

    DDP does this when it wraps a module; DeepSpeed copies parameters only, so buffers such as EMA prototypes or
    a fitted PCA would otherwise stay whatever each rank built. Buffers must be on the collective's device (the
    GPU under NCCL).
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ranks, in place, and return it (identity on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` on one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0, without gradient."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather` but ranks may hold different numbers of rows (dim 0)."""
    if not is_distributed():
        return tensor
    world = get_world_size()
    count = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the summed gradient of its own slice.

    The backward uses an all-reduce rather than reduce-scatter so that it also runs on gloo.
    Summing over ranks is what makes DDP's gradient averaging give the gradient of the mean loss
    over the global batch (see tests/test_distributed.py).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = tensor.shape[0]
        ctx.rank = get_rank()
        return all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0; gradients flow back to owners."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def seeded_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator whose state depends only on ``seed`` and ``keys`` (same on every rank)."""
    digest = hashlib.sha256(repr((int(seed), *keys)).encode()).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation of ``range(n)`` with no fixed point, drawn uniformly from all derangements.

    Rejection sampling of uniform permutations: every derangement is equally likely and the expected
    number of draws is about e ≈ 2.72. With the same generator state the result is the same on every rank.

    Args:
        n: size of the permutation, at least 2.
        generator: a CPU ``torch.Generator`` (see :func:`seeded_generator`).

    Returns:
        LongTensor of shape ``[n]``.
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2 elements, got n={n}")
    ar = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == ar).any()):
            return perm
