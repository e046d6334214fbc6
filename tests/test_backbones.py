"""Frozen backbones: weights formats, reference-equal features, errors a user can cause.

No weights are ever downloaded: every test builds a random-init timm model of the right architecture
and writes its weights in the layout under test.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from dist_seg import backbones as B
from dist_seg.backbones import BackboneWeightsError, load_backbone

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=gen)


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - MEAN) / STD


def _random_timm(timm_name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    with torch.no_grad():  # trained-looking biases and norms, not timm's zeros/ones init
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "gamma" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def vits16():
    """A random dino_vits16 and its weights in the official DINO release layout."""
    model = _random_timm("vit_small_patch16_224.dino", seed=1)
    official = {k: v.clone() for k, v in model.state_dict().items()}
    # The release file names tensors like facebookresearch/dino's VisionTransformer: for ViT-S/16 that is
    # exactly timm's naming, with pos_embed at the trained 14x14 grid plus the CLS slot.
    assert official["pos_embed"].shape == (1, 1 + 14 * 14, 384)
    assert not any(k.startswith("head") for k in official)
    return model, official


def _reference_dino_forward(model, x: torch.Tensor) -> torch.Tensor:
    """facebookresearch/dino's prepare_tokens + blocks + norm, written out with the model's tensors."""
    batch, _, height, width = x.shape
    p = model.patch_embed.proj.kernel_size[0]
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(batch, -1, -1), tokens], dim=1)
    pos = model.pos_embed
    n = pos.shape[1] - 1
    h0, w0 = height // p, width // p
    if not (h0 * w0 == n and height == width):
        side = int(math.sqrt(n))
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)
    tokens = tokens + pos
    for block in model.blocks:
        tokens = block(tokens)
    tokens = model.norm(tokens)
    return tokens[:, 1:].reshape(batch, h0, w0, -1).permute(0, 3, 1, 2)


def test_official_release_file_matches_timm_and_reference(vits16, tmp_path):
    model, official = vits16
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(official, path)
    backbone = load_backbone("dino_vits16", weights=path)
    assert backbone.patch_size == 16 and backbone.embed_dim == 384 and backbone.name == "dino_vits16"
    assert len(backbone.weights_id) == 64, "weights_id must be the sha256 of the file"

    images = _images(2, 224, 224)
    with torch.no_grad():
        expected = model.forward_features(_normalised(images))[:, 1:].reshape(2, 14, 14, 384).permute(0, 3, 1, 2)
    got = backbone.patch_features(images)
    assert got.shape == (2, 384, 14, 14)
    assert torch.equal(got, expected), "at the trained size the features must equal timm's bit for bit"

    # Other sizes: the reference interpolation of pos_embed (scale factor with the 0.1 offset).
    images = _images(2, 32, 48, seed=1)
    with torch.no_grad():
        reference = _reference_dino_forward(model, _normalised(images))
    got = backbone.patch_features(images)
    assert got.shape == (2, 384, 2, 3)
    err = (got - reference).abs().max().item()
    assert err < 1e-4, f"features differ from the DINO reference by {err}"


@pytest.mark.parametrize("layout", ["module.backbone.", "backbone."])
def test_training_checkpoint_with_head_loads(vits16, tmp_path, layout):
    _, official = vits16
    teacher = {f"{layout}{k}": v for k, v in official.items()}
    head_prefix = layout.replace("backbone.", "head.")
    teacher.update({f"{head_prefix}mlp.0.weight": torch.randn(2048, 384),
                    f"{head_prefix}last_layer.weight_g": torch.ones(65536, 1)})
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}  # must not be the one picked
    checkpoint = {"teacher": teacher, "student": student, "epoch": 3, "args": argparse.Namespace(arch="vit_small")}
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    loaded = load_backbone("dino_vits16", weights=path).model.state_dict()
    assert loaded.keys() == official.keys()
    for key, value in official.items():
        assert torch.equal(loaded[key], value), f"{key} was not loaded from the teacher weights"


def test_timm_safetensors_file_from_local_hub_cache(vits16, tmp_path, monkeypatch):
    """weights=None finds timm's hub file in the local cache (no network) and loads it."""
    from safetensors.torch import save_file

    _, official = vits16
    snapshot = tmp_path / "hub" / "models--timm--vit_small_patch16_224.dino" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in official.items()}, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    backbone = load_backbone("dino_vits16")
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in official.items()), "cached hub weights were not loaded"
    assert backbone.weights_id == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()


