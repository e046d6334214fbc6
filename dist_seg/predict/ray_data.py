"""``dist-seg predict --ray``: the same prediction as a Ray Data pipeline, for corpora beyond one node.

The driver lists the inputs and plans the batches exactly as the plain path does
(:func:`~dist_seg.predict.runner.plan_batches`); each planned batch is one row of a Ray dataset, and
``map_batches`` hands rows to a pool of model actors (:class:`PredictActor`, one per GPU, or CPU actors
where the cluster has no GPU). An actor decodes its batch, encodes it with the same companions as the plain
path and writes the outputs itself (the output folder must be reachable from every node, as for
``accelerate launch`` on several nodes), so the label maps are the plain path's, byte for byte. Ray's engine
schedules, retries and streams; nothing here schedules work.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from dist_seg.predict.inputs import ImageDataset, Item
from dist_seg.predict.runner import PredictOptions, Summary, plan_batches, process_rows
from dist_seg.predict.writers import Writer


class PredictActor:
    """A Ray Data actor holding one :class:`~dist_seg.predict.engine.Predictor`; called on one planned batch per row."""

    def __init__(self, *, checkpoint: str, overrides: list[str], raw_clusters: bool, trust: bool, out: str,
                 overlays: bool, areas: bool, options: dict, res: int, shards: Optional[str],
                 num_classes: Optional[int]) -> None:
        from dist_seg.predict.engine import Predictor

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor(checkpoint, device=device, overrides=overrides, raw_clusters=raw_clusters,
                                   trust=trust)
        palette = self.predictor.meta.get("colors")
        self.writer = Writer(out, overlays=overlays, areas=areas,
                             palette=np.asarray(palette, dtype=np.uint8) if palette else None)
        self.options = PredictOptions(**options)
        self.res, self.shards, self.num_classes = res, shards, num_classes

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"written": [], "complete": [], "skipped": [], "confusion": []}
        for payload in batch["items"]:
            items = [Item(**{**d, "size": tuple(d["size"]) if d["size"] else None}) for d in json.loads(str(payload))]
            dataset = ImageDataset(items, max_pixels=self.options.max_pixels, shards=self.shards)
            confusion = (torch.zeros(self.num_classes, int(self.predictor.lut.max()) + 1, dtype=torch.int64)
                         if self.num_classes else None)
            written, complete, skipped = process_rows(
                self.predictor, items, [dataset[i] for i in range(len(items))], self.writer, self.options,
                res=self.res, shards=self.shards, confusion=confusion, num_classes=self.num_classes)
            out["written"].append(written)
            out["complete"].append(complete)
            out["skipped"].append(json.dumps(skipped))
            out["confusion"].append(json.dumps(confusion.tolist() if confusion is not None else None))
        return {k: np.asarray(v) for k, v in out.items()}


def predict_with_ray(args, items: list[Item], options: PredictOptions, *, num_classes: Optional[int] = None) -> Summary:
    """Run :class:`PredictActor` over the planned batches of ``items`` on a Ray cluster (``args.address``, or a
    local one) and return the summed :class:`Summary`."""
    import time

    import ray

    from dist_seg.predict.engine import Predictor

    start = time.perf_counter()
    own = not ray.is_initialized()
    if own:
        ray.init(address=args.address, log_to_driver=False)
    try:
        # The driver plans like the plain path: the model's patch size and resolutions decide the batches.
        probe = Predictor(args.checkpoint, device="cpu", overrides=args.overrides, raw_clusters=args.raw_clusters,
                          trust=args.trust_checkpoint)
        tiled = bool(options.tile)
        res = options.res or (probe.tile_res if tiled else probe.default_res)
        writer = Writer(args.out, overlays=not args.no_overlays, areas=args.areas)
        writer.clean_partials()
        batches = plan_batches(items, res=res, patch=probe.patch, batch_size=options.batch_size, tiled=tiled)
        del probe
        complete_before = [b for b in batches if all(writer.complete(items[p].key) for p in b)]
        todo = [b for b in batches if b not in complete_before]
        rows = [{"items": json.dumps([asdict(items[p]) for p in b])} for b in todo]
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = args.num_actors or gpus or 2
        summary = Summary(complete=sum(len(b) for b in complete_before))
        confusion = None
        if rows:
            results = ray.data.from_items(rows).map_batches(
                PredictActor, batch_size=1, concurrency=actors, num_gpus=1 if gpus else 0, num_cpus=1,
                fn_constructor_kwargs=dict(
                    checkpoint=str(args.checkpoint), overrides=list(args.overrides), raw_clusters=args.raw_clusters,
                    trust=args.trust_checkpoint, out=str(args.out), overlays=not args.no_overlays, areas=args.areas,
                    options=asdict(options), res=res, shards=args.shards, num_classes=num_classes),
            ).take_all()
            for row in results:
                summary.written += int(row["written"])
                summary.complete += int(row["complete"])
                summary.skipped += json.loads(str(row["skipped"]))
                counts = json.loads(str(row["confusion"]))
                if counts is not None:
                    confusion = np.asarray(counts) if confusion is None else confusion + np.asarray(counts)
        if num_classes and confusion is not None:
            from dist_seg.eval.metrics import cluster_scores

            summary.scores = cluster_scores(confusion)
        summary.seconds = time.perf_counter() - start
        return summary
    finally:
        if own:
            ray.shutdown()
