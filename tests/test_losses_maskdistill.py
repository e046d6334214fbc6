"""``ohem_cross_entropy`` (SPEC §8.5): hand-built cases, and parity with the official ``CrossEntropyOHEM``.

The parity test imports ``segmentation/losses.py`` from a checkout of wvangansbeke/MaskDistill named by
``$MASKDISTILL_OFFICIAL`` and skips without it; every other test builds its expectation by hand.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_seg.losses.maskdistill import ohem_cross_entropy


def _official_ohem():
    root = os.environ.get("MASKDISTILL_OFFICIAL")
    path = Path(root or "") / "segmentation" / "losses.py"
    if not root or not path.is_file():
        pytest.skip("set MASKDISTILL_OFFICIAL to a checkout of wvangansbeke/MaskDistill for the parity test")
    spec = importlib.util.spec_from_file_location("maskdistill_official_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CrossEntropyOHEM


@pytest.mark.parametrize("shape,classes,ignored,fraction", [
    ((2, 5, 7), 4, 0.0, 0.2), ((2, 5, 7), 4, 0.3, 0.2), ((3, 9, 4), 21, 0.9, 0.2), ((1, 6, 6), 3, 0.5, 0.7),
    ((2, 8, 8), 5, 0.95, 0.5),
])
def test_matches_official_values_and_gradients(shape, classes, ignored, fraction):
    official = _official_ohem()(fraction)
    gen = torch.Generator().manual_seed(hash((shape, classes, ignored)) % 2**31)
    b, h, w = shape
    logits = torch.randn(b, classes, h, w, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(classes, (b, h, w), generator=gen)
    target[torch.rand(b, h, w, generator=gen) < ignored] = 255
    a = logits.clone().requires_grad_(True)
    o = logits.clone().requires_grad_(True)
    ours = ohem_cross_entropy(a, target, top_fraction=fraction)
    ref = official(o, target)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, o.grad, rtol=1e-12, atol=1e-12)


def test_hand_built_top_pixels():
    # Two classes, logits chosen so every pixel's loss is known: loss = softplus(-margin) for target 0.
    margins = torch.tensor([[[3.0, -1.0, 0.5, 2.0, -2.0]]])  # [1, 1, 5]
    logits = torch.cat([margins, torch.zeros_like(margins)]).unsqueeze(0)  # [1, 2, 1, 5]
    target = torch.zeros(1, 1, 5, dtype=torch.long)
    per_pixel = F.softplus(-margins.flatten())
    # int(0.4 * 5) = 2 hardest pixels: margins -2 and -1.
    expected = per_pixel.sort(descending=True).values[:2].mean()
    torch.testing.assert_close(ohem_cross_entropy(logits, target, top_fraction=0.4), expected)
    # The hardest pixel ignored: n = min(2, 4) = 2 of the remaining ones (margins -1 and 0.5).
    target[0, 0, 4] = 255
    expected = per_pixel[[1, 2]].mean()
    torch.testing.assert_close(ohem_cross_entropy(logits, target, top_fraction=0.4), expected)


def test_n_clipped_to_the_valid_pixels():
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.full((2, 4, 4), 255)
    target[0, 0, :3] = torch.tensor([0, 1, 2])  # 3 valid of 32: int(0.5 * 32) = 16 > 3, so n = 3
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    expected = per_pixel[0, 0, :3].mean()
    torch.testing.assert_close(ohem_cross_entropy(logits, target, top_fraction=0.5), expected)
    # top_fraction 1 without ignored pixels is plain mean cross-entropy.
    full = torch.randint(3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ohem_cross_entropy(logits, full, top_fraction=1.0), F.cross_entropy(logits, full))


def test_all_ignored_is_a_zero_with_zero_gradient():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = ohem_cross_entropy(logits, torch.full((2, 4, 4), 255))
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0
    # Fewer pixels than one in 1/top_fraction: n = int(0.2 * 4) = 0, same defined zero.
    assert ohem_cross_entropy(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)).item() == 0.0


def test_custom_ignore_index_and_bad_input():
    logits = torch.randn(1, 3, 2, 5)
    target = torch.randint(3, (1, 2, 5))
    target[0, 0] = -1
    ref = F.cross_entropy(logits, target, ignore_index=-1, reduction="none")[target != -1]
    torch.testing.assert_close(ohem_cross_entropy(logits, target, top_fraction=0.3, ignore_index=-1),
                               ref.topk(3).values.mean())
    with pytest.raises(ValueError, match="top_fraction"):
        ohem_cross_entropy(logits, target, top_fraction=0.0)
    with pytest.raises(ValueError, match="expected logits"):
        ohem_cross_entropy(logits, target[0])
