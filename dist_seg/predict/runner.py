"""The prediction loop over many images, on one process or split across the ranks of any launcher.

Items are grouped by the size they are encoded at and cut into batches in a fixed order that does not depend
on the number of ranks; rank ``r`` of ``W`` takes batches ``r, r + W, ...``. A batch is therefore encoded
with the same companions however many ranks run (so its floats, and the label maps, are the same), and every
image is written by exactly one rank. A batch whose images are all complete is skipped; a batch with some
complete images is encoded again but only its incomplete images are written. Images are decoded in
DataLoader workers (``num_workers``) while the model runs.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from dist_seg import distributed as D
from dist_seg.predict.engine import Predictor, model_input_size
from dist_seg.predict.inputs import ImageDataset, Item, identity_collate
from dist_seg.predict.writers import Writer, read_labels

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PredictOptions:
    """How images are segmented.

    Attributes:
        res: shorter side fed to the backbone (None: the run's ``eval_res``, or ``data.res`` with ``tile``).
        crf: refine with the dense CRF (tile by tile with ``tile``).
        tile: sliding-window tile side in source pixels (None: the whole image at once).
        stride: tile stride in source pixels (None: half the tile).
        batch_size: images (or tiles) encoded together.
        num_workers: DataLoader workers decoding images.
        max_pixels: refuse larger images (0: no limit).
    """

    res: Optional[int] = None
    crf: bool = False
    tile: Optional[int] = None
    stride: Optional[int] = None
    batch_size: int = 8
    num_workers: int = 2
    max_pixels: int = 0


@dataclass
class Summary:
    """What a run did (summed over ranks)."""

    written: int = 0
    complete: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    scores: Optional[dict] = None

    def as_dict(self) -> dict:
        """The numbers (``summary.json``): counts, skip reasons, seconds, and mIoU/Acc when scored."""
        scores = None if self.scores is None else {k: float(self.scores[k]) for k in ("mIoU", "Acc")}
        return {"written": self.written, "complete": self.complete, "skipped": self.skipped,
                "seconds": self.seconds, "scores": scores}

    def lines(self) -> list[str]:
        out = [f"wrote {self.written} label map(s), skipped {self.complete} already complete, "
               f"{len(self.skipped)} unreadable or refused, in {self.seconds:.1f} s"]
        out += [f"  skipped {reason}" for reason in self.skipped]
        if self.scores is not None:
            out.append(f"score of the written label maps (Hungarian-matched, as `dist-seg eval`): "
                       f"mIoU {self.scores['mIoU']:.2f}, Acc {self.scores['Acc']:.2f}")
        return out


def plan_batches(items: list[Item], *, res: int, patch: int, batch_size: int, tiled: bool) -> list[list[int]]:
    """Positions of ``items`` cut into batches of one model input size, in an order fixed by the items alone.

    Items without a known size (unreadable headers, refused sizes) and tiled images go alone.
    """
    groups: dict[tuple, list[int]] = {}
    alone: list[list[int]] = []
    for pos, item in enumerate(items):
        if tiled or item.size is None:
            alone.append([pos])
        else:
            groups.setdefault(model_input_size(*item.size, res, patch), []).append(pos)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)] + alone
    return sorted(batches, key=lambda b: b[0])


def predict_items(predictor: Predictor, items: list[Item], writer: Writer, options: PredictOptions, *,
                  shards: Optional[str] = None, num_classes: Optional[int] = None,
                  progress: bool = True) -> Summary:
    """Segment ``items`` and write their outputs; collective when several ranks run (every rank calls it).

    Args:
        predictor: the model, on this rank's device.
        items: every item of the run (the same list on every rank).
        writer: where outputs go.
        options: how to segment.
        shards: the ``DIR/SPLIT`` shard items come from.
        num_classes: when the items carry labels: score the written label maps against them.
        progress: show a tqdm bar (images/s) on rank 0.

    Returns:
        The :class:`Summary` summed over ranks (the same on every rank).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    rank, world = D.get_rank(), D.get_world_size()
    tiled = bool(options.tile)
    res = options.res or (predictor.tile_res if tiled else predictor.default_res)
    batches = plan_batches(items, res=res, patch=predictor.patch, batch_size=options.batch_size, tiled=tiled)
    mine = [b for b in batches[rank::world] if not all(writer.complete(items[p].key) for p in b)]
    complete = sum(len(b) for b in batches[rank::world]) - sum(len(b) for b in mine)
    dataset = ImageDataset(items, max_pixels=options.max_pixels, shards=shards)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=options.num_workers,
                                         collate_fn=identity_collate,
                                         persistent_workers=False, prefetch_factor=2 if options.num_workers else None)
    # Columns: every id a label map can hold (255 = a cluster matched to no class is one more "cluster").
    confusion = torch.zeros(num_classes or 1, int(predictor.lut.max()) + 1 if num_classes else 1, dtype=torch.int64)
    written, skipped = 0, []
    todo = sum(len(b) for b in mine)
    bar = tqdm(total=todo, desc=f"predict (rank {rank})" if world > 1 else "predict", unit="img",
               disable=not progress or rank != 0 or not sys.stderr.isatty())
    for rows in loader:
        w, c, s = process_rows(predictor, items, rows, writer, options, res=res, shards=shards, confusion=confusion,
                               num_classes=num_classes)
        written, complete, skipped = written + w, complete + c, skipped + s
        bar.update(len(rows))
    bar.close()
    if num_classes:
        # Images complete before this run were not predicted again: score what was written for them.
        for batch in batches[rank::world]:
            if batch not in mine:
                for p in batch:
                    label = dataset[p]["label"] if items[p].index is not None else None
                    if label is not None:
                        _count(confusion, read_labels(writer.label_path(items[p].key)), label.numpy(), num_classes)
    summary = _gather(written, complete, skipped, confusion if num_classes else None)
    summary.seconds = time.perf_counter() - start
    return summary


