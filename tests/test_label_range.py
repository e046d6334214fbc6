"""Label ids outside [0, num_classes) that are not the ignore value 255: check-data names the record, training
and evaluation skip it, count it and name it (docs/decisions.md, "Labels out of range")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_seg import cli
from dist_seg.config import merge
from dist_seg.data.shards import write_split
from dist_seg.data.toy import generate_toy, toy_sample
from dist_seg.runtime import load_recipe
from dist_seg.trainer import train

REPO = Path(__file__).resolve().parents[1]
BAD = {"train": 3, "val": 5}  # record whose label map gets class id 200 in a 5-class dataset


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labels") / "toy"
    generate_toy(root, num_train=32, num_val=8, samples_per_shard=8)
    for split, count in (("train", 32), ("val", 8)):
        samples = [toy_sample(i, split=split, num_classes=5, size=64, seed=0) for i in range(count)]
        samples[BAD[split]].label[10:20, 10:20] = 200
        write_split(samples, root, split, samples_per_shard=8, image_format="png", overwrite=True)
    return root


def test_check_data_names_the_record_with_out_of_range_ids(bad_root, capsys):
    assert cli.main(["check-data", str(bad_root), "--workers", "0"]) == 1
    out = capsys.readouterr().out
    for split, index in BAD.items():
        line = next((ln for ln in out.splitlines() if f"{index:09d}:" in ln and "label ids 200" in ln), None)
        assert line is not None, f"check-data must name {split} record {index}:\n{out}"
        assert "shard-000000.tar" in line and "outside 0..4" in line and "100 pixels" in line, line
    assert "damaged: 2" in out, out


def test_training_and_eval_skip_count_and_name_the_record(bad_root, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = merge(load_recipe(str(REPO / "recipes" / "stego_toy.py"))(), overrides=[
        f"data.root={bad_root}", f"train.output_dir={out}", "data.batch_size=8", "data.num_workers=0",
        "stego.feature_samples=5", "stego.neg_samples=2", "train.num_steps=4", "train.val_every=0",
        "tracking.enabled=false", "eval.num_overlays=0"])
    result = train(cfg)
    assert result["data"]["skipped_samples"] >= 1, result["data"]
    damaged = json.loads((out / "damaged.json").read_text())["damaged"]
    assert [(r["key"], "label ids 200" in r["problem"]) for r in damaged] == [(f"{BAD['train']:09d}", True)], damaged
    assert result["val"]["damaged"]["damaged"][0]["key"] == f"{BAD['val']:09d}", result["val"]["damaged"]

    assert cli.main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "ev")]) == 0
    assert "skipped 1 damaged validation records" in capsys.readouterr().out


def test_a_split_where_no_label_fits_stops_training_with_one_line(tmp_path, capsys):
    """A manifest whose class count does not match any label map (every record skipped): an endless training
    stream stops with one error line instead of spinning forever."""
    root = tmp_path / "toy"
    generate_toy(root, num_train=16, num_val=8, samples_per_shard=8)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(num_classes=2, class_names=manifest["class_names"][:2], colors=manifest["colors"][:2])
    (root / "manifest.json").write_text(json.dumps(manifest))
    code = cli.main(["train", str(REPO / "recipes" / "stego_toy.py"), f"data.root={root}",
                     f"train.output_dir={tmp_path / 'run'}", "data.batch_size=8", "data.num_workers=0",
                     "train.num_steps=2", "train.val_every=0", "tracking.enabled=false"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert "records of split 'train' in a row could not be used" in errors[0] and "outside 0..1" in errors[0], errors
