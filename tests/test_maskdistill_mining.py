"""SPEC §8.1 object-mask mining: the patch-grid rule, its parity with the official code, and errors.

The parity test reads the official ``mask_generator`` (``gen_masks.py``) and ``threshold_attention``
(``utils/util.py``) from a local checkout of wvangansbeke/MaskDistill named by ``$MASKDISTILL_OFFICIAL``
and skips without it. Only those two function definitions are taken from the files (with ``ast``), so the
checkout's other imports (its vendored timm, detectron2 helpers, tqdm, termcolor) are not needed. The
hand-built cases never skip.
"""

from __future__ import annotations

import ast
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

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


# ------------------------------------------------------------------------------------ image wrapper
class _DesignedBackbone(torch.nn.Module):
    """A stand-in ViT whose last-block q/k are hand-built (patch 8, one prefix token): it lets the wrapper's
    resize / pad / upsample / crop steps be checked against a known grid mask. It records its input."""

    patch_size = 8
    num_prefix_tokens = 1

    def __init__(self, grid_mask: np.ndarray) -> None:
        super().__init__()
        self.grid_mask = grid_mask
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.inputs: list[torch.Tensor] = []

    def last_attention_qk(self, images):
        self.inputs.append(images)
        grid_h, grid_w = self.grid_mask.shape
        assert images.shape[-2:] == (grid_h * 8, grid_w * 8)
        obj = self.grid_mask.reshape(-1)
        keys = np.where(obj[:, None], [1.0, 0.0], [-1.0, 0.0])
        q, k = _qk_from(np.where(obj, 2.0, 0.0), keys)
        return q[None].float(), k[None].float()


