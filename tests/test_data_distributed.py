"""The streaming loader on 2 real gloo ranks × 2 DataLoader workers."""

from __future__ import annotations

from collections import Counter

import pytest

from dist_seg.data.manifest import DataError
from dist_seg.data.shards import make_loader
from tests._data_utils import make_dataset
from tests.dist_utils import run_distributed

NUM = 41
PER_SHARD = 4  # 11 shards: uneven between 2 ranks x 2 workers
BATCH = 3


def _indices(loader, limit=None):
    out = []
    for batch in loader:
        out.append(batch["index"].tolist())
        if limit is not None and len(out) >= limit:
            break
    return out


def _rank_main(rank: int, world: int, root: str) -> dict:
    # Ranks are spawned; forking their workers avoids re-importing torch in every worker of every pass.
    kw = dict(batch_size=BATCH, res=8, num_workers=2, seed=3, multiprocessing_context="fork")
    out: dict = {}
    loader, n = make_loader(root, "train", shuffle=True, infinite=False, **kw)
    out["pass"], out["pass_n"] = _indices(loader), n
    out["pass_again"] = _indices(loader)
    loader.set_epoch(1)
    out["epoch1"] = _indices(loader)
    ordered, _ = make_loader(root, "train", shuffle=False, infinite=False, **kw)
    out["ordered"] = _indices(ordered)
    endless, n_inf = make_loader(root, "train", shuffle=True, infinite=True, **kw)
    out["infinite_n"] = n_inf
    out["infinite"] = _indices(endless, limit=3 * NUM // (BATCH * world) + 2)
    own_shards = [f"{root}/train/shard-{i:06d}.tar" for i in range(3)]
    own, _ = make_loader(own_shards, "train", shuffle=False, infinite=False, nodesplitter=None, **kw)
    out["own"] = sorted(i for b in _indices(own) for i in b)
    # A finite pass over fewer shards than ranks (validation) is read anyway; a training stream is refused.
    tiny, out["tiny_n"] = make_loader(root, "tiny", shuffle=False, infinite=False, **kw)
    out["tiny_pass"] = _indices(tiny)
    try:
        make_loader(root, "tiny", shuffle=True, infinite=True, **kw)
        out["tiny"] = "no error"
    except DataError as err:
        out["tiny"] = str(err)
    return out


@pytest.mark.timeout(180)
def test_two_ranks_two_workers(tmp_path):
    make_dataset(tmp_path, num=NUM, per_shard=PER_SHARD)
    make_dataset(tmp_path, num=3, per_shard=8, split="tiny")
    results = run_distributed(_rank_main, 2, str(tmp_path))

    # One pass: every record exactly once over ranks x workers; announced batch counts are exact.
    everything = Counter(i for r in results for b in r["pass"] for i in b)
    assert sorted(everything) == list(range(NUM)) and set(everything.values()) == {1}, everything
    for rank, r in enumerate(results):
        assert r["pass_n"] == len(r["pass"]), f"rank {rank} announced {r['pass_n']} batches, yielded {len(r['pass'])}"
    shards_of = [{i // PER_SHARD for b in r["pass"] for i in b} for r in results]
    assert not shards_of[0] & shards_of[1], f"ranks must read disjoint shards, got {shards_of}"

    # Deterministic from (seed, epoch); a new epoch reshuffles but still reads everything once.
    for rank, r in enumerate(results):
        assert r["pass_again"] == r["pass"], f"rank {rank}: same epoch, different order"
    assert [r["epoch1"] for r in results] != [r["pass"] for r in results], "epoch 1 must differ from epoch 0"
    epoch1 = Counter(i for r in results for b in r["epoch1"] for i in b)
    assert sorted(epoch1) == list(range(NUM)) and set(epoch1.values()) == {1}

    # No shuffle: each worker reads its shards in index order.
    ordered = Counter(i for r in results for b in r["ordered"] for i in b)
    assert sorted(ordered) == list(range(NUM)) and set(ordered.values()) == {1}
    for r in results:
        flat = [i for b in r["ordered"] for i in b]
        for shard in {i // PER_SHARD for i in flat}:
            within = [i for i in flat if i // PER_SHARD == shard]
            assert within == sorted(within), f"shard {shard} read out of order: {within}"

    # Infinite: keeps yielding full batches past the end of an epoch, cycling through every record.
    for rank, r in enumerate(results):
        assert r["infinite_n"] is None
        wanted = 3 * NUM // (BATCH * 2) + 2
        assert len(r["infinite"]) == wanted and all(len(b) == BATCH for b in r["infinite"]), \
            f"rank {rank} stopped after {len(r['infinite'])} batches"
    looped = Counter(i for r in results for b in r["infinite"] for i in b)
    assert sorted(looped) == list(range(NUM)), "an infinite stream must cover the whole split"
    assert max(looped.values()) >= 2, "an infinite stream must start a second epoch"

    # nodesplitter=None: each rank reads all of the shards it is given.
    for r in results:
        assert r["own"] == list(range(3 * PER_SHARD)), r["own"]

    # Fewer shards than ranks: a finite pass gives rank 0 the one shard and rank 1 nothing (so a validation
    # split of 1 shard is read whole on 2 ranks); an infinite (training) stream is an error that names the fix.
    assert [r["tiny_pass"] for r in results] == [[[0, 1, 2]], []], [r["tiny_pass"] for r in results]
    assert [r["tiny_n"] for r in results] == [1, 0], "announced batch counts must match"
    for r in results:
        assert "shards" in r["tiny"] and "--samples-per-shard" in r["tiny"], r["tiny"]