def process_rows(predictor: Predictor, items: list[Item], rows: list[dict], writer: Writer, options: PredictOptions,
                 *, res: int, shards: Optional[str] = None, confusion: Optional[torch.Tensor] = None,
                 num_classes: Optional[int] = None) -> tuple[int, int, list[str]]:
    """Segment one planned batch (``rows`` decoded by :class:`ImageDataset`) and write what is not complete.

    Returns:
        ``(written, already complete, skip reasons)``; ``confusion`` gains the labelled rows' counts.
    """
    good, skipped, written, complete = [], [], 0, 0
    for row in rows:
        item = items[row["position"]]
        if row["error"]:
            skipped.append(f"{item.path or f'{shards}:{item.key}'}: {row['error']}")
            log.warning("skipping %s: %s", item.path or item.key, row["error"])
        else:
            good.append(row)
    if not good:
        return written, complete, skipped
    images = [row["image"].numpy() for row in good]
    for row, image, labels in zip(good, images, _label_maps(predictor, images, options, res)):
        item = items[row["position"]]
        if not writer.complete(item.key):
            writer.write(item.key, labels, image)
            written += 1
        else:
            complete += 1
        if num_classes and row["label"] is not None:
            _count(confusion, labels, row["label"].numpy(), num_classes)
    return written, complete, skipped


def _label_maps(predictor: Predictor, images: list[np.ndarray], options: PredictOptions, res: int):
    if options.tile:
        for image in images:
            stride = options.stride or max(1, options.tile // 2)
            clusters = predictor.tiled_clusters(image, tile=options.tile, stride=stride,
                                                res=res, crf=options.crf, batch_size=options.batch_size)
            yield predictor.to_labels(clusters)
        return
    codes = predictor.encode(images, res)
    for image, code in zip(images, codes):
        yield predictor.to_labels(predictor.clusters(code[None], image.shape[:2], image=image, crf=options.crf))


def _count(confusion: torch.Tensor, pred: np.ndarray, label: np.ndarray, num_classes: int) -> None:
    valid = (label >= 0) & (label < num_classes)
    idx = label[valid].astype(np.int64) * confusion.shape[1] + pred[valid].astype(np.int64)
    confusion.view(-1).add_(torch.from_numpy(np.bincount(idx, minlength=confusion.numel())))


def _gather(written: int, complete: int, skipped: list[str], confusion: Optional[torch.Tensor]) -> Summary:
    parts = D.all_gather_object((written, complete, skipped))
    summary = Summary(written=sum(p[0] for p in parts), complete=sum(p[1] for p in parts),
                      skipped=[s for p in parts for s in p[2]])
    if confusion is not None:
        from dist_seg.eval.metrics import cluster_scores

        D.all_reduce_sum(confusion)
        summary.scores = cluster_scores(confusion)
    return summary

