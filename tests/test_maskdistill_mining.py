"""SPEC §8.1 object-mask mining: the patch-grid rule, its parity with the official code, and errors.

The parity test reads the official ``mask_generator`` (``gen_masks.py``) and ``threshold_attention``
(``utils/util.py``) from a local checkout of wvangansbeke/MaskDistill named by ``$MASKDISTILL_OFFICIAL``
and skips without it. Only those two function definitions are taken from the files (with ``ast``), so the
checkout's other imports (its vendored timm, detectron2 helpers, tqdm, termcolor) are not needed. The
hand-built cases never skip.
"""

from __future__ import annotations

import ast
import os
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

from dist_seg.maskdistill.mining import DegenerateAttentionError, mine_object_mask


# ------------------------------------------------------------------------------------------ official
def _function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(path.read_text(), node)
    raise AssertionError(f"{path} defines no function {name!r}")


def _stable_topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """``torch.topk`` with ties broken to the lower index (torch leaves the tie order unspecified)."""
    assert largest and sorted, "the official mask_generator only asks for the largest, sorted"
    values, indices = torch.sort(x, dim=dim, descending=True, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


class _TorchWithStableTopk(types.ModuleType):
    """The ``torch`` the official functions see: torch itself, but a lower-index tie-break in ``topk``."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.topk = _stable_topk

    def __getattr__(self, name: str):
        return getattr(torch, name)


@pytest.fixture(scope="module")
def official_mask_generator():
    root = os.environ.get("MASKDISTILL_OFFICIAL")
    if not root:
        pytest.skip("set MASKDISTILL_OFFICIAL to a checkout of wvangansbeke/MaskDistill for the parity test")
    root = Path(root)
    namespace = {"torch": _TorchWithStableTopk(), "scipy": scipy, "np": np}
    exec(_function_source(root / "utils" / "util.py", "threshold_attention"), namespace)
    exec(_function_source(root / "gen_masks.py", "mask_generator"), namespace)
    return namespace["mask_generator"]


PARITY_CASES = [
    (num_heads, heads, grid, topk)
    for num_heads, head_choices in ((3, (1, 3)), (6, (1, 5, 6)), (12, (5, 12)))
    for heads in head_choices
    for grid in ((14, 14), (7, 11), (12, 5), (1, 9))
    for topk in (0.1, 0.4, 0.75, 1.0)
    if int(topk * grid[0] * grid[1]) >= 1  # the official code fails on an empty proposal set; ours refuses it
]


@pytest.mark.parametrize("num_heads,heads,grid,topk", PARITY_CASES)
def test_equals_official_mask_generator(official_mask_generator, num_heads, heads, grid, topk):
    grid_h, grid_w = grid
    gen = torch.Generator().manual_seed(hash((num_heads, heads, grid, topk)) % 2**31)
    for trial in range(3):
        q = torch.randn(num_heads, 1 + grid_h * grid_w, 8, generator=gen, dtype=torch.float64)
        k = torch.randn(num_heads, 1 + grid_h * grid_w, 8, generator=gen, dtype=torch.float64)
        if trial:
            # Two key groups along a random direction per head, with the CLS query leaning to one of them,
            # so the masks are proper parts of the grid rather than noise or the whole grid.
            u = torch.randn(num_heads, 1, 8, generator=gen, dtype=torch.float64)
            side = torch.where(torch.rand(1, grid_h * grid_w, 1, generator=gen) < 0.4, 1.0, -1.0).double()
            k[:, 1:] += trial * side * u
            q[:, :1] += trial * u
        args = types.SimpleNamespace(heads=heads, topk=topk)
        expected = official_mask_generator(q[None], k[None], grid_w, args)
        ours = mine_object_mask(q, k, grid_w, heads=heads, topk=topk, mass=0.5)
        assert ours.shape == (grid_h, grid_w) and ours.dtype == bool
        np.testing.assert_array_equal(ours, expected, err_msg=f"trial {trial}")


# --------------------------------------------------------------------------------------- hand-built
EPS = 1e-3


def _qk_from(attention: np.ndarray, keys: np.ndarray, *, extra_query: np.ndarray | None = None):
    """q, k with 2 heads: head 0 carries ``attention`` (CLS · key = attention, keys ~EPS so they barely
    touch the key graph), head 1 carries the key graph ``keys`` [N, d]; ``extra_query`` is head 1's CLS query.
    """
    num_patches, dim = keys.shape
    q = torch.zeros(2, 1 + num_patches, dim + 1, dtype=torch.float64)
    k = torch.zeros_like(q)
    q[0, 0, dim] = 1.0 / EPS
    k[0, 1:, dim] = torch.from_numpy(attention.reshape(-1)) * EPS
    k[1, 1:, :dim] = torch.from_numpy(keys)
    if extra_query is not None:
        q[1, 0, :dim] = torch.from_numpy(extra_query)
    return q, k


def _blocks_case():
    """4×4 grid: object A (top-left 2×2, keys e1), D (row 2, cols 0-1, keys e2, no attention), C (bottom-right
    patch, keys e1+e2, some attention), background keys -e1."""
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    keys = np.tile(-e1, (16, 1))
    attention = np.zeros(16)
    for i in (0, 1, 4, 5):
        keys[i] = e1
        attention[i] = 50.0
    attention[0] = 100.0
    for i in (8, 9):
        keys[i] = e2
    keys[15] = e1 + e2
    attention[15] = 20.0
    return attention, keys


def _cells(mask: np.ndarray) -> set[int]:
    return set(np.flatnonzero(mask.reshape(-1)).tolist())


def test_known_object_rectangle_on_a_non_square_grid():
    grid_h, grid_w = 5, 7
    rng = np.random.default_rng(0)
    obj = np.zeros((grid_h, grid_w), bool)
    obj[1:4, 2:6] = True
    keys = np.where(obj.reshape(-1, 1), [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]) + 0.05 * rng.standard_normal((35, 3))
    attention = np.where(obj, 5.0, 0.1).reshape(-1) + 0.01 * rng.random(35)
    q, k = _qk_from(attention, keys)
    mask = mine_object_mask(q.float(), k.float(), grid_w, heads=1, topk=0.3, mass=0.5)
    np.testing.assert_array_equal(mask, obj)


def test_mass_filter_decides_which_proposals_diffuse():
    attention, keys = _blocks_case()
    q, k = _qk_from(attention, keys)
    # Without filtering (mass=1 keeps every positive entry), C is proposed and links D (keys e2) to A.
    assert _cells(mine_object_mask(q, k, 4, heads=1, topk=5 / 16, mass=1.0)) == {0, 1, 4, 5, 8, 9}
    # The filter keeps only the two largest entries (0 and the last 50, patch 5); the remaining proposals are
    # zero-attention ties taken in index order (1, 2, 3), of which the background (keys -e1) is not similar.
    assert _cells(mine_object_mask(q, k, 4, heads=1, topk=5 / 16, mass=0.5)) == {0, 1, 4, 5}


def test_component_holding_the_source_only():
    attention, keys = _blocks_case()
    q, k = _qk_from(attention, keys)
    # C (patch 15) is in the diffused map (similar to A) but not 4-connected to the source's component.
    mask = mine_object_mask(q, k, 4, heads=1, topk=0.25, mass=0.5)
    assert 15 not in _cells(mask) and _cells(mask) == {0, 1, 4, 5}
    # A diagonal neighbour is not 4-connected either.
    keys[10] = keys[0]
    q, k = _qk_from(attention, keys)
    assert _cells(mine_object_mask(q, k, 4, heads=1, topk=0.25, mass=0.5)) == {0, 1, 4, 5}


def test_only_the_first_heads_attend_but_all_heads_build_the_key_graph():
    attention, keys = _blocks_case()
    q, k = _qk_from(attention, keys, extra_query=np.array([0.0, 1000.0]))
    # heads=1 ignores head 1's CLS query; the result is A, not the whole grid, so head 1's keys are in G.
    assert _cells(mine_object_mask(q, k, 4, heads=1, topk=0.25, mass=0.5)) == {0, 1, 4, 5}
    # heads=2 averages in head 1's attention on e2 keys: C (attention (20+1000)/2) becomes the source, and
    # its component is C alone.
    assert _cells(mine_object_mask(q, k, 4, heads=2, topk=0.25, mass=0.5)) == {15}


def test_top_k_ties_go_to_the_lower_index():
    # All attention equal: the source is patch 0 and the proposals are the first int(topk·N) patches.
    keys = np.tile([1.0, 0.0], (12, 1))
    keys[[2, 3, 6, 7, 10, 11]] = [-1.0, 0.0]  # the right half of a 3×4 grid is a second, dissimilar region
    q, k = _qk_from(np.ones(12), keys)
    assert _cells(mine_object_mask(q, k, 4, heads=1, topk=0.5, mass=1.0)) == {0, 1, 4, 5, 8, 9}


def test_degenerate_attention_is_a_clear_error():
    q = torch.zeros(2, 1 + 6, 4)
    k = torch.randn(2, 1 + 6, 4)
    with pytest.raises(DegenerateAttentionError, match="sums to zero"):
        mine_object_mask(q, k, 3, heads=2)
    with pytest.raises(DegenerateAttentionError):
        mine_object_mask(torch.randn(2, 7, 4), torch.zeros(2, 7, 4), 3, heads=2)


@pytest.mark.parametrize("q_shape,k_shape,grid_w,kwargs,match", [
    ((1, 2, 7, 4), (1, 2, 7, 4), 3, {}, r"\[L, 1\+N, d\]"),
    ((2, 7, 4), (2, 7, 5), 3, {}, r"\[L, 1\+N, d\]"),
    ((2, 1, 4), (2, 1, 4), 1, {}, "at least one patch"),
    ((2, 7, 4), (2, 7, 4), 4, {}, "grid_w=4"),
    ((2, 7, 4), (2, 7, 4), 3, {"heads": 3}, "heads=3"),
    ((2, 7, 4), (2, 7, 4), 3, {"heads": 0}, "heads=0"),
    ((2, 7, 4), (2, 7, 4), 3, {"topk": 0.1}, "topk"),
    ((2, 7, 4), (2, 7, 4), 3, {"mass": 0.0}, "mass"),
])
def test_bad_input_is_a_one_line_value_error(q_shape, k_shape, grid_w, kwargs, match):
    kwargs = {"heads": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        mine_object_mask(torch.randn(q_shape), torch.randn(k_shape), grid_w, **kwargs)


def test_non_finite_input_is_refused():
    q = torch.randn(2, 7, 4)
    q[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mine_object_mask(q, torch.randn(2, 7, 4), 3, heads=2)
