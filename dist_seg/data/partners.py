"""KNN partners read beside their anchors, in the loader's worker processes (SPEC §2).

STEGO's KNN term pairs every anchor with a partner drawn uniformly from the anchor's first ``k`` neighbours
in the training set's KNN table. The draw is a function of ``(seed, step)`` over the *global* batch and each
rank takes its own rows (:func:`choose_partners`), so a run gives the same losses on any number of ranks and
a resumed run draws what an uninterrupted one would.

:class:`PartnerReader` is a stage of the training stream (:func:`dist_seg.data.shards.make_loader`'s
``batch_stage``): it runs in the DataLoader worker that built the batch, knows the step the batch is for,
draws the partners and reads and decodes them by global index (``IndexedShards`` over the same shards), so
the training process only receives ready batches of anchors *and* partners and the device never waits for
serial reads. The KNN table travels to the workers once, when the loader starts them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from dist_seg import distributed as D
from dist_seg.data.manifest import DataError, PathLike
from dist_seg.data.shards import IndexedShards, resolve_shards


def choose_partners(knn: torch.Tensor, index: torch.Tensor, *, seed: int, step: int, rank: int,
                    world_size: int) -> torch.Tensor:
    """Global indices of the KNN partners of this rank's anchors at ``step`` (SPEC §2).

    One neighbour rank per row of the global batch is drawn from the generator of ``(seed, step, "knn")``
    (the same on every rank); this rank's anchors are rows ``rank·b ... rank·b + b - 1`` of it.

    Args:
        knn: ``[N, k]`` neighbour indices of every training sample (self excluded), on the CPU.
        index: ``[b]`` global indices of this rank's anchors.
        seed: run seed.
        step: the optimiser step the batch is for.
        rank, world_size: this rank and the number of ranks.

    Returns:
        ``[b]`` global indices of the partners.
    """
    local = index.shape[0]
    choice = torch.randint(knn.shape[1], (local * world_size,), generator=D.seeded_generator(seed, step, "knn"))
    return knn[index.to(knn.device), choice[rank * local:(rank + 1) * local].to(knn.device)]


class PartnerReader:
    """Loader stage that adds the KNN partners of each batch: ``partner_image`` or ``partner_feat``, and
    ``partner_index``.

    It must follow batching in an *infinite* stream built with the same ``start_batch`` (the trainer's
    training stream): DataLoader hands batches out round-robin, so batch ``j`` of the stream is worker
    ``j % W``'s ``j // W``-th and is for step ``start_batch + j``; each worker derives the step of every batch it
    makes from its own id and count, whatever the number of workers.

    Args:
        knn: ``[N, k]`` neighbour table (moved to the CPU once here; workers share it).
        root: the dataset (or feature cache) folder the stream reads.
        split: the training split.
        res: image side (``decode="image"``).
        decode: ``"image"`` or ``"features"``, as the stream.
        half_features: keep cached features in their stored fp16 (the trainer expands them on the device).
        seed, rank, world_size: as for :func:`choose_partners`.
        start_batch: the step of the stream's first batch (resume).

    Raises:
        DataError: the split has no shard index, or its size differs from the table's.
    """

    def __init__(self, knn: torch.Tensor, *, root: PathLike, split: str, res: int | None, decode: str,
                 half_features: bool = False, seed: int, rank: int, world_size: int, start_batch: int = 0) -> None:
        shards = resolve_shards(root, split)  # checks the split here, in the training process, without opening it
        if shards.index_path is None:
            raise DataError(f"KNN partners are read by index: {root} / {split} needs a wids.json (a prepared folder)")
        if shards.num_samples != knn.shape[0]:
            raise DataError(f"the KNN table has {knn.shape[0]} rows but split '{split}' of {root} has "
                            f"{shards.num_samples} samples; rebuild the table with `dist-seg knn`")
        self.knn = knn.detach().to("cpu", torch.int64).contiguous()
        self.index_path = str(Path(shards.index_path))
        self.res, self.decode, self.half_features = res, decode, half_features
        self.seed, self.rank, self.world_size, self.start_batch = seed, rank, world_size, start_batch
        self._shards: IndexedShards | None = None  # opened in the worker that uses it

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get the table and settings, never open shard files.
        return {**self.__dict__, "_shards": None}

    def __call__(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        _, _, worker, num_workers = wds.utils.pytorch_worker_info()
        streams = max(1, num_workers)
        if self._shards is None:
            self._shards = IndexedShards(self.index_path, "", res=self.res, decode=self.decode,
                                         half_features=self.half_features, labels=False)
        key = "feat" if self.decode == "features" else "image"
        for count, batch in enumerate(batches):
            step = self.start_batch + count * streams + worker
            partner = choose_partners(self.knn, batch["index"], seed=self.seed, step=step, rank=self.rank,
                                      world_size=self.world_size)
            batch["partner_index"] = partner
            batch[f"partner_{key}"] = self._shards.get_batch(partner)[key]
            yield batch
