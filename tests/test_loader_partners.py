"""KNN partners come from the loader's workers (issue 20) and training is unchanged by it.

The reference is a transcription of the trainer before the change: the stream yields anchors only and the
training process draws each anchor's partner from ``(seed, step)`` over the global batch and reads it with
``IndexedShards`` (``Trainer._partners`` of commit 9368cc6). Online and cached, with 0 and 2 workers, after a
resume, and on 2 gloo ranks, the new loader must give bitwise the same losses and weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_seg.config import merge
from dist_seg.methods.base import Batch
from dist_seg.runtime import load_recipe
from dist_seg.trainer import Trainer
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stego_toy.py")
STEPS = 4


class LegacyTrainer(Trainer):
    """The trainer's data path as it was: anchors from the stream, partners read here, one by one."""

    def _batches(self):
        from dist_seg.data.shards import IndexedShards

        cached = self.cfg.train.mode == "cached"
        indexed = IndexedShards(self.info.cache if cached else self.cfg.data.root, self.cfg.data.train_split,
                                res=self.cfg.data.res, decode="features" if cached else "image")
        loader, _ = self._loader(self.cfg.data.train_split, infinite=True, shuffle=True, start_batch=self.step)
        for raw in loader:
            label = raw["label"].to(self.device)
            feats = raw["feat"].to(self.device).float() if cached else self._features(raw["image"])
            ctx = self._context()  # the generator resumes inside the step it feeds
            choice = torch.randint(self.knn.shape[1], (ctx.global_batch,), generator=ctx.generator("knn"))
            partner = self.knn[raw["index"].cpu(), ctx.local(choice)]
            fetched = indexed.get_batch(partner)
            partner_feats = (fetched["feat"].to(self.device).float() if "feat" in fetched
                             else self._features(fetched["image"]))
            yield Batch(feats=feats, partner_feats=partner_feats, label=label, index=raw["index"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    from dist_seg.data.toy import generate_toy
    from dist_seg.features import extract

    root = tmp_path_factory.mktemp("partners")
    generate_toy(root / "data", num_train=48, num_val=8, samples_per_shard=6)
    cfg = _cfg(root / "data", root / "cache", root / "run", mode="online", workers=0)
    extract(cfg, splits=["train"])
    return {"data": root / "data", "cache": root / "cache"}


def _cfg(data: Path, cache: Path, out: Path, *, mode: str, workers: int, batch: int = 8):
    return merge(load_recipe(RECIPE)(), overrides=[
        f"data.root={data}", f"data.feature_cache={cache}", f"train.output_dir={out}", f"data.batch_size={batch}",
        f"data.num_workers={workers}", "data.shuffle_buffer=12", "stego.feature_samples=5", "stego.neg_samples=2",
        f"train.mode={mode}", "tracking.enabled=false", "train.resume=false"])


def _steps(trainer: Trainer, steps: int) -> list[float]:
    batches = trainer._batches()
    losses = []
    for _ in range(steps):
        loss, _ = trainer.train_step(next(batches))
        losses.append(float(loss))
    batches.close()  # ends the loader's workers
    return losses


def _weights(trainer: Trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def _assert_same(got: dict, ref: dict, what: str) -> None:
    assert got["losses"] == ref["losses"], f"{what}: losses {got['losses']} != before the change {ref['losses']}"
    for key, value in ref["weights"].items():
        assert torch.equal(got["weights"][key], value), f"{what}: {key} differs from before the change"


@pytest.mark.parametrize("mode,workers", [("online", 0), ("online", 2), ("cached", 2)])
def test_partners_from_workers_train_exactly_as_before(toy, tmp_path, monkeypatch, mode, workers):
    from dist_seg.data.shards import IndexedShards

    cfg = _cfg(toy["data"], toy["cache"], tmp_path / "run", mode=mode, workers=workers)
    legacy = LegacyTrainer(cfg)
    ref = {"losses": _steps(legacy, STEPS), "weights": _weights(legacy)}

    # Record which process decodes partners (forked workers inherit the patch and append to the file).
    readers = tmp_path / "readers.txt"
    real_get_batch = IndexedShards.get_batch

    def recording_get_batch(self, indices):
        with open(readers, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real_get_batch(self, indices)

    monkeypatch.setattr(IndexedShards, "get_batch", recording_get_batch)
    trainer = Trainer(cfg)
    got = {"losses": _steps(trainer, STEPS), "weights": _weights(trainer)}
    _assert_same(got, ref, f"{mode}, {workers} workers")
    pids = {int(p) for p in readers.read_text().split()}
    if workers:
        assert os.getpid() not in pids and len(pids) == workers, (
            f"partners must be decoded in the {workers} loader workers, not the training process: {pids}")
    else:
        assert pids == {os.getpid()}, "without workers the loader (and its partner reads) run in this process"

    # Resume: a trainer restarted at step 2 draws the partners an uninterrupted run drew at steps 2 and 3.
    first = Trainer(cfg)
    _steps(first, 2)
    resumed = Trainer(cfg)
    resumed.load_state_dict(first.state_dict())
    tail = _steps(resumed, STEPS - 2)
    assert tail == ref["losses"][2:], f"resumed losses {tail} != uninterrupted {ref['losses'][2:]}"
    _assert_same({"losses": ref["losses"], "weights": _weights(resumed)}, ref, f"{mode}, {workers} workers, resumed")


def test_partner_reader_refuses_a_table_of_another_split(toy):
    from dist_seg.data.manifest import DataError
    from dist_seg.data.partners import PartnerReader

    with pytest.raises(DataError, match="dist-seg knn"):
        PartnerReader(torch.zeros(10, 3, dtype=torch.long), root=toy["data"], split="train", res=32, decode="image",
                      seed=0, rank=0, world_size=1)


def _two_ranks(rank: int, world: int, data: str, cache: str, out: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "1"
    result = {}
    for name, cls in (("new", Trainer), ("legacy", LegacyTrainer)):
        cfg = _cfg(Path(data), Path(cache), Path(out) / name, mode="online", workers=2)
        trainer = cls(cfg)
        result[name] = {"losses": _steps(trainer, 3), "weights": _weights(trainer)}
        if name == "legacy":
            trainer.accelerator.end_training()
    return result


@pytest.mark.slow
def test_partners_from_workers_on_two_ranks(toy, tmp_path):
    """Each rank's workers draw that rank's rows of the global batch's partner choice."""
    results = run_distributed(_two_ranks, 2, str(toy["data"]), str(toy["cache"]), str(tmp_path))
    for rank, r in enumerate(results):
        _assert_same(r["new"], r["legacy"], f"rank {rank} of 2")
    for key, value in results[0]["new"]["weights"].items():
        assert torch.equal(results[1]["new"]["weights"][key], value), f"{key} differs between ranks"
