"""Table 3's mining baselines behind the ``masks`` stage: DINO's attention mask and LOST (paper 003, A.4).

Hand-built queries and keys where the answer is known; then the stage writes each miner's file beside
MaskDistill's own.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dist_seg.maskdistill.mining import (
    DegenerateAttentionError,
    dino_attention_mask,
    lost_object_mask,
    mine_grid_mask,
    mine_object_mask,
)


def _cells(mask: np.ndarray) -> set[int]:
    return set(np.flatnonzero(mask.reshape(-1)).tolist())


# ------------------------------------------------------------------------------------------ DINO
def _attention_qk(probs: list[dict[int, float]], num_patches: int, dim: int = 4):
    """q, k whose CLS attention (softmax of q·k/√d over CLS + patches) is ``probs[h]`` per head h.

    ``probs[h]`` maps token index (0 = CLS, 1 + j = patch j) to its probability; the other tokens share a
    negligible rest. q's CLS row is 2·e0 with d = 4, so the logits are exactly the keys' first entries:
    the test also checks the d^-½ scale.
    """
    q = torch.zeros(len(probs), 1 + num_patches, dim, dtype=torch.float64)
    k = torch.full_like(q, 0.0)
    q[:, 0, 0] = 2.0
    for h, head in enumerate(probs):
        k[h, :, 0] = math.log(1e-12)
        for token, p in head.items():
            k[h, token, 0] = math.log(p)
    return q, k


def test_dino_sums_the_heads_and_keeps_the_attention_mass():
    # Head 0 attends to patches 0 (.45) and 1 (.35), head 1 to patch 5 (.9); the CLS token takes the rest.
    # Summed: p5 .9, p0 .45, p1 .35 (1.7 in all). 75 % of the mass: p5 + p0 (1.35 / 1.7 = .79); p1 is out.
    q, k = _attention_qk([{0: 0.2, 1: 0.45, 2: 0.35}, {0: 0.1, 6: 0.9}], num_patches=9)
    assert _cells(dino_attention_mask(q, k, 3, mass=0.75)) == {0, 5}, "p0 and p5 are not adjacent: no component"
    assert _cells(dino_attention_mask(q, k, 3, mass=0.9)) == {0, 1, 5}
    assert _cells(dino_attention_mask(q, k, 3, mass=0.5)) == {5}
    # Head 0 alone would never hold patch 5: the heads are summed, not averaged over a subset.
    assert _cells(dino_attention_mask(q[:1], k[:1], 3, mass=0.75)) == {0, 1}


def test_dino_applies_the_softmax_scale():
    # Attention .5 / .3 / .2: 60 % of the mass is patches 0 and 1. Without the 1/√d scale (here: doubled
    # logits) it would sharpen to .66 / .24 / .11, and patch 0 alone would hold 60 %.
    q, k = _attention_qk([{1: 0.5, 2: 0.3, 3: 0.2}], num_patches=4)
    assert _cells(dino_attention_mask(q, k, 2, mass=0.6)) == {0, 1}
    assert _cells(dino_attention_mask(q * 2, k, 2, mass=0.6)) == {0}


# ------------------------------------------------------------------------------------------ LOST
def _keys(keys: np.ndarray, heads: int = 2) -> torch.Tensor:
    """k ``[heads, 1+N, d]`` whose heads, concatenated, give the patch keys ``keys`` [N, heads·d']."""
    n, d = keys.shape
    per = d // heads
    k = torch.zeros(heads, 1 + n, per, dtype=torch.float64)
    k[0, 0] = 7.0  # a CLS key: LOST never looks at it
    for h in range(heads):
        k[h, 1:] = torch.from_numpy(keys[:, h * per:(h + 1) * per])
    return k


def test_lost_seed_is_the_patch_of_fewest_positive_correlations():
    # 6×6 grid: object A (2×2, keys e1), object B (3×3, keys e2), background -(e1+e2). A's patches have the
    # fewest positive correlations (4, against B's 9 and the background's 23): LOST finds A, the smaller.
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    keys = np.tile(-(e1 + e2), (36, 1))
    a = [18, 19, 24, 25]  # rows 3-4, cols 0-1
    b = [3, 4, 5, 9, 10, 11, 15, 16, 17]  # rows 0-2, cols 3-5
    keys[a] = e1
    keys[b] = e2
    mask = lost_object_mask(_keys(keys), 6, num_proposals=100)
    assert _cells(mask) == set(a)
    assert _cells(lost_object_mask(_keys(keys), 6)) == set(a), "k larger than N is clipped"


def test_lost_seed_set_grows_with_the_number_of_proposals():
    # 4×4 grid: s (patch 5, key e1), u (6, key −.5e1+e2), t (9, key e1+2e2), background −(e1+e2).
    # Degrees: s 2, u 2, t 3, background 13; s is the seed (tie with u goes to the lower index).
    # k=1: S = {s}: the object is what correlates with s, {s, t}. k=3: S = {s, t} (u is not similar to s),
    # and u correlates with S as a whole (−.5 + 1.5 > 0): the object is {s, t, u}.
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    keys = np.tile(-(e1 + e2), (16, 1))
    keys[5], keys[6], keys[9] = e1, -0.5 * e1 + e2, e1 + 2 * e2
    assert _cells(lost_object_mask(_keys(keys), 4, num_proposals=1)) == {5, 9}
    assert _cells(lost_object_mask(_keys(keys), 4, num_proposals=2)) == {5, 9}, "u is not similar to the seed"
    assert _cells(lost_object_mask(_keys(keys), 4, num_proposals=3)) == {5, 6, 9}


def test_lost_keeps_the_component_of_the_seed():
    e1 = np.array([1.0, 0.0])
    keys = np.tile(-e1, (36, 1))
    keys[[0, 1, 6, 7]] = e1
    keys[35] = e1  # as similar as the object, but not 4-connected to it
    keys[14] = e1  # a diagonal neighbour of patch 7: not 4-connected either
    assert _cells(lost_object_mask(_keys(keys), 6)) == {0, 1, 6, 7}


def test_lost_zero_seed_key_is_degenerate():
    keys = np.ones((6, 2))
    keys[2] = 0.0  # fewest positive correlations (none), but no component can hold a zero key
    with pytest.raises(DegenerateAttentionError):
        lost_object_mask(_keys(keys), 3)


def test_miner_dispatch_and_bad_settings():
    q, k = _attention_qk([{1: 0.5, 2: 0.4}, {3: 0.5}], num_patches=6)
    assert np.array_equal(mine_grid_mask(q, k, 3, method="dino", dino_mass=0.9), dino_attention_mask(q, k, 3, mass=0.9))
    assert np.array_equal(mine_grid_mask(q, k, 3, method="lost", lost_k=2), lost_object_mask(k, 3, num_proposals=2))
    assert np.array_equal(mine_grid_mask(q, k, 3, heads=2), mine_object_mask(q, k, 3, heads=2))
    with pytest.raises(ValueError, match="maskdistill.mine.method='sam'"):
        mine_grid_mask(q, k, 3, method="sam")
    with pytest.raises(ValueError, match="dino_mass"):
        dino_attention_mask(q, k, 3, mass=0.0)
    with pytest.raises(ValueError, match="lost_k"):
        lost_object_mask(k, 3, num_proposals=0)
    with pytest.raises(ValueError, match="grid_w"):
        lost_object_mask(k, 4)


# ------------------------------------------------------------------------------------------ stage
def test_each_miner_writes_its_own_masks_file(tmp_path):
    from pycocotools import mask as mask_utils

    from dist_seg.backbones import load_backbone
    from dist_seg.data.shards import IndexedShards
    from dist_seg.maskdistill.files import MaskDistillFileError, masks_path
    from dist_seg.maskdistill.mining import mine_image_mask, mine_masks
    from tests.test_maskdistill_mining import _cfg, _dataset

    root = _dataset(tmp_path / "data", num=4)
    paths = {}
    for method in ("maskdistill", "dino", "lost"):
        cfg = _cfg(root, tmp_path / "work", method=method, lost_k=5)
        paths[method] = mine_masks(cfg, split="train")
        assert paths[method] == masks_path(cfg, "train")
    assert [p.name for p in paths.values()] == ["masks_train.json", "masks_dino_train.json", "masks_lost_train.json"]
    records = IndexedShards(root, "train", res=None)
    backbone = load_backbone("toy")
    for method, path in paths.items():
        data = json.loads(path.read_text())
        info = data["info"]
        assert info["method"] == method and len(data["annotations"]) == 4
        assert (info["dino_mass"], info["lost_k"]) == {"maskdistill": (None, None), "dino": (0.75, None),
                                                       "lost": (None, 5)}[method]
        assert (info["heads"] is None) == (method != "maskdistill"), "only the miner's own settings are recorded"
        for ann in data["annotations"]:
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            expected = mine_image_mask(backbone, records[ann["image_id"]]["image"], heads=2, short_side=64,
                                       method=method, lost_k=5)
            np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), expected)
    records.close()
    # Another lost_k is another configuration: refused, like any other setting.
    with pytest.raises(MaskDistillFileError, match="lost_k=5"):
        mine_masks(_cfg(root, tmp_path / "work", method="lost", lost_k=7), split="train")
    with pytest.raises(ValueError, match="method='sam'"):
        mine_masks(_cfg(root, tmp_path / "work", method="sam"), split="train")
