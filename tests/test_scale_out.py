"""Data-parallel correctness: the same global batch gives the same losses and parameters on 1, 2 and 4 ranks.

Each rank runs the real trainer (Accelerate + DDP over gloo, KNN partners, global-batch derangements) on its
slice of a fixed sequence of global batches of toy images.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
STEPS = 3


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy_scale")
    generate_toy(root, num_train=32, num_val=8, samples_per_shard=4)
    return root


def _train_slices(rank: int, world: int, method: str, root: str, out: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "1"
    from dist_seg import distributed as D
    from dist_seg.config import merge
    from dist_seg.data.partners import choose_partners
    from dist_seg.data.shards import IndexedShards
    from dist_seg.methods.base import Batch
    from dist_seg.runtime import load_recipe
    from dist_seg.trainer import Trainer

    cfg = merge(load_recipe(str(REPO / "recipes" / f"{method}_toy.py"))(), overrides=[
        f"data.root={root}", f"train.output_dir={out}", f"data.batch_size={GLOBAL_BATCH}", "data.num_workers=0",
        "tracking.enabled=false", "stego.dropout=0", "ds2dl.dropout=0", "stego.feature_samples=4",
        "ds2dl.feature_samples=4", "stego.neg_samples=2"])
    trainer = Trainer(cfg)
    images = IndexedShards(root, "train", res=cfg.data.res)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(STEPS):
        global_index = order[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        ctx = trainer._context()
        local = ctx.local(global_index)
        raw = images.get_batch(local)
        batch = Batch(feats=trainer._features(raw["image"]), label=raw["label"], index=local)
        if trainer.needs_partners:
            partner = choose_partners(trainer.knn.cpu(), local, seed=cfg.train.seed, step=trainer.step, rank=rank,
                                      world_size=world)
            batch.partner_feats = trainer._features(images.get_batch(partner)["image"])
        loss, _ = trainer.method(batch, ctx)
        mean = D.all_reduce_sum(loss.detach().clone()) / world
        losses.append(float(mean))
        trainer._optimise(loss)
        trainer.unwrapped.after_step()
        trainer.step += 1
    state = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    trainer.accelerator.end_training()
    return {"losses": losses, "state": state}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["stego", "ds2dl"])
def test_same_global_batch_same_training_on_1_2_4_ranks(method, toy_root, tmp_path):
    results = {}
    for world in (1, 2, 4):
        out = run_distributed(_train_slices, world, method, str(toy_root), str(tmp_path / f"w{world}"))
        results[world] = out[0]
        for other in out[1:]:
            assert other["losses"] == out[0]["losses"], "ranks disagree on the mean loss"
    ref = results[1]
    for world in (2, 4):
        got = results[world]
        assert torch.allclose(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=1e-4), (
            f"{method}: losses on {world} ranks {got['losses']} != 1 rank {ref['losses']}")
        for key, value in ref["state"].items():
            torch.testing.assert_close(got["state"][key], value, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, k=key, w=world:
                                       f"{method} {k} after {STEPS} steps on {w} ranks: {m}")


def _train_phase(rank: int, world: int, root: str, out: str, steps: int) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "1"
    from dist_seg.config import merge
    from dist_seg.runtime import load_recipe
    from dist_seg.trainer import load_latest_checkpoint, train

    cfg = merge(load_recipe(str(REPO / "recipes" / "stego_toy.py"))(), overrides=[
        f"data.root={root}", f"train.output_dir={out}", f"data.batch_size={GLOBAL_BATCH}", "data.num_workers=0",
        "tracking.enabled=false", "stego.feature_samples=4", "stego.neg_samples=2", f"train.num_steps={steps}",
        "train.checkpoint_every=2", "train.val_every=0",
        f"train.deepspeed_config={REPO / 'launch' / 'deepspeed_zero2.json'}"])
    train(cfg)
    state, _ = load_latest_checkpoint(cfg)
    return {"step": state["step"], "method": state["method"]}


@pytest.mark.slow
def test_deepspeed_trainer_resumes(toy_root, tmp_path):
    """The trainer's ZeRO-2 path on 2 gloo ranks: trains, checkpoints (sharded optimiser), and a resumed run
    ends on exactly the parameters of an uninterrupted one."""
    full = run_distributed(_train_phase, 2, str(toy_root), str(tmp_path / "full"), 4)[0]
    run_distributed(_train_phase, 2, str(toy_root), str(tmp_path / "split"), 2)
    assert (tmp_path / "split" / "checkpoints" / "deepspeed" / "step-00000002").is_dir(), "no ZeRO shards written"
    resumed = run_distributed(_train_phase, 2, str(toy_root), str(tmp_path / "split"), 4)[0]
    assert full["step"] == resumed["step"] == 4
    for key, value in full["method"].items():
        assert torch.equal(value, resumed["method"][key]), f"{key} differs after a DeepSpeed resume"


def _train_logged(rank: int, world: int, root: str, out: str, steps: int) -> dict:
    """:func:`_train_phase` that also returns the dist_seg warnings and the checkpoint it resumed from."""
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("dist_seg").addHandler(handler)
    logging.getLogger("dist_seg").setLevel(logging.INFO)
    try:
        result = _train_phase(rank, world, root, out, steps)
    finally:
        logging.getLogger("dist_seg").removeHandler(handler)
    return {**result, "log": records}


@pytest.mark.slow
def test_deepspeed_resume_skips_a_truncated_shard(toy_root, tmp_path):
    """A truncated ZeRO shard of the newest DeepSpeed checkpoint: named, skipped, and the 2-rank run resumes
    from the checkpoint before and finishes (that a DeepSpeed resume is exact is test_deepspeed_trainer_resumes)."""
    run_distributed(_train_phase, 2, str(toy_root), str(tmp_path / "split"), 4)
    tag = tmp_path / "split" / "checkpoints" / "deepspeed" / "step-00000004"
    shard = sorted(tag.glob("*optim_states.pt"))[-1]  # the last rank's optimiser shard
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = run_distributed(_train_logged, 2, str(toy_root), str(tmp_path / "split"), 6)
    skipped = [m for m in resumed[0]["log"] if "skipping unreadable checkpoint" in m]
    assert len(skipped) == 1 and str(shard) in skipped[0] and "truncated" in skipped[0], resumed[0]["log"]
    assert any("resumed from" in m and "step-00000002.pt" in m for m in resumed[0]["log"]), resumed[0]["log"]
    assert resumed[0]["step"] == 6
    assert not any("skipping" in m for m in resumed[1]["log"]), "only rank 0 chooses the checkpoint"