def test_image_wrapper_resizes_pads_upsamples_and_crops():
    from dist_seg.maskdistill.mining import mine_image_mask

    grid = np.zeros((4, 8), bool)
    grid[0:2, 0:2] = True  # resized-pixel rows 0-15, cols 0-15: original rows 0-7, cols 0-7.5
    backbone = _DesignedBackbone(grid)
    image = np.random.default_rng(0).integers(0, 256, (16, 30, 3), dtype=np.uint8)
    mask = mine_image_mask(backbone, image, heads=1, topk=0.1, mass=0.5, short_side=32)
    assert mask.shape == (16, 30) and mask.dtype == bool
    assert mask[:8, :7].all(), "the object's pixels"
    assert not mask[10:].any() and not mask[:, 10:].any(), "bicubic dilation is 1-2 px at most"
    # Input: short side 32 (16x30 -> 32x60, PIL bilinear), padded right to 64 with values that normalise to 0.
    (x,) = backbone.inputs
    assert x.shape == (1, 3, 32, 64)
    normalised = (x - backbone.mean) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.equal(normalised[..., 60:], torch.zeros_like(normalised[..., 60:]))
    expected = np.asarray(Image.fromarray(image).resize((60, 32), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(x[0, :, :, :60].permute(1, 2, 0).numpy(), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------- stage
SIZES = ((20, 28), (24, 24), (28, 20), (17, 33))


def _dataset(root: Path, num: int = 9) -> Path:
    from dist_seg.data.manifest import update_split
    from dist_seg.data.shards import Sample, write_split

    rng = np.random.default_rng(1)
    samples = []
    for i in range(num):
        h, w = SIZES[i % len(SIZES)]
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[h // 4: h // 2, w // 4: w // 2] = (250, 20, 20)  # a flat block, so masks are not pure noise
        samples.append(Sample(image=image, label=None, source=f"img-{i}"))
    info = write_split(samples, root, "train", samples_per_shard=4, image_format="png")
    update_split(root, "train", info, name="unit", num_classes=3, class_names=None, colors=None)
    return root


def _cfg(root: Path, work: Path, **mine):
    from dist_seg.config import RunConfig

    cfg = RunConfig()
    cfg.data.root = str(root)
    cfg.maskdistill.work_dir = str(work)
    cfg.maskdistill.mine.backbone = "toy"
    cfg.maskdistill.mine.short_side = 64
    cfg.maskdistill.mine.chunk_size = 3
    cfg.maskdistill.mine.heads = 2  # the toy ViT has 2 heads
    for key, value in mine.items():
        setattr(cfg.maskdistill.mine, key, value)
    return cfg


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """A tiny dataset and its masks mined in one uninterrupted 1-process run."""
    from dist_seg.maskdistill.mining import mine_masks

    base = tmp_path_factory.mktemp("mine")
    root = _dataset(base / "data")
    path = mine_masks(_cfg(root, base / "work"), split="train")
    return root, path, json.loads(path.read_text())


def test_masks_file_holds_one_rle_mask_per_image(mined):
    from pycocotools import mask as mask_utils

    from dist_seg.backbones import load_backbone
    from dist_seg.data.shards import IndexedShards
    from dist_seg.maskdistill.mining import mine_image_mask

    root, path, data = mined
    assert path.name == "masks_train.json"
    assert [im["id"] for im in data["images"]] == list(range(9))
    assert [(im["height"], im["width"]) for im in data["images"]] == [SIZES[i % 4] for i in range(9)]
    assert len(data["annotations"]) == 9 and data["info"]["empty_image_ids"] == []
    info = data["info"]
    assert (info["backbone"], info["heads"], info["topk"], info["mass"], info["short_side"]) == ("toy", 2, 0.4, 0.5, 64)
    assert info["weights_id"] == "random-init-seed0" and info["num_images"] == 9 and info["dataset_fingerprint"]
    records = IndexedShards(root, "train", res=None)
    backbone = load_backbone("toy")
    for ann in data["annotations"]:
        image = records[ann["image_id"]]["image"]
        assert tuple(image.shape[1:]) == SIZES[ann["image_id"] % 4], "records are read at full resolution"
        rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        decoded = mask_utils.decode(rle).astype(bool)
        np.testing.assert_array_equal(decoded, mine_image_mask(backbone, image, heads=2, short_side=64))
        ys, xs = np.nonzero(decoded)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["area"] == decoded.sum() > 0 and ann["category_id"] == 1
    records.close()


def test_interrupted_run_resumes_to_the_same_file(mined, tmp_path):
    from dist_seg.maskdistill.mining import mine_masks

    root, _, data = mined
    cfg = _cfg(root, tmp_path / "work")
    assert mine_masks(cfg, split="train", stop_after_chunks=2) is None
    parts = sorted((tmp_path / "work" / ".masks_train.parts").glob("part-*.json"))
    assert len(parts) == 2 and not (tmp_path / "work" / "masks_train.json").exists()
    path = mine_masks(cfg, split="train")
    assert json.loads(path.read_text()) == data
    assert not (tmp_path / "work" / ".masks_train.parts").exists()


def test_finished_file_is_kept_and_another_config_is_refused(mined, tmp_path):
    import shutil

    from dist_seg.maskdistill.files import MaskDistillFileError
    from dist_seg.maskdistill.mining import mine_masks

    root, path, data = mined
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(path, work / path.name)
    before = (work / path.name).stat().st_mtime_ns
    assert mine_masks(_cfg(root, work), split="train") == work / path.name
    assert (work / path.name).stat().st_mtime_ns == before, "a finished valid file is not rewritten"
    with pytest.raises(MaskDistillFileError, match=r"heads=2 \(this run: 1\).*--overwrite"):
        mine_masks(_cfg(root, work, heads=1), split="train")
    mine_masks(_cfg(root, work, heads=1), split="train", overwrite=True)
    assert json.loads((work / path.name).read_text())["info"]["heads"] == 1
    with pytest.raises(ValueError, match="set maskdistill.mine.heads to 1..2"):
        mine_masks(_cfg(root, work, heads=5), split="train")


def _mine_on_rank(rank, world, root, work, work_interrupted):
    from dist_seg.maskdistill.mining import mine_masks

    mine_masks(_cfg(Path(root), Path(work)), split="train")
    assert mine_masks(_cfg(Path(root), Path(work_interrupted)), split="train", stop_after_chunks=1) is None
    return rank


@pytest.mark.slow
def test_two_ranks_write_the_same_file_as_one(mined, tmp_path):
    from dist_seg.maskdistill.mining import mine_masks
    from tests.dist_utils import run_distributed

    root, _, data = mined
    run_distributed(_mine_on_rank, 2, str(root), str(tmp_path / "work"), str(tmp_path / "interrupted"))
    assert json.loads((tmp_path / "work" / "masks_train.json").read_text()) == data
    # 3 chunks: the interrupted 2-rank run saved chunks 0 (rank 0) and 1 (rank 1); one process finishes it.
    parts = sorted(p.name for p in (tmp_path / "interrupted" / ".masks_train.parts").iterdir())
    assert parts == ["part-000000.json", "part-000001.json"]
    path = mine_masks(_cfg(root, tmp_path / "interrupted"), split="train")
    assert json.loads(path.read_text()) == data


def test_masks_command_line(mined, tmp_path, capsys):
    from dist_seg.cli import main

    root, _, data = mined
    args = ["masks", "stego_toy", f"data.root={root}", f"maskdistill.work_dir={tmp_path}",
            "maskdistill.mine.backbone=toy", "maskdistill.mine.short_side=64", "maskdistill.mine.chunk_size=5",
            "maskdistill.mine.heads=2"]
    assert main(args) == 0
    assert "9 object masks for 9 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "masks_train.json").read_text()) == data, "chunking does not change the file"
    assert main([*args, "maskdistill.mine.topk=0.3"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another configuration" in errors[0] and "--overwrite" in errors[0]
    assert main(["masks", "stego_toy", f"data.root={tmp_path / 'nothing'}"]) == 2
    assert "dist-seg prepare" in capsys.readouterr().err


def test_images_without_attention_get_no_mask_and_are_counted(mined, tmp_path, monkeypatch):
    from dist_seg import backbones
    from dist_seg.maskdistill.mining import mine_masks

    real_load = backbones.load_backbone

    def zero_attention(name, **kwargs):  # the toy ViT with its last qkv projection zeroed: q = k = 0
        backbone = real_load(name, **kwargs)
        backbone.model.blocks[-1].attn.qkv.weight.data.zero_()
        backbone.model.blocks[-1].attn.qkv.bias.data.zero_()
        return backbone

    monkeypatch.setattr(backbones, "load_backbone", zero_attention)
    root, _, _ = mined
    data = json.loads(mine_masks(_cfg(root, tmp_path), split="train").read_text())
    assert data["annotations"] == [] and data["info"]["empty_image_ids"] == list(range(9))
    assert len(data["images"]) == 9 and data["info"]["num_annotations"] == 0