def _no_download(*args, **kwargs):
    raise AssertionError("load_backbone tried to download although allow_download=False")


def test_missing_weights_fail_clearly_without_download(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    try:
        with pytest.raises(BackboneWeightsError) as err:
            load_backbone("dino_vits8")
    finally:
        torch.hub.set_dir(str(tmp_path / "unused"))
    message = str(err.value)
    for needed in ("backbone.weights=PATH", "dino_deitsmall8_pretrain.pth", "backbone.allow_download=true"):
        assert needed in message, f"the error must mention {needed!r}: {message}"
    with pytest.raises(BackboneWeightsError, match="not found"):
        load_backbone("dino_vits8", weights=tmp_path / "nope.pth")


def test_wrong_architecture_fails_with_offending_keys(vits16, tmp_path):
    _, official = vits16
    path = tmp_path / "vits16.pth"
    torch.save(official, path)
    with pytest.raises(BackboneWeightsError, match=r"dino_vits8.*patch_embed\.proj\.weight"):
        load_backbone("dino_vits8", weights=path)
    truncated = {k: v for k, v in official.items() if not k.startswith("blocks.11.")}
    torch.save(truncated, tmp_path / "truncated.pth")
    with pytest.raises(BackboneWeightsError, match=r"missing keys: blocks\.11\."):
        load_backbone("dino_vits16", weights=tmp_path / "truncated.pth")
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(BackboneWeightsError, match="does not hold weights for backbone 'dino_vits16'"):
        load_backbone("dino_vits16", weights=tmp_path / "other.pth")


def test_dinov2_registers_official_layout(tmp_path):
    """A DINOv2-with-registers release file (CLS position inside pos_embed, register_tokens, mask_token)."""
    model = _random_timm("vit_small_patch14_reg4_dinov2.lvd142m", seed=2)
    sd = model.state_dict()
    # timm folds the CLS position into cls_token; the release keeps it in pos_embed[:, 0].
    cls_pos = 0.05 * torch.randn(1, 1, 384)
    official = {k: v for k, v in sd.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    official.update(cls_token=sd["cls_token"] - cls_pos, pos_embed=torch.cat([cls_pos, sd["pos_embed"]], dim=1),
                    register_tokens=sd["reg_token"], mask_token=torch.zeros(1, 384))
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)
    backbone = load_backbone("dinov2_vits14_reg", weights=path)
    assert backbone.patch_size == 14 and backbone.num_prefix_tokens == 5

    images = _images(2, 28, 42)
    x = _normalised(images)
    # dinov2's reference: tokens + interpolated pos_embed (0.1 offset, no antialias), then registers after CLS.
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([official["cls_token"].expand(2, -1, -1), tokens], dim=1)
    grid = official["pos_embed"][:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(2.1 / 37, 3.1 / 37), mode="bicubic", antialias=False)
    pos = torch.cat([official["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, 6, 384)], dim=1)
    tokens = tokens + pos
    tokens = torch.cat([tokens[:, :1], official["register_tokens"].expand(2, -1, -1), tokens[:, 1:]], dim=1)
    with torch.no_grad():
        for block in model.blocks:
            tokens = block(tokens)
        reference = model.norm(tokens)[:, 5:].reshape(2, 2, 3, 384).permute(0, 3, 1, 2)
    err = (backbone.patch_features(images) - reference).abs().max().item()
    assert err < 1e-4, f"DINOv2-reg features differ from the reference by {err}"


def test_fused_attention_equals_unfused():
    backbone = load_backbone("toy")
    attn = [m for m in backbone.modules() if hasattr(m, "fused_attn")]
    assert attn and all(m.fused_attn for m in attn), "fused (scaled_dot_product_attention) must be on"
    unfused = copy.deepcopy(backbone)
    for m in unfused.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    images = _images(2, 64, 48)
    a, b = backbone.patch_features(images), unfused.patch_features(images)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"fused vs unfused differ by {(a - b).abs().max()}"


def test_toy_backbone_contract():
    state = torch.random.get_rng_state()
    backbone = load_backbone("toy")
    assert torch.equal(state, torch.random.get_rng_state()), "building the toy model must not touch the global RNG"
    assert backbone.weights_id == f"random-init-seed{B.TOY_SEED}"
    assert all(not p.requires_grad for p in backbone.parameters()), "the backbone must be frozen"
    backbone.train()
    assert not backbone.training and not backbone.model.training, "train() must keep the backbone in eval mode"

    images = _images(3, 64, 40)
    feats = backbone.patch_features(images)
    assert feats.shape == (3, backbone.embed_dim, 8, 5) and feats.dtype == torch.float32
    assert torch.allclose(feats, backbone.patch_features(images.float() / 255), atol=1e-6), "uint8 vs float input"
    assert torch.equal(feats, load_backbone("toy").patch_features(images)), "the toy model must be deterministic"
    desc = backbone.global_descriptor(images)
    assert torch.allclose(desc, F.normalize(feats.mean(dim=(2, 3)), dim=1), atol=1e-6)
    assert torch.allclose(desc.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        backbone.patch_features(_images(1, 64, 60))
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("dino_vitz8")
    with pytest.raises(ValueError, match="dtype"):
        load_backbone("toy", dtype="int8")


def test_toy_backbone_separates_toy_classes_imperfectly(tmp_path):
    """Raw toy-backbone features cluster the toy dataset's classes clearly above chance, but not perfectly."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    from dist_seg.data.shards import make_loader
    from dist_seg.data.toy import generate_toy

    generate_toy(tmp_path / "toy", num_classes=5, num_train=32, num_val=0, size=64, seed=0)
    loader, _ = make_loader(tmp_path / "toy", "train", batch_size=16, res=64, num_workers=0, shuffle=False,
                            infinite=False)
    backbone = load_backbone("toy")
    feats, labels = [], []
    for batch in loader:
        f = backbone.patch_features(batch["image"])
        lab = batch["label"].reshape(-1, 8, 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(-1, 8, 8, 64)
        feats.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        labels.append(torch.mode(lab, dim=-1).values.reshape(-1))  # majority label of each 8x8 patch
    x, y = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    keep = y >= 0
    x, y = x[keep], y[keep]
    pred = KMeans(5, n_init=4, random_state=0).fit_predict(x)
    confusion = np.zeros((5, 5))
    np.add.at(confusion, (y, pred), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    accuracy = confusion[rows, cols].sum() / confusion.sum()
    majority = np.bincount(y).max() / len(y)
    assert accuracy > majority + 0.2, f"k-means accuracy {accuracy:.3f} barely above chance ({majority:.3f})"
    assert accuracy < 0.9, f"k-means accuracy {accuracy:.3f}: the toy task should not be solved by raw features"


# ------------------------------------------------------------------------ attention q/k, CLS (SPEC §8)
def _tiny_registers_backbone() -> B.Backbone:
    """A DINOv2-style ViT (4 register tokens, CLS position folded into cls_token, LayerScale), patch 14."""
    torch.manual_seed(3)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=4, num_classes=0, reg_tokens=4,
        no_embed_class=True, init_values=1e-1, dynamic_img_size=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model._pos_embed = B.types.MethodType(B._reference_pos_embed, model)
    return B.Backbone(model, name="tiny_reg", weights_id="random")


def _hand_qk(backbone: B.Backbone, images: torch.Tensor):
    """The last block's qkv projection written out: tokens through all earlier blocks, norm1, W x + b."""
    model = backbone.model
    x = model.patch_embed(_normalised(images))
    x = model.norm_pre(model._pos_embed(x))
    for block in model.blocks[:-1]:
        x = block(x)
    last = model.blocks[-1]
    qkv = F.linear(last.norm1(x), last.attn.qkv.weight, last.attn.qkv.bias)
    heads = last.attn.num_heads
    qkv = qkv.reshape(x.shape[0], x.shape[1], 3, heads, -1)
    return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), model.norm(last(x))


@pytest.mark.parametrize("which,height,width", [("toy", 48, 80), ("toy", 64, 64), ("registers", 42, 70)])
def test_last_attention_qk_is_the_last_blocks_qkv_projection(which, height, width):
    backbone = load_backbone("toy") if which == "toy" else _tiny_registers_backbone()
    images = _images(2, height, width, seed=4)
    q, k = backbone.last_attention_qk(images)
    hand_q, hand_k, tokens = _hand_qk(backbone, images)
    p = backbone.patch_size
    heads = backbone.model.blocks[-1].attn.num_heads
    expected_tokens = backbone.num_prefix_tokens + (height // p) * (width // p)
    assert q.shape == k.shape == (2, heads, expected_tokens, backbone.embed_dim // heads)
    assert torch.allclose(q, hand_q, atol=1e-5) and torch.allclose(k, hand_k, atol=1e-5)
    assert not torch.allclose(q, k), "q and k must be different slices of the projection"
    # The hook is gone afterwards and the CLS feature is the first token after the final LayerNorm.
    assert not backbone.model.blocks[-1].attn.qkv._forward_hooks
    assert torch.allclose(backbone.cls_features(images), tokens[:, 0], atol=1e-5)


def test_last_attention_qk_uses_the_reference_position_interpolation():
    backbone = load_backbone("toy")
    images = _images(1, 48, 80, seed=5)
    q, _ = backbone.last_attention_qk(images)
    original = backbone.model._pos_embed
    backbone.model._pos_embed = B.types.MethodType(timm.models.vision_transformer.VisionTransformer._pos_embed,
                                                   backbone.model)
    try:
        q_timm, _ = backbone.last_attention_qk(images)
    finally:
        backbone.model._pos_embed = original
    assert (q - q_timm).abs().max() > 1e-4, "timm's own resampling would give other queries on a 6x10 grid"


def test_last_attention_qk_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load_backbone("toy").last_attention_qk(torch.zeros(1, 3, 50, 64))


# ------------------------------------------------------------------ weight storage in the autocast dtype
def _tiny(kind: str) -> B.Backbone:
    """Small fp32 backbones of each parameter kind: DINO (toy), DINOv2 (LayerScale module, registers),
    DINOv3 (RoPE, masked key bias, gamma layer scales) and DINOv3 with SwiGLU (ViT-S+/16's MLP)."""
    if kind in ("toy", "toy_dinov3"):
        return load_backbone(kind)
    timm_name, name, size = {"dinov2": ("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg", {"img_size": 56}),
                             "dinov3_swiglu": ("vit_small_plus_patch16_dinov3_qkvb", "dinov3_vits16plus",
                                               {"img_size": 64})}[kind]
    torch.manual_seed(5)
    model = timm.create_model(timm_name, pretrained=False, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                              init_values=0.1, **size, **({"dynamic_img_size": True} if kind == "dinov2" else {}))
    with torch.no_grad():  # non-trivial biases, norms and layer scales
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname or "gamma" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return B.Backbone(model, name=name, weights_id="random")


def _autocast_tokens(backbone: B.Backbone, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return backbone.model.forward_features(backbone._prepare(images)).float()


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("kind", ["toy", "toy_dinov3", "dinov2", "dinov3_swiglu"])
def test_matmul_weights_stored_in_bf16_give_the_autocast_features_exactly(kind):
    """Linear/conv weights stored in bf16 change nothing under bf16 autocast (autocast casts them anyway);
    norms, layer scales, tokens, q/v biases and buffers stay float32 and untouched; memory about halves."""
    ref = _tiny(kind)
    low = copy.deepcopy(ref)
    assert B.store_matmul_weights(low.model, torch.bfloat16) is low.model
    matmul = {id(p) for p in B.matmul_parameters(low.model)}
    low_params, ref_params = dict(low.named_parameters()), dict(ref.named_parameters())
    kept = [n for n, p in low_params.items() if id(p) not in matmul]
    assert any("norm" in n for n in kept) and any("token" in n for n in kept)
    assert kind == "toy" or any("gamma" in n for n in kept), "layer scales must stay float32"
    for n, p in low_params.items():
        expected = ref_params[n].to(torch.bfloat16) if id(p) in matmul else ref_params[n]
        assert p.dtype == expected.dtype and torch.equal(p, expected), n
    assert all(b.dtype == torch.float32 for b in low.buffers())
    stored = sum(p.numel() for p in B.matmul_parameters(low.model))
    total = sum(p.numel() for p in low.parameters())
    assert _param_bytes(ref) == 4 * total and _param_bytes(low) == 2 * stored + 4 * (total - stored)
    assert _param_bytes(low) < 0.55 * _param_bytes(ref)

    images = _images(2, 56, 56) if kind == "dinov2" else _images(2, 64, 48)
    a, b = _autocast_tokens(ref, images), _autocast_tokens(low, images)
    assert torch.equal(a, b), f"{kind}: bf16-stored weights change the autocast features by {(a - b).abs().max()}"


def test_backbone_stores_its_weights_in_the_autocast_dtype_where_it_autocasts():
    """The device move stores the matmul weights in bf16 where the backbone autocasts (CUDA; CPU here through
    ``autocast_device_types``), every output equals the fp32 module's under autocast, and fp32 comes back."""
    ref = load_backbone("toy_dinov3")
    backbone = load_backbone("toy_dinov3", dtype="bf16")
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}, "built on the CPU: float32"
    backbone.autocast_device_types = ("cpu",)
    fp32_bytes = _param_bytes(backbone)
    assert backbone.to("cpu") is backbone
    assert {p.dtype for p in B.matmul_parameters(backbone.model)} == {torch.bfloat16}
    assert backbone.model.blocks[0].gamma_1.dtype == torch.float32 and backbone.model.norm.weight.dtype == torch.float32
    assert _param_bytes(backbone) < 0.55 * fp32_bytes
    images = _images(2, 64, 48)
    tokens = _autocast_tokens(ref, images)
    feats = backbone.patch_features(images)
    assert feats.dtype == torch.float32
    assert torch.equal(feats, tokens[:, 5:].reshape(2, 8, 6, -1).permute(0, 3, 1, 2))
    assert torch.equal(backbone.cls_features(images), tokens[:, 0])

    backbone.autocast_dtype = None  # the escape hatch: fp32 weights (values rounded to bf16 by the round trip)
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
    weight = ref.model.blocks[0].attn.qkv.weight
    assert torch.equal(backbone.model.blocks[0].attn.qkv.weight, weight.to(torch.bfloat16).float())
    backbone.autocast_dtype = torch.bfloat16
    assert backbone.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


def test_backbone_keeps_float32_weights_off_the_gpu_and_for_dtype_fp32():
    ref = load_backbone("toy_dinov3")
    images = _images(2, 64, 48)
    # bf16 requested, but CPUs run float32: no move ever gives the CPU bf16 weights.
    backbone = load_backbone("toy_dinov3", dtype="bf16").to("cpu").to(torch.device("cpu")).cpu()
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
    assert torch.equal(backbone.patch_features(images), ref.patch_features(images))
    # dtype=None / fp32 keeps float32 weights even where the backbone would autocast.
    for dtype in (None, "fp32"):
        fp32 = load_backbone("toy_dinov3", dtype=dtype)
        fp32.autocast_device_types = ("cpu", "meta")
        assert {p.dtype for p in fp32.to("cpu").parameters()} == {torch.float32}
        assert torch.equal(fp32.patch_features(images), ref.patch_features(images))
        assert {p.dtype for p in fp32.to("meta").parameters()} == {torch.float32}
