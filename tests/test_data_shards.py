"""Shard writing, streaming, resume, corrupt data and indexed access (single process)."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch

from dist_seg.data import transforms as T
from dist_seg.data.manifest import (
    DataError,
    DatasetManifest,
    ManifestNotFoundError,
    SplitInfo,
    read_manifest,
    update_split,
)
from dist_seg.data.shards import (
    IndexedShards,
    Sample,
    _resume_plan,
    five_crop,
    make_loader,
    split_is_complete,
    write_records,
    write_split,
)
from tests._data_utils import collect, make_dataset, random_samples

RES = 16


@pytest.fixture(autouse=True)
def _wids_cache(tmp_path, monkeypatch):
    # IndexedShards keeps its shard symlinks in $WIDS_CACHE; keep them inside the test's folder.
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids-cache"))


def expected_row(sample: Sample, res: int = RES) -> tuple[np.ndarray, np.ndarray]:
    image = T.resize_center_crop(sample.image, res)
    label = T.resize_center_crop_label(sample.label, res).astype(np.int64)
    label[label == 255] = -1
    return image, label


# ------------------------------------------------------------------------------------------ writing
def test_round_trip_png_is_exact(tmp_path):
    samples = make_dataset(tmp_path, num=37, per_shard=5)
    info = read_manifest(tmp_path).split("train")
    assert info.num_samples == 37 and len(info.shards) == 8, info
    assert info.shard_sizes == [5] * 7 + [2], info.shard_sizes
    index = json.loads((tmp_path / "train" / "wids.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert [s["nsamples"] for s in index["shardlist"]] == info.shard_sizes

    loader, num_batches = make_loader(tmp_path, "train", batch_size=4, res=RES, num_workers=0, shuffle=False,
                                      infinite=False)
    batches = collect(loader)
    assert num_batches == len(batches), f"announced {num_batches} batches, got {len(batches)}"
    seen = []
    for batch in batches:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, RES, RES)
        assert batch["label"].dtype == torch.int64 and batch["label"].shape[1:] == (RES, RES)
        for row, idx in enumerate(batch["index"].tolist()):
            image, label = expected_row(samples[idx])
            assert np.array_equal(batch["image"][row].permute(1, 2, 0).numpy(), image), f"image {idx} differs"
            assert np.array_equal(batch["label"][row].numpy(), label), f"label {idx} differs"
            seen.append(idx)
    assert seen == list(range(37)), f"one worker, no shuffle must read in index order, got {seen}"


def test_same_size_png_images_and_labels_come_back_unchanged(tmp_path):
    samples = random_samples(6, sizes=((RES, RES),))
    info = write_split(samples, tmp_path, "val", samples_per_shard=3, image_format="png")
    update_split(tmp_path, "val", info, name="unit")
    (batch,) = collect(make_loader(tmp_path, "val", batch_size=6, res=RES, num_workers=0, shuffle=False,
                                   infinite=False)[0])
    for i, s in enumerate(samples):
        assert np.array_equal(batch["image"][i].permute(1, 2, 0).numpy(), s.image)
        lab = s.label.astype(np.int64)
        lab[lab == 255] = -1
        assert np.array_equal(batch["label"][i].numpy(), lab)


def test_jpg_records_and_unlabelled_split(tmp_path):
    samples = make_dataset(tmp_path, num=6, per_shard=2, labelled=False, image_format="jpg")
    assert read_manifest(tmp_path).split("train").has_labels is False
    loader, _ = make_loader(tmp_path, "train", batch_size=3, res=RES, num_workers=0, shuffle=False, infinite=False)
    batch = collect(loader)[0]
    assert (batch["label"] == -1).all(), "an unlabelled split must give all-ignore labels"
    from PIL import Image

    from dist_seg.data.shards import encode_image

    decoded = np.asarray(Image.open(io.BytesIO(encode_image(samples[0].image, "jpg"))).convert("RGB"))
    assert np.array_equal(batch["image"][0].permute(1, 2, 0).numpy(), T.resize_center_crop(decoded, RES))


def test_write_split_rejects_bad_labels(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(DataError, match="label of 'a'"):
        write_split([Sample(image=img, label=np.zeros((8, 9), np.uint8), source="a")], tmp_path, "x")
    with pytest.raises(DataError, match="0..254"):
        write_split([Sample(image=img, label=np.full((8, 8), 300, np.int32), source="b")], tmp_path, "x")
    assert not (tmp_path / "x").exists(), "a failed write must not leave a split folder"
    assert not list(tmp_path.glob(".x.partial-*")), "a failed write must clean its temporary folder"


def test_write_is_atomic_and_resumable(tmp_path):
    def failing():
        yield from random_samples(7)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_split(failing(), tmp_path, "train", samples_per_shard=3)
    assert split_is_complete(tmp_path, "train") is None and not (tmp_path / "train").exists()

    # A stale partial folder (a killed run) is cleaned up by the next run.
    (tmp_path / ".train.partial-999999").mkdir()
    first = write_split(random_samples(7), tmp_path, "train", samples_per_shard=3)
    assert not list(tmp_path.glob(".train.partial-*"))

    consumed = []

    def tracked():
        for s in random_samples(9, seed=1):
            consumed.append(s)
            yield s

    again = write_split(tracked(), tmp_path, "train", samples_per_shard=3)
    assert again == first and consumed == [], "a complete split must be skipped without reading its input"
    rewritten = write_split(tracked(), tmp_path, "train", samples_per_shard=3, overwrite=True)
    assert rewritten.num_samples == 9 and len(consumed) == 9


# ------------------------------------------------------------------------------------------- manifest
def test_manifest_round_trip_and_missing_manifest_message(tmp_path):
    manifest = DatasetManifest(name="toy", num_classes=2, class_names=["a", "b"], colors=[[1, 2, 3], [4, 5, 6]],
                               splits={"train": SplitInfo(num_samples=3, shards=["s.tar"], has_labels=True)},
                               extra={"k": 1})
    assert DatasetManifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(ManifestNotFoundError, match="dist-seg prepare"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ManifestNotFoundError, match="dist-seg prepare"):
        make_loader(tmp_path, "train", batch_size=2, res=RES, shuffle=False, infinite=False)
    update_split(tmp_path, "train", manifest.splits["train"], name="toy", num_classes=2, extra={"a": {"train": 1}})
    update_split(tmp_path, "val", manifest.splits["train"], extra={"a": {"val": 2}})
    got = read_manifest(tmp_path)
    assert set(got.splits) == {"train", "val"} and got.extra["a"] == {"train": 1, "val": 2}
    with pytest.raises(DataError, match="no split 'test'"):
        got.split("test")


# ----------------------------------------------------------------------------------------- five crop
def test_five_crop_geometry():
    h, w = 40, 60
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy, xx, np.zeros_like(yy)], axis=-1).astype(np.uint8)
    label = (yy * 3 + xx).astype(np.int64) % 200
    crops = five_crop(Sample(image=image, label=label, source="grid"), crop_ratio=0.5)
    ch, cw = 20, 30
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (int(round((h - ch) / 2)), int(round((w - cw) / 2)))]
    assert [c.crop for c in crops] == [0, 1, 2, 3, 4]
    for crop, (top, left) in zip(crops, corners):
        assert crop.image.shape == (ch, cw, 3) and crop.label.shape == (ch, cw)
        assert crop.image[0, 0, 0] == top and crop.image[0, 0, 1] == left, f"crop {crop.crop} starts elsewhere"
        assert np.array_equal(crop.image, image[top:top + ch, left:left + cw])
        assert np.array_equal(crop.label, label[top:top + ch, left:left + cw]), "label crop must match image crop"
        assert crop.source == "grid"


# ------------------------------------------------------------------------------------------- resume
def test_resume_plan_replays_round_robin_with_exhausted_workers():
    counts = [1, 4, 2]
    order = []  # fresh stream: worker of each batch, cycling and dropping exhausted workers
    remaining = list(counts)
    w = 0
    while sum(remaining):
        if remaining[w]:
            order.append(w)
            remaining[w] -= 1
        w = (w + 1) % 3
    for k in range(len(order) + 1):
        rotation, skipped = _resume_plan(counts, k)
        assert skipped == [order[:k].count(i) for i in range(3)], (k, skipped)
        rest = [i for i in range(3) for _ in range(counts[i] - skipped[i])]
        if rest:
            cycle = [(rotation + j) % 3 for j in range(3)]
            first = next(w for w in cycle if counts[w] > skipped[w])
            assert first == order[k], f"resumed stream must start with worker {order[k]}, got {first}"


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("infinite", [False, True])
def test_start_batch_continues_a_fresh_stream(tmp_path, num_workers, infinite):
    make_dataset(tmp_path, num=37, per_shard=5)  # uneven: workers run out at different batches
    kw = dict(batch_size=3, res=8, num_workers=num_workers, seed=5, shuffle=True, infinite=infinite,
              shuffle_buffer=7)
    total = 30 if infinite else None
    fresh_loader, fresh_count = make_loader(tmp_path, "train", **kw)
    fresh = [b["index"].tolist() for b in collect(fresh_loader, total)]
    if not infinite:
        assert fresh_count == len(fresh)
        assert sorted(i for b in fresh for i in b) == list(range(37))
    for k in (1, 4, 9, len(fresh) - 1):
        loader, count = make_loader(tmp_path, "train", start_batch=k, **kw)
        resumed = [b["index"].tolist() for b in collect(loader, None if total is None else total - k)]
        assert resumed == fresh[k:], f"start_batch={k} (workers={num_workers}, infinite={infinite}) diverged"
        if not infinite:
            assert count == len(fresh) - k


def test_resume_skips_before_decoding(tmp_path, monkeypatch):
    make_dataset(tmp_path, num=20, per_shard=5)
    from dist_seg.data import shards

    calls = []
    original = shards.RecordDecoder.__call__

    def counting(self, raw):
        calls.append(raw["__key__"])
        return original(self, raw)

    monkeypatch.setattr(shards.RecordDecoder, "__call__", counting)
    loader, _ = make_loader(tmp_path, "train", batch_size=2, res=8, num_workers=0, shuffle=True, infinite=False,
                            start_batch=6)
    rows = sum(len(b["index"]) for b in collect(loader))
    assert rows == 20 - 12 and len(calls) == rows, f"decoded {len(calls)} records to deliver {rows}"


# ----------------------------------------------------------------------------------------- shuffling
def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    make_dataset(tmp_path, num=40, per_shard=4)

    def order(seed, epoch):
        loader, _ = make_loader(tmp_path, "train", batch_size=4, res=8, num_workers=2, seed=seed, shuffle=True,
                                infinite=False, epoch=epoch)
        return [i for b in collect(loader) for i in b["index"].tolist()]

    a = order(0, 0)
    assert sorted(a) == list(range(40))
    assert a == order(0, 0), "same (seed, epoch) must give the same order"
    assert a != order(0, 1), "a new epoch must reshuffle"
    assert a != order(1, 0), "another seed must reshuffle"
    assert a != list(range(40))


# ------------------------------------------------------------------------------------------ corrupt
def _truncate(path, keep_fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_is_counted_and_skipped(tmp_path, num_workers, caplog):
    make_dataset(tmp_path, num=30, per_shard=5)
    bad = tmp_path / "train" / "shard-000002.tar"  # indices 10..14
    _truncate(bad, 0.45)
    with tarfile.open(bad, "r|") as tf:  # which records survive the cut intact?
        names = []
        try:
            for member in tf:
                names.append(member.name)
        except tarfile.ReadError:
            pass
    intact = {int(n.split(".")[0]) for n in names if n.endswith(".label.png")}
    assert len(intact) < 5
    loader, _ = make_loader(tmp_path, "train", batch_size=4, res=8, num_workers=num_workers, shuffle=False,
                            infinite=False)
    with caplog.at_level(logging.WARNING, logger="dist_seg.data.shards"):
        seen = [i for b in collect(loader) for i in b["index"].tolist()]
    good = set(range(30)) - set(range(10, 15))
    assert good <= set(seen), f"good records lost: {sorted(good - set(seen))}"
    assert len(seen) == len(set(seen))
    assert set(seen) - good <= intact
    counter = loader.skip_counter
    assert counter.skipped_samples == 30 - len(seen), counter.snapshot()
    assert counter.shard_errors >= 1, counter.snapshot()
    assert any("skipped" in r.getMessage() and "pass finished" in r.getMessage() for r in caplog.records), \
        "the end-of-pass report must mention the skipped records"

    # An endless stream over the same shards keeps going and keeps counting, epoch after epoch.
    endless, _ = make_loader(tmp_path, "train", batch_size=4, res=8, num_workers=num_workers, shuffle=True,
                             infinite=True)
    rows = [i for b in collect(endless, 3 * 30 // 4) for i in b["index"].tolist()]
    assert len(rows) == 3 * 30 // 4 * 4 and good <= set(rows)
    lost_per_epoch = 30 - len(seen)
    assert endless.skip_counter.skipped_samples >= 2 * lost_per_epoch, endless.skip_counter.snapshot()


@pytest.mark.timeout(60)
def test_undecodable_record_and_missing_shard_are_counted(tmp_path):
    good = np.zeros((8, 8, 3), np.uint8)
    from dist_seg.data.shards import encode_image

    records = [{"png": encode_image(good, "png"), "json": {"source": str(i)}} for i in range(12)]
    records[5]["png"] = b"not a png at all"
    write_records(records, tmp_path, "train", samples_per_shard=3)
    os.remove(tmp_path / "train" / "shard-000003.tar")  # records 9..11
    loader, _ = make_loader(tmp_path / "train" / "wids.json", "train", batch_size=2, res=8, num_workers=2,
                            shuffle=True, infinite=False)
    seen = sorted(i for b in collect(loader) for i in b["index"].tolist())
    assert seen == [0, 1, 2, 3, 4, 6, 7, 8]
    assert loader.skip_counter.skipped_samples == 4, loader.skip_counter.snapshot()
    assert loader.skip_counter.shard_errors == 1, loader.skip_counter.snapshot()


# ----------------------------------------------------------------------------------------- workers
def test_fewer_shards_than_workers_reduces_workers(tmp_path, caplog):
    make_dataset(tmp_path, num=6, per_shard=3)
    with caplog.at_level(logging.WARNING):
        loader, n = make_loader(tmp_path, "train", batch_size=2, res=8, num_workers=4, shuffle=False,
                                infinite=False)
    assert loader.num_workers == 2 and any("using 2 workers" in r.getMessage() for r in caplog.records)
    batches = collect(loader)
    assert n == len(batches) == 4
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(6))


# ---------------------------------------------------------------------------------------------- URLs
def test_url_lists_brace_specs_and_pipes(tmp_path):
    make_dataset(tmp_path, num=12, per_shard=4)
    shard_dir = tmp_path / "train"
    specs = [
        [str(p) for p in sorted(shard_dir.glob("*.tar"))],
        str(shard_dir / "shard-{000000..000002}.tar"),
        [f"pipe:cat {p}" for p in sorted(shard_dir.glob("*.tar"))],
    ]
    for spec in specs:
        loader, n = make_loader(spec, "train", batch_size=5, res=8, num_workers=0, shuffle=False, infinite=False)
        assert n is None, "a URL list has no sample counts"
        assert [i for b in collect(loader) for i in b["index"].tolist()] == list(range(12)), spec
    with pytest.raises(DataError, match="dist-seg prepare"):
        make_loader(str(tmp_path / "missing-{0..3}.tar"), "train", batch_size=2, res=8, shuffle=False,
                    infinite=False)


# ------------------------------------------------------------------------------------- random access
def test_indexed_shards_match_the_stream(tmp_path):
    make_dataset(tmp_path, num=23, per_shard=4)
    indexed = IndexedShards(tmp_path, "train", res=RES)
    assert len(indexed) == 23
    loader, _ = make_loader(tmp_path, "train", batch_size=5, res=RES, num_workers=2, shuffle=True, infinite=False)
    checked = 0
    for batch in collect(loader):
        for row, idx in enumerate(batch["index"].tolist()):
            item = indexed[idx]
            assert int(item["index"]) == idx
            assert torch.equal(item["image"], batch["image"][row]), f"image {idx} differs between readers"
            assert torch.equal(item["label"], batch["label"][row]), f"label {idx} differs between readers"
            checked += 1
    assert checked == 23
    picked = indexed.get_batch(torch.tensor([22, 0, 7]))
    assert picked["index"].tolist() == [22, 0, 7] and picked["image"].shape == (3, 3, RES, RES)
    with pytest.raises(IndexError):
        indexed[23]
    indexed.close()
    assert not list((tmp_path / "train").glob("*.lock")), "wids lock files must not be left behind"
    assert not list((tmp_path / "train").glob("*.index")), "no second copy / index of the shards"


def test_indexed_shards_detect_a_stale_index(tmp_path):
    make_dataset(tmp_path, num=8, per_shard=4)
    index_path = tmp_path / "train" / "wids.json"
    doc = json.loads(index_path.read_text())
    doc["shardlist"].reverse()  # shard order no longer matches global indices
    index_path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="does not match"):
        IndexedShards(tmp_path, "train", res=RES)[0]


# ---------------------------------------------------------------------------------------- features
def test_feature_records_stream_and_index(tmp_path):
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(6, 3, 4)).astype(np.float16) for _ in range(10)]
    labels = [rng.integers(0, 3, size=(12, 16)).astype(np.uint8) for _ in range(10)]
    from dist_seg.data.shards import encode_label

    records = [{"feat.npy": f, "gap.npy": f.astype(np.float32).mean(axis=(1, 2)), "label.png": encode_label(lab),
                "json": {"source": f"img{i}"}} for i, (f, lab) in enumerate(zip(feats, labels))]
    info = write_records(records, tmp_path, "train_feats", samples_per_shard=3)
    update_split(tmp_path, "train_feats", info, name="unit-features")
    loader, n = make_loader(tmp_path, "train_feats", batch_size=4, res=None, num_workers=2, shuffle=True,
                            infinite=False, decode="features")
    batches = collect(loader)
    assert n == len(batches)
    indexed = IndexedShards(tmp_path, "train_feats", decode="features")
    for batch in batches:
        assert batch["feat"].dtype == torch.float32 and batch["feat"].shape[1:] == (6, 3, 4)
        assert batch["gap"].shape[1:] == (6,) and batch["label"].shape[1:] == (12, 16)
        for row, idx in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["feat"][row], torch.from_numpy(feats[idx].astype(np.float32)))
            assert torch.equal(batch["label"][row], torch.from_numpy(labels[idx].astype(np.int64)))
            assert torch.equal(indexed[idx]["feat"], batch["feat"][row])


def test_feature_shards_written_by_hand_and_indexed_afterwards(tmp_path):
    # The feature cache writes tar files itself (one per image shard) and indexes them afterwards.
    import webdataset as wds

    from dist_seg.data.manifest import write_manifest
    from dist_seg.data.shards import encode_label, write_wids_index

    split_dir = tmp_path / "train"
    split_dir.mkdir()
    names, index = [], 0
    for shard, size in enumerate([3, 4, 2]):
        names.append(f"shard-{shard:06d}.tar")
        with wds.TarWriter(str(split_dir / names[-1])) as sink:
            for _ in range(size):
                sink.write({"__key__": f"{index:09d}", "feat.npy": np.full((2, 2, 2), index, np.float16),
                            "gap.npy": np.full(2, index, np.float32), "label.png": encode_label(np.eye(4, dtype=int)),
                            "json": json.dumps({"index": index}).encode()})
                index += 1
    path = write_wids_index(split_dir, names)
    assert [s["nsamples"] for s in json.loads(path.read_text())["shardlist"]] == [3, 4, 2]
    write_manifest(tmp_path, DatasetManifest(name="cache", num_classes=2, class_names=None, colors=None, splits={
        "train": SplitInfo(num_samples=9, shards=names, has_labels=True)}))
    loader, n = make_loader(tmp_path, "train", batch_size=2, res=None, num_workers=0, shuffle=False, infinite=False,
                            decode="features")
    batches = collect(loader)
    assert n == len(batches) == 5
    assert [int(v) for b in batches for v in b["feat"][:, 0, 0, 0]] == list(range(9))
    assert int(IndexedShards(tmp_path, "train", decode="features")[7]["gap"][0]) == 7


def test_split_mixing_labels_is_rejected(tmp_path):
    samples = random_samples(4)
    samples[2] = Sample(image=samples[2].image, label=None, source="unlabelled")
    with pytest.raises(DataError, match="fully labelled or unlabelled"):
        write_split(samples, tmp_path, "train", samples_per_shard=2)


def test_encoded_label_png_is_8bit_with_ignore(tmp_path):
    from PIL import Image

    from dist_seg.data.shards import encode_label

    lab = np.array([[0, 1], [-1, 254]])
    img = Image.open(io.BytesIO(encode_label(lab)))
    assert img.mode == "L" and np.array_equal(np.array(img), [[0, 1], [255, 254]])
