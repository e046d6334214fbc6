"""Print what a launcher started: rank, world size, device and backend of every process.

    accelerate launch --config_file launch/cpu_2proc.yaml launch/check_ranks.py --expect-world 2

Each process builds an ``accelerate.Accelerator`` exactly as the trainer does, sums its rank over the
process group (so a broken group fails here, not in the middle of a run) and exits non-zero when the
number of processes differs from ``--expect-world``. Each line also names torch's CUDA build, the CUDA
version the NVIDIA driver supports and the GPU with its compute capability (or why CUDA is not usable),
so a driver too old for the installed torch shows here before a run starts.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-world", type=int, default=None, help="fail unless this many processes run")
    args = parser.parse_args(argv)

    import torch
    from accelerate import Accelerator

    from dist_seg.runtime import check_process_group, cuda_facts, cuda_problem, driver_release

    accelerator = Accelerator()
    facts = cuda_facts()
    driver = "none" if facts.driver_cuda is None else f"{facts.driver_cuda[0]}.{facts.driver_cuda[1]}"
    cuda = f"torch={facts.torch_version} cuda_build={facts.cuda_build} driver={driver_release()} driver_cuda={driver}"
    if accelerator.device.type == "cuda":
        index = accelerator.device.index or 0
        major, minor = torch.cuda.get_device_capability(index)
        cuda += f" gpu={torch.cuda.get_device_name(index).replace(' ', '_')} capability={major}.{minor}"
    else:
        cuda += f" gpu=none ({cuda_problem(facts) or 'CUDA usable but not used'})"
    try:
        rank, world = accelerator.process_index, accelerator.num_processes
        total = torch.tensor([float(rank)], device=accelerator.device)
        total = accelerator.reduce(total, reduction="sum")
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        # One write per line: processes share the terminal/pipe, and print() writes the newline separately.
        sys.stdout.write(f"rank={rank} world={world} local_rank={accelerator.local_process_index} "
                         f"device={accelerator.device} backend={backend} "
                         f"distributed_type={accelerator.distributed_type.value} rank_sum={int(total.item())} "
                         f"{cuda}\n")
        sys.stdout.flush()
        check_process_group(world)  # WORLD_SIZE processes started but this one alone: one error line, exit 2
        if args.expect_world is not None and world != args.expect_world:
            print(f"error: expected {args.expect_world} processes, got {world}", file=sys.stderr)
            return 1
        if int(total.item()) != world * (world - 1) // 2:
            print(f"error: ranks do not sum to {world * (world - 1) // 2} over the process group", file=sys.stderr)
            return 1
        return 0
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    raise SystemExit(main())
