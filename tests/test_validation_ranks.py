"""A validation split with fewer shards than ranks (review A3): read anyway, with unchanged metrics.

8 GPUs against Cityscapes' 2 validation shards: ranks without a shard read nothing and take part in every
collective of the validation; the scores equal those of one process on the same checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("val_ranks")
    # 2 training shards (one per rank), 1 validation shard.
    generate_toy(root, num_train=16, num_val=8, samples_per_shard=8)
    return root


def _overrides(method: str, root: str, out: str) -> list[str]:
    return [f"data.root={root}", f"train.output_dir={out}", f"data.batch_size={GLOBAL_BATCH}", "data.num_workers=0",
            "data.shuffle_buffer=8", "tracking.enabled=false", f"{method}.feature_samples=4", "stego.neg_samples=1",
            "train.num_steps=2", "train.val_every=1", "train.checkpoint_every=100", "eval.num_overlays=0"]


def _train(rank: int, world: int, method: str, root: str, out: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "1"
    from dist_seg.config import merge
    from dist_seg.eval.evaluate import summary
    from dist_seg.runtime import load_recipe
    from dist_seg.trainer import train

    cfg = merge(load_recipe(str(REPO / "recipes" / f"{method}_toy.py"))(), overrides=_overrides(method, root, out))
    result = train(cfg)
    return {"step": result["step"], "metrics": summary(result["val"])}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["stego", "ds2dl"])
def test_one_validation_shard_on_two_ranks(method, toy_root, tmp_path):
    from dist_seg.data.shards import resolve_shards
    from dist_seg.eval.evaluate import evaluate_checkpoint, summary
    from dist_seg.trainer import load_method_checkpoint

    assert len(resolve_shards(toy_root, "val").urls) == 1, "the test needs a 1-shard validation split"
    out = tmp_path / "run"
    results = run_distributed(_train, 2, method, str(toy_root), str(out))
    assert [r["step"] for r in results] == [2, 2], "both ranks must train to the end"
    assert results[0]["metrics"] == results[1]["metrics"], "ranks must agree on the validation scores"
    assert "cluster_mIoU" in results[0]["metrics"] and "label_free" in results[0]["metrics"]

    # One process, same checkpoint, same per-process batch: the same scores.
    method_, cfg, _ = load_method_checkpoint(out / "checkpoints" / "step-00000002.pt",
                                             overrides=[f"data.batch_size={GLOBAL_BATCH // 2}"])
    single, _ = evaluate_checkpoint(method_, cfg, crf=False)
    assert summary(single) == results[0]["metrics"], (
        f"{method}: 2 ranks over 1 validation shard {results[0]['metrics']} != 1 rank {summary(single)}")
