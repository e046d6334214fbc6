"""Damaged shards (a truncated tar, a record with a garbage image) through every stage that reads shards.

Each stage either finishes with the damaged records counted and named (shard, key) in its log and report,
or stops with one ``error:`` line naming the fix; never a traceback. ``dist-seg check-data`` finds both.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from dist_seg import cli
from tests._data_utils import garbage_member, truncate_shard

REPO = Path(__file__).resolve().parents[1]
STEGO = str(REPO / "recipes" / "stego_toy.py")
DS2DL = str(REPO / "recipes" / "ds2dl_toy.py")
TRUNCATED = "shard-000001.tar"  # records 8..15
GARBAGE = "shard-000002.tar"  # records 16..23; the second one's image is replaced by random bytes


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("clean")
    generate_toy(root, num_train=32, num_val=8, samples_per_shard=8)
    return root


def damage(root: Path, split: str = "train") -> set[tuple[str, str]]:
    """Truncate one shard and spoil one record of another; return the (shard, key) pairs lost."""
    truncate_shard(root / split / TRUNCATED, 0.5)
    bad_key = garbage_member(root / split / GARBAGE, position=1)
    from dist_seg.data.shards import make_loader

    loader, _ = make_loader(root, split, batch_size=4, res=8, num_workers=0, shuffle=False, infinite=False)
    seen = {int(i) for b in loader for i in b["index"]}
    lost = {(f"shard-{i // 8:06d}.tar", f"{i:09d}") for i in range(32) if i not in seen}
    assert (GARBAGE, bad_key) in lost and any(s == TRUNCATED for s, _ in lost) and len(lost) < 8, lost
    return lost


@pytest.fixture(scope="module")
def damaged(clean_root, tmp_path_factory) -> tuple[Path, set]:
    root = tmp_path_factory.mktemp("damaged") / "toy"
    shutil.copytree(clean_root, root)
    return root, damage(root)


def small(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"train.output_dir={out}", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle_buffer=16", "stego.feature_samples=5", "stego.neg_samples=2", "train.log_every=2",
            "tracking.enabled=false", "train.val_every=0", "extract.batch_size=16", *extra]


def named(records) -> set[tuple[str, str]]:
    return {(r["shard"], r["key"]) for r in records}


def test_check_data_finds_a_truncated_shard_and_a_garbage_record(damaged, clean_root, tmp_path, capsys):
    root, lost = damaged
    report = tmp_path / "report.json"
    assert cli.main(["check-data", str(root), "--workers", "0", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    for shard, key in lost:
        assert f"{shard} {key}:" in out, f"check-data must name {shard} {key}:\n{out}"
    assert "cannot be decoded" in out and "interrupted copy" in out and "--overwrite" in out
    train = {s["split"]: s for s in json.loads(report.read_text())["folders"][0]["splits"]}["train"]
    assert named(train["damaged"]) == lost
    assert train["readable"] == 32 - len(lost)
    assert cli.main(["check-data", str(clean_root), "--workers", "2"]) == 0
    assert "no damaged records" in capsys.readouterr().out
    assert cli.main(["check-data", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_stego_knn_and_training_skip_damaged_records(damaged, tmp_path, caplog):
    from dist_seg.knn_table import load_knn_table

    root, lost = damaged
    table = tmp_path / "knn.npz"
    with caplog.at_level(logging.WARNING):
        assert cli.main(["knn", STEGO, *small(root, tmp_path / "unused"), "--out", str(table)]) == 0
    sims, indices, meta = load_knn_table(table)
    assert named(meta["damaged"]) == lost, "the table's provenance names every sample it left out"
    absent = torch.tensor(sorted(int(k) for _, k in lost))
    present = torch.ones(32, dtype=torch.bool)
    present[absent] = False
    assert present[indices].all(), "a damaged (absent) sample must never be anyone's neighbour"
    assert torch.isfinite(sims[present]).all() and torch.isinf(sims[absent]).all()
    assert (indices[present] != torch.arange(32)[present, None]).all()
    assert any("000000017" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)

    out = tmp_path / "run"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        code = cli.main(["train", STEGO, *small(root, out, "train.num_steps=8", f"data.knn_table={table}")])
    assert code == 0
    report = json.loads((out / "damaged.json").read_text())
    assert named(report["damaged"]) == lost, "8 steps of 8 crops pass every record: all damage is named"
    assert report["skipped_samples"] >= len(lost)
    assert any("training skipped" in r.getMessage() and "shard-000002.tar/" in r.getMessage() for r in caplog.records)


def test_ds2dl_trains_through_damaged_records(damaged, tmp_path):
    root, lost = damaged
    out = tmp_path / "run"
    assert cli.main(["train", DS2DL, *small(root, out, "train.num_steps=8", "ds2dl.feature_samples=5")]) == 0
    assert named(json.loads((out / "damaged.json").read_text())["damaged"]) == lost


def test_extract_keeps_positions_and_cached_training_skips_the_damage(damaged, tmp_path):
    from dist_seg.config import merge
    from dist_seg.data.shards import IndexedShards, make_loader
    from dist_seg.features import extract
    from dist_seg.runtime import load_recipe
    from dist_seg.trainer import train

    root, lost = damaged
    cache = tmp_path / "cache"
    cfg = merge(load_recipe(STEGO)(), overrides=small(root, tmp_path / "run", "data.num_workers=2",
                                                       f"data.feature_cache={cache}", "train.num_steps=8"))
    extract(cfg, splits=["train", "val"])
    report = json.loads((cache / "train" / "damaged.json").read_text())
    assert named(report["damaged"]) == lost
    assert all("cannot be decoded" in r["problem"] for r in report["damaged"] if r["shard"] == GARBAGE)
    # Feature shard i mirrors image shard i record for record: lookups by position stay exact.
    indexed = IndexedShards(cache, "train", decode="features")
    absent = {int(k) for _, k in lost}
    for i in range(32):
        if i not in absent:
            assert int(indexed[i]["index"]) == i
    indexed.close()
    loader, _ = make_loader(cache, "train", batch_size=4, res=None, num_workers=0, shuffle=False, infinite=False,
                            decode="features")
    assert sorted(int(i) for b in loader for i in b["index"]) == sorted(set(range(32)) - absent)
    assert named(r.as_dict() for r in loader.skip_counter.damaged()) == lost

    result = train(merge(cfg, overrides=["train.mode=cached"]))  # builds its KNN table from the cache
    assert named(result["data"]["damaged"]) == lost


def test_eval_reports_damaged_records(clean_root, damaged, tmp_path, capsys):
    root, lost = damaged
    out = tmp_path / "run"
    assert cli.main(["train", STEGO, *small(clean_root, out, "train.num_steps=2")]) == 0
    bad_val = tmp_path / "bad_val"
    shutil.copytree(clean_root, bad_val, ignore=shutil.ignore_patterns("knn", "features"))
    truncate_shard(bad_val / "val" / "shard-000000.tar", 0.5)
    ckpt = out / "checkpoints" / "step-00000002.pt"
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev"), f"data.root={bad_val}"]) == 0
    printed = capsys.readouterr().out
    assert "damaged validation records" in printed
    reports = list((tmp_path / "ev").glob("*.json"))
    val = json.loads(reports[0].read_text())["damaged"]
    assert val["damaged"] and all(r["shard"] == "shard-000000.tar" for r in val["damaged"])

    # Baselines fit their probes on the (damaged) training split: the report names what was skipped there.
    assert cli.main(["eval", "--baselines", "raw", "--recipe", STEGO, "--out", str(tmp_path / "base"),
                     *small(root, tmp_path / "b", "train.num_steps=8")]) == 0
    report = json.loads((tmp_path / "base" / "baseline_raw.json").read_text())
    assert named(report["damaged_train"]["damaged"]) == lost


def test_knn_with_no_readable_sample_stops_with_one_line(clean_root, tmp_path, capsys):
    root = tmp_path / "toy"
    shutil.copytree(clean_root, root, ignore=shutil.ignore_patterns("knn", "features"))
    for shard in (root / "train").glob("shard-*.tar"):
        truncate_shard(shard, 0.0)
    assert cli.main(["knn", STEGO, *small(root, tmp_path / "run")]) == 2
    # (stderr may also hold log lines of handlers that earlier tests bound to it: look at the error lines)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: only 0 of 32 samples") and "--overwrite" in err[0], err


def test_masks_skip_damaged_images(damaged, tmp_path):
    from dist_seg.config import RunConfig
    from dist_seg.maskdistill.mining import mine_masks

    root, lost = damaged
    cfg = RunConfig()
    cfg.data.root = str(root)
    cfg.maskdistill.work_dir = str(tmp_path / "work")
    cfg.maskdistill.mine.backbone = "toy"
    cfg.maskdistill.mine.short_side = 64
    cfg.maskdistill.mine.chunk_size = 8
    cfg.maskdistill.mine.heads = 2  # the toy ViT has 2 heads
    info = json.loads(mine_masks(cfg, split="train").read_text())["info"]
    assert named(info["damaged"]) == lost
    assert set(info["empty_image_ids"]) >= {int(k) for _, k in lost}


def test_training_stream_without_any_readable_record_stops_with_one_line(clean_root, tmp_path, capsys):
    root = tmp_path / "toy"
    shutil.copytree(clean_root, root, ignore=shutil.ignore_patterns("knn", "features"))
    for shard in (root / "train").glob("shard-*.tar"):
        truncate_shard(shard, 0.0)
    # An endless stream with nothing to read would wait forever: it must stop and say why.
    assert cli.main(["train", DS2DL, *small(root, tmp_path / "run", "train.num_steps=2", "data.num_workers=2")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no readable record in shard-" in err[0] and "--overwrite" in err[0], err


def _knn_on_rank(rank, world, root):
    from dist_seg.config import merge
    from dist_seg.knn_table import build_knn_table
    from dist_seg.runtime import load_recipe

    cfg = merge(load_recipe(STEGO)(), overrides=small(Path(root), Path(root) / "unused", "data.num_workers=1"))
    sims, indices, provenance = build_knn_table(cfg, k=5)
    return {"sims": sims, "indices": indices, "damaged": provenance["damaged"]}


def test_two_ranks_build_the_same_table_over_damaged_data(damaged):
    """Each rank reads its own shards (one of them damaged): the gathered table equals one process's."""
    from tests.dist_utils import run_distributed

    root, lost = damaged
    one = _knn_on_rank(0, 1, str(root))
    for rank, result in enumerate(run_distributed(_knn_on_rank, 2, str(root))):
        assert named(result["damaged"]) == lost, f"rank {rank} names other damage"
        assert torch.equal(result["indices"], one["indices"]), f"rank {rank}: table differs from one process"
        assert torch.allclose(result["sims"], one["sims"], atol=1e-6)
