"""DINOv3 backbones: official release files with every buffer, timm files, sizes, normalisation, errors.

The official implementation (facebookresearch/dinov3) is under its own licence and is not vendored:
the tests write official-format state dicts themselves (the release files are plain ``state_dict()``s
of the official ``DinoVisionTransformer``: ``storage_tokens``, ``mask_token``, ``rope_embed.periods``,
per block ``attn.qkv.bias_mask``, ``ls1/ls2.gamma`` and ``mlp.fc1/fc2`` or SwiGLU ``mlp.w1/w2/w3``) and
compare with the official forward written out below from its published equations. The comparison with
the official code itself is tools/dinov3_parity.py (docs/decisions.md, "DINOv3 backbones").
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from dist_seg import backbones as B
from dist_seg.backbones import BackboneWeightsError, load_backbone

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SAT = ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))
# ViT-S/16 and ViT-S+/16 as the official hub constructors build them.
ARCH = {"dinov3_vits16": dict(dim=384, depth=12, heads=6, hidden=1536, swiglu=False),
        "dinov3_vits16plus": dict(dim=384, depth=12, heads=6, hidden=1536, swiglu=True)}


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=gen)


def _normalised(images: torch.Tensor, stats=IMAGENET) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    return (images.float() / 255 - mean) / std


def official_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random release-format state dict with non-trivial values in every tensor.

    The key-bias mask has the released pattern (q and v biases kept, the key bias zeroed) while the key
    bias itself is non-zero, as in the released files; the RoPE periods are the official formula
    ``100 ** (2 i / (D_head / 2))`` rounded to bf16 (as stored in the releases) and then perturbed.
    """
    a = ARCH[name]
    dim, hidden = a["dim"], a["hidden"]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=gen)

    head = dim // a["heads"]
    periods = (100.0 ** (2 * torch.arange(head // 4) / (head // 2))).bfloat16().float()
    state = {"cls_token": rnd(1, 1, dim, scale=0.5), "storage_tokens": rnd(1, 4, dim, scale=0.5),
             "mask_token": rnd(1, dim), "patch_embed.proj.weight": rnd(dim, 3, 16, 16, scale=0.02),
             "patch_embed.proj.bias": rnd(dim, scale=0.2),
             "rope_embed.periods": periods * (1 + 0.1 * torch.rand(head // 4, generator=gen)),
             "norm.weight": rnd(dim, scale=0.2, offset=1.0), "norm.bias": rnd(dim, scale=0.2)}
    mask = torch.ones(3 * dim)
    mask[dim: 2 * dim] = 0
    for i in range(a["depth"]):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": rnd(dim, scale=0.2, offset=1.0), p + "norm1.bias": rnd(dim, scale=0.2),
            p + "attn.qkv.weight": rnd(3 * dim, dim), p + "attn.qkv.bias": rnd(3 * dim, scale=0.3),
            p + "attn.qkv.bias_mask": mask.clone(),
            p + "attn.proj.weight": rnd(dim, dim), p + "attn.proj.bias": rnd(dim, scale=0.2),
            p + "ls1.gamma": rnd(dim, scale=0.1, offset=0.3),
            p + "norm2.weight": rnd(dim, scale=0.2, offset=1.0), p + "norm2.bias": rnd(dim, scale=0.2),
            p + "ls2.gamma": rnd(dim, scale=0.1, offset=0.3),
        })
        if a["swiglu"]:
            # Official SwiGLUFFN of ViT-S+ (ffn_ratio 6): int(6 * 384 * 2 / 3) = 1536, a multiple of 8.
            swi = 1536
            state.update({p + "mlp.w1.weight": rnd(swi, dim), p + "mlp.w1.bias": rnd(swi, scale=0.2),
                          p + "mlp.w2.weight": rnd(swi, dim), p + "mlp.w2.bias": rnd(swi, scale=0.2),
                          p + "mlp.w3.weight": rnd(dim, swi), p + "mlp.w3.bias": rnd(dim, scale=0.2)})
        else:
            state.update({p + "mlp.fc1.weight": rnd(hidden, dim), p + "mlp.fc1.bias": rnd(hidden, scale=0.2),
                          p + "mlp.fc2.weight": rnd(dim, hidden), p + "mlp.fc2.bias": rnd(dim, scale=0.2)})
    return state


def _rope(periods: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official RopePositionEmbedding (eval, normalize_coords='separate'): sin/cos ``[h*w, D_head]``."""
    ch = torch.arange(0.5, h) / h
    cw = torch.arange(0.5, w) / w
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1) * 2 - 1
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    return angles.sin(), angles.cos()


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def official_patch_tokens(state: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """The official ``forward_features(x)["x_norm_patchtokens"]`` (eval mode) as ``[B, C, h, w]``."""
    a = ARCH[name]
    dim, heads = a["dim"], a["heads"]
    batch, _, height, width = x.shape
    h, w = height // 16, width // 16
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    tokens = tokens.flatten(2).transpose(1, 2)
    cls = state["cls_token"] + 0 * state["mask_token"]
    tokens = torch.cat([cls.expand(batch, -1, -1), state["storage_tokens"].expand(batch, -1, -1), tokens], dim=1)
    sin, cos = _rope(state["rope_embed.periods"].float(), h, w)
    n = tokens.shape[1]
    for i in range(a["depth"]):
        p = f"blocks.{i}."
        y = F.layer_norm(tokens, (dim,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-5)
        bias = state[p + "attn.qkv.bias"] * state[p + "attn.qkv.bias_mask"]  # LinearKMaskedBias
        qkv = F.linear(y, state[p + "attn.qkv.weight"], bias).reshape(batch, n, 3, heads, dim // heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        q = torch.cat([q[:, :, :5], _rotate(q[:, :, 5:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :5], _rotate(k[:, :, 5:], sin, cos)], dim=2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, n, dim)
        y = F.linear(y, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        tokens = tokens + state[p + "ls1.gamma"] * y
        y = F.layer_norm(tokens, (dim,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-5)
        if a["swiglu"]:
            y = F.silu(F.linear(y, state[p + "mlp.w1.weight"], state[p + "mlp.w1.bias"])) * \
                F.linear(y, state[p + "mlp.w2.weight"], state[p + "mlp.w2.bias"])
            y = F.linear(y, state[p + "mlp.w3.weight"], state[p + "mlp.w3.bias"])
        else:
            y = F.gelu(F.linear(y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
            y = F.linear(y, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        tokens = tokens + state[p + "ls2.gamma"] * y
    out = F.layer_norm(tokens, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-5)[:, 5:]
    return out.reshape(batch, h, w, dim).permute(0, 3, 1, 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def vits16(tmp_path_factory):
    state = official_state("dinov3_vits16")
    path = tmp_path_factory.mktemp("dinov3") / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(state, path)
    return state, path, load_backbone("dinov3_vits16", weights=path)


@pytest.mark.parametrize("height,width", [(32, 32), (48, 32), (32, 64)])
def test_official_release_file_equals_official_forward(vits16, height, width):
    state, _, backbone = vits16
    assert (backbone.patch_size, backbone.embed_dim, backbone.num_prefix_tokens) == (16, 384, 5)
    assert len(backbone.weights_id) == 64
    images = _images(2, height, width)
    got = backbone.patch_features(images)
    assert got.shape == (2, 384, height // 16, width // 16)
    with torch.no_grad():
        ref = official_patch_tokens(state, "dinov3_vits16", _normalised(images))
    assert _rel(got, ref) < 1e-4, f"{height}x{width}: differs from the official forward by {_rel(got, ref)}"


def test_swiglu_release_file_equals_official_forward(tmp_path):
    state = official_state("dinov3_vits16plus", seed=1)
    torch.save(state, tmp_path / "splus.pth")
    backbone = load_backbone("dinov3_vits16plus", weights=tmp_path / "splus.pth")
    images = _images(1, 48, 32, seed=2)
    with torch.no_grad():
        ref = official_patch_tokens(state, "dinov3_vits16plus", _normalised(images))
    assert _rel(backbone.patch_features(images), ref) < 1e-4


def _features_with(state: dict, tmp_path, images, tag: str) -> torch.Tensor:
    torch.save(state, tmp_path / f"{tag}.pth")
    return load_backbone("dinov3_vits16", weights=tmp_path / f"{tag}.pth").patch_features(images)


def test_key_bias_mask_is_applied(vits16, tmp_path):
    """The released mask zeroes the key bias: a different key bias changes nothing; a mask that keeps it does."""
    state, _, backbone = vits16
    images = _images(1, 32, 48, seed=3)
    base = backbone.patch_features(images)
    other_k = dict(state)
    for i in range(12):
        bias = state[f"blocks.{i}.attn.qkv.bias"].clone()
        bias[384:768] = 5.0 * torch.randn(384)
        other_k[f"blocks.{i}.attn.qkv.bias"] = bias
    assert torch.allclose(_features_with(other_k, tmp_path, images, "other_k"), base, atol=1e-5), \
        "the key bias is masked out by the official model: it must not change the features"
    keep_all = dict(state)
    for i in range(12):
        keep_all[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * 384)
    got = _features_with(keep_all, tmp_path, images, "keep_all")
    assert _rel(got, base) > 1e-3, "a mask that keeps the key bias must change the features (RoPE rotates keys)"
    with torch.no_grad():
        ref = official_patch_tokens(keep_all, "dinov3_vits16", _normalised(images))
    assert _rel(got, ref) < 1e-4, "any mask pattern must give the official result"
    half_q = dict(state)
    for i in range(12):
        half_q[f"blocks.{i}.attn.qkv.bias_mask"] = state[f"blocks.{i}.attn.qkv.bias_mask"].clone()
        half_q[f"blocks.{i}.attn.qkv.bias_mask"][:192] = 0
    got = _features_with(half_q, tmp_path, images, "half_q")
    with torch.no_grad():
        ref = official_patch_tokens(half_q, "dinov3_vits16", _normalised(images))
    assert _rel(got, base) > 1e-3 and _rel(got, ref) < 1e-4, "the mask multiplies the q bias as well"


def test_rope_periods_of_the_file_are_used(vits16, tmp_path):
    state, _, backbone = vits16
    images = _images(1, 48, 48, seed=4)
    changed = dict(state, **{"rope_embed.periods": state["rope_embed.periods"] * 1.5})
    got = _features_with(changed, tmp_path, images, "periods")
    assert _rel(got, backbone.patch_features(images)) > 1e-3, "other RoPE periods must change the features"
    with torch.no_grad():
        ref = official_patch_tokens(changed, "dinov3_vits16", _normalised(images))
    assert _rel(got, ref) < 1e-4
    # The periods survive moving the module (timm recomputes its own periods when they are cast).
    moved = load_backbone("dinov3_vits16", weights=tmp_path / "periods.pth").to("cpu")
    assert torch.equal(moved.model.rope.periods, changed["rope_embed.periods"])


def test_local_cls_norm_and_mask_token_do_not_touch_patch_features(vits16, tmp_path):
    """SAT ViT-L and ViT-7B files carry ``local_cls_norm`` (training-only, local crops' CLS): ignored."""
    state, _, backbone = vits16
    images = _images(1, 32, 32, seed=5)
    extra = dict(state, **{"local_cls_norm.weight": torch.randn(384), "local_cls_norm.bias": torch.randn(384)})
    assert torch.equal(_features_with(extra, tmp_path, images, "local"), backbone.patch_features(images))


def test_official_file_without_a_buffer_is_refused(vits16, tmp_path):
    state, _, _ = vits16
    no_mask = {k: v for k, v in state.items() if not k.endswith("bias_mask")}
    torch.save(no_mask, tmp_path / "no_mask.pth")
    with pytest.raises(BackboneWeightsError, match=r"missing keys: blocks\.0\.attn\.qkv\.bias_mask"):
        load_backbone("dinov3_vits16", weights=tmp_path / "no_mask.pth")
    no_periods = {k: v for k, v in state.items() if k != "rope_embed.periods"}
    torch.save(no_periods, tmp_path / "no_periods.pth")
    with pytest.raises(BackboneWeightsError, match=r"missing keys: rope_embed\.periods"):
        load_backbone("dinov3_vits16", weights=tmp_path / "no_periods.pth")


def test_file_of_another_architecture_is_the_one_line_error(vits16, tmp_path):
    _, path, _ = vits16
    with pytest.raises(BackboneWeightsError, match=r"does not hold weights for backbone 'dinov3_vitb16'.*shape") as err:
        load_backbone("dinov3_vitb16", weights=path)
    assert "\n" not in str(err.value)
    with pytest.raises(BackboneWeightsError, match=r"dinov3_vits16plus.*missing keys: blocks\.0\.mlp\.fc1_g"):
        load_backbone("dinov3_vits16plus", weights=path)
    with pytest.raises(BackboneWeightsError, match=r"dino_vits16.*(missing|unexpected) keys"):
        load_backbone("dino_vits16", weights=path)
    torch.save({"embeddings.cls_token": torch.zeros(1, 1, 384), "embeddings.patch_embeddings.weight":
                torch.zeros(384, 3, 16, 16), "layer.0.attention.q_proj.weight": torch.zeros(384, 384)},
               tmp_path / "transformers.pth")
    with pytest.raises(BackboneWeightsError, match=r"transformers weights.*dinov3_vits16_pretrain_lvd1689m"):
        load_backbone("dinov3_vits16", weights=tmp_path / "transformers.pth")
    dinov2 = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0).state_dict()
    torch.save(dinov2, tmp_path / "dinov2.pth")
    with pytest.raises(BackboneWeightsError, match=r"dinov3_vits16.*patch_embed\.proj\.weight"):
        load_backbone("dinov3_vits16", weights=tmp_path / "dinov2.pth")


def _no_download(*args, **kwargs):
    raise AssertionError("load_backbone tried to download although allow_download=False")


def test_timm_file_from_the_local_hub_cache(tmp_path, monkeypatch):
    """timm's own file (no q/v biases, timm key names) found in the hub cache equals timm's model."""
    import huggingface_hub
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "gamma" in name:
                p.add_(0.1 * torch.randn_like(p))
    snapshot = tmp_path / "hub" / "models--timm--vit_small_patch16_dinov3.lvd1689m" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    backbone = load_backbone("dinov3_vits16")
    assert backbone.model.blocks[0].attn.q_bias is None, "a file without q/v biases gets timm's variant without"
    images = _images(2, 32, 48)
    with torch.no_grad():
        expected = model.forward_features(_normalised(images))[:, 5:].reshape(2, 2, 3, 384).permute(0, 3, 1, 2)
    assert torch.allclose(backbone.patch_features(images), expected, atol=1e-5)


def test_missing_dinov3_weights_name_the_release_file(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    try:
        with pytest.raises(BackboneWeightsError) as err:
            load_backbone("dinov3_vitl16_sat")
    finally:
        torch.hub.set_dir(str(tmp_path / "unused"))
    message = str(err.value)
    for needed in ("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", B.DINOV3_DOWNLOADS, "backbone.weights=PATH",
                   "timm/vit_large_patch16_dinov3_qkvb.sat493m", "backbone.allow_download=true"):
        assert needed in message, f"the error must mention {needed!r}: {message}"


def test_release_file_in_the_torch_hub_folder_is_found(vits16, tmp_path, monkeypatch):
    """The official torch.hub loaders leave the release file in <hub>/checkpoints: found without a path."""
    import huggingface_hub

    state, path, backbone = vits16
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    (tmp_path / "torch_hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch_hub" / "checkpoints" / path.name).symlink_to(path)
    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    try:
        found = load_backbone("dinov3_vits16")
    finally:
        torch.hub.set_dir(str(tmp_path / "unused"))
    images = _images(1, 32, 32)
    assert found.weights_id == backbone.weights_id
    assert torch.equal(found.patch_features(images), backbone.patch_features(images))


def test_every_dinov3_name_has_its_normalisation():
    for name in B._DINOV3:
        spec = B.BACKBONES[name]
        assert (spec.mean, spec.std) == (SAT if name.endswith("_sat") else IMAGENET), name
        assert timm.models.get_pretrained_cfg(spec.timm_name) is not None, spec.timm_name
    # The normalisation belongs to the name: the same network under a SAT name sees SAT-normalised input.
    toy = load_backbone("toy_dinov3")
    sat = B.Backbone(toy.model, name="dinov3_vitl16_sat", weights_id="x")
    images = _images(1, 32, 48, seed=6)
    with torch.no_grad():
        tokens = toy.model.forward_features(_normalised(images, SAT))[:, 5:]
    assert torch.allclose(sat.patch_features(images), tokens.reshape(1, 4, 6, 64).permute(0, 3, 1, 2), atol=1e-6)
    assert not torch.allclose(sat.patch_features(images), toy.patch_features(images), atol=1e-3)


def test_toy_dinov3_contract():
    state = torch.random.get_rng_state()
    backbone = load_backbone("toy_dinov3")
    assert torch.equal(state, torch.random.get_rng_state()), "building the toy model must not touch the global RNG"
    assert isinstance(backbone.model, timm.models.eva.Eva) and backbone.num_prefix_tokens == 5
    assert backbone.patch_size == 8 and backbone.weights_id == f"random-init-seed{B.TOY_SEED}"
    images = _images(2, 64, 40)
    feats = backbone.patch_features(images)
    assert feats.shape == (2, 64, 8, 5)
    assert torch.equal(feats, load_backbone("toy_dinov3").patch_features(images)), "deterministic"
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        backbone.patch_features(_images(1, 64, 60))


def test_last_attention_qk_of_a_dinov3_model():
    """q/k of the last block: its qkv projection of norm1(tokens) with the q/v biases (key bias masked)."""
    backbone = load_backbone("toy_dinov3")
    model = backbone.model
    images = _images(2, 48, 64, seed=7)
    q, k = backbone.last_attention_qk(images)
    x, rope = model._pos_embed(model.patch_embed(_normalised(images)))
    for block in model.blocks[:-1]:
        x = block(x, rope=rope)
    last = model.blocks[-1]
    bias = torch.cat((last.attn.q_bias, torch.zeros(64), last.attn.v_bias))
    qkv = F.linear(last.norm1(x), last.attn.qkv.weight, bias).reshape(2, x.shape[1], 3, 2, 32)
    assert q.shape == (2, 2, 5 + 6 * 8, 32)
    assert torch.allclose(q, qkv[:, :, 0].transpose(1, 2), atol=1e-5)
    assert torch.allclose(k, qkv[:, :, 1].transpose(1, 2), atol=1e-5)
    assert not torch.allclose(q, k)


def test_legacy_format_files_load_like_zip_files(vits16, tmp_path):
    """Zip-format files (torch.save's default) are read memory-mapped; the pre-1.6 format cannot be and loads too."""
    state, _, backbone = vits16
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = load_backbone("dinov3_vits16", weights=tmp_path / "legacy.pth")
    images = _images(1, 32, 32)
    assert torch.equal(legacy.patch_features(images), backbone.patch_features(images))
