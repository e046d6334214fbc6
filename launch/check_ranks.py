"""Print what a launcher started: rank, world size, device and backend of every process.

    accelerate launch --config_file launch/cpu_2proc.yaml launch/check_ranks.py --expect-world 2

Each process builds an ``accelerate.Accelerator`` exactly as the trainer does, sums its rank over the
process group (so a broken group fails here, not in the middle of a run) and exits non-zero when the
number of processes differs from ``--expect-world``.
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

    accelerator = Accelerator()
    try:
        rank, world = accelerator.process_index, accelerator.num_processes
        total = torch.tensor([float(rank)], device=accelerator.device)
        total = accelerator.reduce(total, reduction="sum")
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        # One write per line: processes share the terminal/pipe, and print() writes the newline separately.
        sys.stdout.write(f"rank={rank} world={world} local_rank={accelerator.local_process_index} "
                         f"device={accelerator.device} backend={backend} "
                         f"distributed_type={accelerator.distributed_type.value} rank_sum={int(total.item())}\n")
        sys.stdout.flush()
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
