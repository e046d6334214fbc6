"""DINOv3-shaped backbone end to end: a toy STEGO run, the raw baseline, and caches of another backbone refused.

``toy_dinov3`` is timm's DINOv3 architecture (RoPE, 4 register tokens, layer scale, q/v biases with the
key bias fixed at zero) at toy size, random-init from a fixed seed like ``toy``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dist_seg import cli

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stego_toy.py")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy3") / "toy"
    generate_toy(root, num_train=32, num_val=8, samples_per_shard=8)
    return root


def _small(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"train.output_dir={out}", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle_buffer=16", "stego.feature_samples=5", "stego.neg_samples=2", "train.val_every=0",
            "tracking.enabled=false", *extra]


def test_toy_stego_run_and_baselines_on_a_dinov3_backbone(toy_root, tmp_path, capsys):
    from dist_seg.config import RunConfig, merge
    from dist_seg.trainer import load_latest_checkpoint

    out = tmp_path / "run"
    overrides = _small(toy_root, out, "backbone.name=toy_dinov3", "train.num_steps=3", "train.checkpoint_every=3")
    assert cli.main(["train", RECIPE, *overrides]) == 0
    state, _ = load_latest_checkpoint(merge(RunConfig(), overrides=[f"train.output_dir={out}"]))
    assert state is not None and state["step"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["backbone"]["name"] == "toy_dinov3"
    assert json.loads((out / "eval" / "final.json").read_text())["cluster"]["mIoU"] > 0
    # The KNN table mined for the run records the DINOv3 backbone it was built with.
    from dist_seg.knn_table import load_knn_table

    _, _, meta = load_knn_table(toy_root / "knn" / "train_toy_dinov3_64.npz")
    assert meta["backbone"] == "toy_dinov3" and meta["weights_id"] == "random-init-seed0"

    capsys.readouterr()
    code = cli.main(["eval", "--baselines", "raw", "pca", "rp", "--recipe", RECIPE, "--out", str(tmp_path / "base"),
                     *overrides])
    assert code == 0
    out = capsys.readouterr().out
    for row in ("baseline raw", "baseline pca", "baseline rp"):
        line = next((ln for ln in out.splitlines() if ln.startswith(row)), None)
        assert line is not None, f"missing row {row} in:\n{out}"
        numbers = [float(x) for x in line[len(row):].split()]
        assert len(numbers) == 4 and all(0 <= x <= 100 for x in numbers), line


def test_extract_refuses_a_cache_of_another_backbone(toy_root, tmp_path, capsys):
    """A cache built with another backbone (here the DINO-style ``toy``) is refused for a DINOv3 run."""
    cache = tmp_path / "cache"
    common = [RECIPE, "--cache", str(cache), *_small(toy_root, tmp_path / "run")]
    assert cli.main(["extract", *common, "backbone.name=toy"]) == 0
    assert json.loads((cache / "cache.json").read_text())["backbone"] == "toy"
    capsys.readouterr()
    assert cli.main(["extract", *common, "backbone.name=toy_dinov3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "another configuration" in err and "toy_dinov3" in err, err
    assert len(err.strip().splitlines()) == 1, err
    # Training from it is refused as well, naming the backbone the cache was built with.
    code = cli.main(["train", RECIPE, *_small(toy_root, tmp_path / "run2", "backbone.name=toy_dinov3",
                                              "train.mode=cached", f"data.feature_cache={cache}")])
    assert code == 2
    err = capsys.readouterr().err
    assert "backbone='toy'" in err and "'toy_dinov3'" in err, err
