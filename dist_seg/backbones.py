"""Frozen DINO / DINOv2 / DINOv3 ViT backbones (SPEC §1).

A backbone turns images into patch features ``[B, C, H/p, W/p]``: the final block's output tokens after
the final LayerNorm, with the CLS and register tokens dropped. Models are built with timm and never
downloaded unless the caller allows it. Weights come from

* a local file: an official DINO / DINOv2 / DINOv3 release file (plain state dict), a DINO training
  checkpoint (``{"teacher": {"module.backbone.*": ...}, ...}``) or a timm / Hugging Face file
  (``.safetensors``, ``.bin``, ``.pth``);
* otherwise the local Hugging Face hub cache (timm's ``timm/<model>`` repositories) or the torch hub
  checkpoint folder, where a previous download may have left the file.

Every file goes through timm's own ``checkpoint_filter_fn`` (the function timm's pretrained loader
applies), which converts DINOv2 / DINOv3 key names and resamples ``pos_embed`` when the trained grid differs.

DINOv3 (timm's ``Eva`` with ``rope_type='dinov3'``): timm's filter drops two buffers of the official
release files that the official model uses, so they are applied around it (:func:`_dinov3_buffers`):
the attention's ``qkv.bias_mask`` (the official ``LinearKMaskedBias`` multiplies the qkv bias by it,
which zeroes the key bias) and the RoPE ``rope_embed.periods`` (timm recomputes them from the base;
the official model uses the stored ones). ``local_cls_norm`` (SAT ViT-L, ViT-7B) only ever normalises
local-crop CLS tokens in training, so patch features never use it; timm's filter drops it too. Each
DINOv3 name has two timm architectures: with q/v biases (``*_qkvb``, what the official files hold) and
without (timm's files of the models whose biases ended up zero); the file decides which is built.

At input sizes other than the trained one, the position embedding is interpolated exactly as the
reference implementations do (facebookresearch/dino and dinov2: bicubic with ``scale_factor`` =
``(n + 0.1) / M`` and no antialiasing), not with timm's resampling (``size=n``, antialiased), which
differs by up to ~1e-2 in the features. STEGO evaluates at 320×320 with the reference code, so parity
needs the reference interpolation.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import types
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import eva as timm_eva
from timm.models._manipulate import reinit_non_persistent_buffers
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from dist_seg.config import ConfigError

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneWeightsError",
    "backbone_dtype",
    "gap_descriptor",
    "load_backbone",
    "matmul_parameters",
    "resolve_dtype",
    "store_matmul_weights",
]

TOY_SEED = 0


@dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """A named backbone: the timm architecture (with its pretrained tag) it is built from.

    Attributes:
        timm_name: timm model with pretrained tag (for DINOv3: the architecture with q/v biases).
        mean, std: the input normalisation the weights were trained with (part of the backbone, so no
            recipe can pair other statistics with these weights).
        official_file: file name of the authors' release, named in the missing-weights error (for models
            whose timm config has no download URL: DINOv3 files come from Meta's request form).
        timm_name_no_qkv_bias: the same network without q/v biases, built for timm files that hold none.
    """

    timm_name: str
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    official_file: Optional[str] = None
    timm_name_no_qkv_bias: Optional[str] = None

    @property
    def dinov3(self) -> bool:
        return "_dinov3" in self.timm_name


# SAT-493M (satellite) normalisation of the DINOv3 SAT models (timm's and the official configs).
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)
# name -> (timm architecture, pretrained tag, whether it has a q/v-bias variant, official file).
_DINOV3 = {
    "dinov3_vits16": ("vit_small_patch16_dinov3", "lvd1689m", True, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
    "dinov3_vits16plus": ("vit_small_plus_patch16_dinov3", "lvd1689m", True,
                          "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
    "dinov3_vitb16": ("vit_base_patch16_dinov3", "lvd1689m", True, "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
    "dinov3_vitl16": ("vit_large_patch16_dinov3", "lvd1689m", True, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
    "dinov3_vith16plus": ("vit_huge_plus_patch16_dinov3", "lvd1689m", True,
                          "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
    # ViT-7B has no qkv bias at all (official qkv_bias=False).
    "dinov3_vit7b16": ("vit_7b_patch16_dinov3", "lvd1689m", False, "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"),
    "dinov3_vitl16_sat": ("vit_large_patch16_dinov3", "sat493m", True, "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"),
    "dinov3_vit7b16_sat": ("vit_7b_patch16_dinov3", "sat493m", False, "dinov3_vit7b16_pretrain_sat493m-a6675841.pth"),
}


def _dinov3_spec(arch: str, tag: str, qkv_bias: bool, official_file: str) -> BackboneSpec:
    stats = dict(mean=SAT_MEAN, std=SAT_STD) if tag == "sat493m" else {}
    if qkv_bias:
        return BackboneSpec(timm_name=f"{arch}_qkvb.{tag}", timm_name_no_qkv_bias=f"{arch}.{tag}",
                            official_file=official_file, **stats)
    return BackboneSpec(timm_name=f"{arch}.{tag}", official_file=official_file, **stats)


BACKBONES: dict[str, BackboneSpec] = {
    "dino_vits8": BackboneSpec(timm_name="vit_small_patch8_224.dino"),
    "dino_vits16": BackboneSpec(timm_name="vit_small_patch16_224.dino"),
    "dino_vitb8": BackboneSpec(timm_name="vit_base_patch8_224.dino"),
    "dino_vitb16": BackboneSpec(timm_name="vit_base_patch16_224.dino"),
    **{
        f"dinov2_vit{s}14": BackboneSpec(timm_name=f"vit_{size}_patch14_dinov2.lvd142m")
        for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    },
    **{
        f"dinov2_vit{s}14_reg": BackboneSpec(timm_name=f"vit_{size}_patch14_reg4_dinov2.lvd142m")
        for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    },
    **{name: _dinov3_spec(*args) for name, args in _DINOV3.items()},
    # A small random-init ViT for tests and the toy demo (patch 8, 64 channels, 2 blocks).
    "toy": BackboneSpec(timm_name="vit_toy"),
    # The same size with DINOv3's architecture (RoPE, 4 registers, layer scale, masked key bias), patch 8 so
    # that the toy recipes' 64-px crops give the toy model's 8x8 grid.
    "toy_dinov3": BackboneSpec(timm_name="vit_small_patch16_dinov3_qkvb"),
}
# Random-init models for tests and demos: built from a fixed seed, never loaded from a file.
_TOY = {"toy", "toy_dinov3"}

# Hub files timm publishes for its models, in the order timm's own loader tries them.
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
# Keys of training checkpoints that hold the network (DINO saves "teacher" and "student").
_CHECKPOINT_KEYS = ("teacher", "student", "model", "state_dict", "model_ema", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")


class BackboneWeightsError(ConfigError, RuntimeError):
    """Weights are missing, unreadable or belong to another architecture.

    A :class:`~dist_seg.config.ConfigError` (the fix is a config key, named in the message), so every stage
    answers it with one ``error:`` line; still a ``RuntimeError`` for callers that caught it as one.
    """


# ------------------------------------------------------------------------------------------ helpers
def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """Map ``None`` / ``"no"`` / ``"fp32"`` / ``"bf16"`` / ``"fp16"`` / a torch dtype to an autocast dtype.

    Returns:
        ``None`` for full precision, else ``torch.bfloat16`` or ``torch.float16``.
    """
    if dtype is None or dtype in ("no", "fp32", "float32", torch.float32):
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float16):
        return dtype
    if isinstance(dtype, str) and dtype in table:
        return table[dtype]
    raise ValueError(f"dtype must be one of None, 'no', 'fp32', 'bf16', 'fp16' (or a torch dtype), got {dtype!r}")


def backbone_dtype(dtype: str = "auto", mixed_precision: str = "no") -> Optional[torch.dtype]:
    """The frozen backbone's autocast dtype on CUDA for ``backbone.dtype`` and ``train.mixed_precision``.

    ``"auto"`` (the default) follows ``mixed_precision`` when it is ``bf16``/``fp16``, and otherwise picks
    bf16 wherever this process sees a GPU that supports it: the backbone's forward dominates an online step,
    bf16 runs it several times faster than float32 on Ampere/Hopper, and its effect on the features is small
    (docs/decisions.md, issue 20 precision). ``"fp32"`` forces full precision. CPUs always run float32
    (:class:`Backbone` autocasts on CUDA only).
    """
    if dtype == "auto":
        if mixed_precision in ("bf16", "fp16"):
            return resolve_dtype(mixed_precision)
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return resolve_dtype(dtype)


# Modules whose weights and biases autocast casts to its low dtype before every use (linear, convolutions).
_MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def matmul_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of ``module``'s linear and convolution layers.

    Under ``torch.autocast`` (CUDA and CPU) ``F.linear`` and ``F.conv*`` cast their input, weight and bias to
    the autocast dtype, so storing exactly these parameters in that dtype changes no result. Everything else
    stays as it is: LayerNorm / RMSNorm weights (autocast runs norms in float32), layer scales (a plain
    multiply, outside autocast's cast lists), CLS / register tokens, position embeddings, DINOv3's separate
    q/v biases and every buffer (RoPE periods, the key bias, the normalisation statistics).
    """
    return [p for m in module.modules() if isinstance(m, _MATMUL_MODULES) for p in m.parameters(recurse=False)]


def store_matmul_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store :func:`matmul_parameters` of ``module`` in ``dtype``, in place (other tensors untouched).

    Used by :class:`Backbone` to keep its matmul weights in the autocast dtype on GPUs (half the memory of
    float32, identical results under autocast) and in float32 elsewhere. The parameter objects are kept (their
    ``.data`` is replaced), so ``requires_grad`` and any reference to them survive; casting float32 → bf16 →
    float32 rounds the values to bf16.

    Returns:
        ``module``.
    """
    for param in matmul_parameters(module):
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return module


def gap_descriptor(features: torch.Tensor) -> torch.Tensor:
    """Global image descriptor of patch features ``[B, C, h, w]``: ``norm(mean over h, w)`` → ``[B, C]``."""
    return F.normalize(features.float().mean(dim=(2, 3)), dim=1, eps=1e-10)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reference_pos_embed(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """``VisionTransformer._pos_embed`` with the DINO / DINOv2 reference interpolation.

    ``x`` is the NHWC patch grid produced by a timm patch embedding with ``dynamic_img_size=True``.
    """
    batch, grid_h, grid_w, dim = x.shape
    pos = self.pos_embed
    num_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    prefix_pos, patch_pos = pos[:, :num_prefix], pos[:, num_prefix:]
    side = int(math.sqrt(patch_pos.shape[1]))
    if (grid_h, grid_w) != (side, side):
        # Reference recipe: the 0.1 offset in the scale factor, bicubic, no antialiasing, computed in fp32.
        grid = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic", align_corners=False
        )
        if tuple(grid.shape[-2:]) != (grid_h, grid_w):  # pragma: no cover - guarded by the 0.1 offset
            raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, not {(grid_h, grid_w)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos.dtype)
    x = x.reshape(batch, grid_h * grid_w, dim)
    tokens = []
    if self.cls_token is not None:
        tokens.append(self.cls_token.expand(batch, -1, -1))
    if self.reg_token is not None:
        tokens.append(self.reg_token.expand(batch, -1, -1))
    if self.no_embed_class:
        # Prefix tokens carry no position (timm folds the CLS position into cls_token when converting).
        x = torch.cat(tokens + [x + patch_pos], dim=1)
    else:
        x = torch.cat(tokens + [x], dim=1) + torch.cat([prefix_pos, patch_pos], dim=1)
    return self.pos_drop(x)


def _build_timm(name: str, *, empty: bool = False, timm_name: Optional[str] = None) -> nn.Module:
    """The timm model for ``name``; ``empty=True`` skips the random init (weights are loaded next).

    Args:
        name: a :data:`BACKBONES` name.
        empty: allocate without the random init (non-persistent buffers such as RoPE periods are still
            computed by timm).
        timm_name: build this timm architecture instead of the spec's (a DINOv3 file without q/v biases).
    """
    spec = BACKBONES[name]
    timm_name = timm_name or spec.timm_name
    if name in _TOY:
        # Seeded without touching the global RNG, so building a backbone never changes a run's randomness.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TOY_SEED)
            if name == "toy":
                model = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                          num_classes=0, dynamic_img_size=True)
            else:
                # Layer scale 0.1, not DINOv3's 1e-5 init: untrained blocks would otherwise be near-identities.
                model = timm.create_model(timm_name, pretrained=False, img_size=64, patch_size=8, embed_dim=64,
                                          depth=2, num_heads=2, init_values=0.1, num_classes=0)
                with torch.no_grad():  # trained-looking q/v biases (timm initialises them to zero)
                    for block in model.blocks:
                        block.attn.q_bias.normal_(0, 0.1)
                        block.attn.v_bias.normal_(0, 0.1)
    elif empty:
        # Random init of a ViT-B/g takes seconds and is overwritten anyway; every parameter and persistent
        # buffer is then checked to be present in the file before loading, and the non-persistent buffers
        # (RoPE periods, a zero key bias) are computed by timm's own initialiser.
        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
        model = model.to_empty(device="cpu")
        reinit_non_persistent_buffers(model)
        owners = {n for n, m in model.named_modules() if hasattr(m, "init_non_persistent_buffers")}
        persistent = set(model.state_dict())
        orphans = [b for b, _ in model.named_buffers()
                   if b not in persistent and b.rpartition(".")[0] not in owners]
        if orphans:  # pragma: no cover - a timm change that adds buffers nobody initialises
            raise RuntimeError(f"{timm_name} has buffers that an empty build would leave uninitialised: {orphans}")
    else:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    if isinstance(model, VisionTransformer):
        model._pos_embed = types.MethodType(_reference_pos_embed, model)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            # F.scaled_dot_product_attention; timm may have turned it off through TIMM_FUSED_ATTN.
            module.fused_attn = True
    return model


# ------------------------------------------------------------------------------------------ weights
# Where the DINOv3 release files come from (Meta hands out download links through a request form).
DINOV3_DOWNLOADS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


def _official_url(name: str) -> Optional[str]:
    spec = BACKBONES[name]
    if spec.official_file:
        return spec.official_file
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    return getattr(cfg, "url", None) or None if cfg is not None else None


def _hub_repos(name: str) -> list[str]:
    """timm's hub repositories for ``name``: the spec's architecture first, then the one without q/v bias."""
    spec = BACKBONES[name]
    repos = []
    for timm_name in (spec.timm_name, spec.timm_name_no_qkv_bias):
        cfg = timm.models.get_pretrained_cfg(timm_name) if timm_name else None
        if cfg is not None and getattr(cfg, "hf_hub_id", None):
            repos.append(cfg.hf_hub_id)
    return repos


def _find_cached(name: str) -> Optional[Path]:
    """A weights file for ``name`` already on disk (HF hub cache, then torch hub checkpoints), or None."""
    repos = _hub_repos(name)
    if repos:
        from huggingface_hub import try_to_load_from_cache

        for repo in repos:
            for filename in _HUB_FILENAMES:
                found = try_to_load_from_cache(repo, filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    url = _official_url(name)
    if url:
        # torch.hub.load (the official loaders) keeps release files in <hub dir>/checkpoints/<file name>.
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if candidate.is_file():
            return candidate
    return None


def _where_to_get(name: str) -> str:
    url = _official_url(name)
    return f"{url} (from {DINOV3_DOWNLOADS})" if BACKBONES[name].dinov3 else str(url)


def _download(name: str, key: str = "backbone.weights") -> Path:
    from huggingface_hub import hf_hub_download

    repos = _hub_repos(name)
    if not repos:  # pragma: no cover - every named model has a hub repository
        raise BackboneWeightsError(f"no hub repository is known for {name!r}; pass weights=PATH")
    try:
        return Path(hf_hub_download(repos[0], _HUB_FILENAMES[0]))
    except Exception as err:  # network or hub errors: say what to do instead
        raise BackboneWeightsError(
            f"downloading {name!r} weights from huggingface.co/{repos[0]} failed ({type(err).__name__}: {err}). "
            f"Download {_where_to_get(name)} yourself and pass it as {key}=PATH."
        ) from None


def _missing_weights_message(name: str, key: str = "backbone.weights") -> str:
    repos = _hub_repos(name)
    return (
        f"no local weights for backbone {name!r} (timm '{BACKBONES[name].timm_name}') and downloading is off. "
        f"Pass the weights file as the config override {key}=PATH (load_backbone(..., weights=PATH) "
        f"in Python); the official release file is {_where_to_get(name)}, timm's is model.safetensors from "
        f"https://huggingface.co/{repos[0] if repos else '?'}. Or set backbone.allow_download=true to fetch it "
        f"from the Hugging Face hub."
    )


def _read_file(path: Path) -> Mapping:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        # DINO training checkpoints also pickle their argparse.Namespace of arguments.
        with torch.serialization.safe_globals([argparse.Namespace]):
            # Memory-mapped where the file allows it (torch.save's zip format): a ViT-7B file is 25 GiB, and
            # mapped it is file cache the kernel can drop, not a second private copy beside the model it fills.
            mmap = zipfile.is_zipfile(path)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise BackboneWeightsError(
            f"cannot read weights from {path} ({type(err).__name__}: {str(err).splitlines()[0]}). Expected a "
            f"state dict saved with torch.save, a DINO training checkpoint or a .safetensors file; if the file "
            f"holds other Python objects, re-save just its state dict with torch.save."
        ) from None
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def normalize_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """A plain backbone state dict from a release file or a training checkpoint.

    Picks the ``teacher`` (else ``student`` / ``model`` / ``state_dict``) entry of a training
    checkpoint, strips ``module.`` / ``_orig_mod.`` wrappers, keeps only ``backbone.*`` when the
    checkpoint wraps the backbone with a head (DINO's MultiCropWrapper), and drops head keys.
    """
    for key in _CHECKPOINT_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        state[key] = value
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}


def _mismatch(name: str, path: Path, what: str, details: list[str]) -> BackboneWeightsError:
    shown = ", ".join(details[:5]) + (f", ... ({len(details)} in all)" if len(details) > 5 else "")
    return BackboneWeightsError(
        f"{path} does not hold weights for backbone {name!r} (timm '{BACKBONES[name].timm_name}'): {what}: "
        f"{shown}. Pass the file for {name!r} or choose the backbone name that matches the file."
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    return normalize_state_dict(_read_file(path))


def _timm_name_for(name: str, state: Mapping) -> str:
    """The timm architecture for a file: a DINOv3 file without any q/v bias gets the variant without them."""
    spec = BACKBONES[name]
    if spec.timm_name_no_qkv_bias and not any(k.endswith(("attn.qkv.bias", "attn.q_bias")) for k in state):
        return spec.timm_name_no_qkv_bias
    return spec.timm_name


def _dinov3_buffers(name: str, path: Path, state: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """Apply the official DINOv3 buffers that timm's ``checkpoint_filter_fn`` drops.

    An official file (``storage_tokens``, timm's own test for the format) holds, per block,
    ``attn.qkv.bias_mask``: the official ``LinearKMaskedBias`` uses ``bias * bias_mask`` as the qkv bias.
    timm keeps the q and v thirds of the raw bias and fixes the key bias at zero, which is the same only
    while the mask is exactly (1, 0, 1); here the mask is multiplied in first and the key third kept, so
    any mask gives the official result (the key bias matters under RoPE: keys are rotated per position).
    The file's ``rope_embed.periods`` are returned to replace timm's recomputed ones (release files store
    them rounded to bf16, so they differ from the formula in the last bits).

    Returns:
        ``(state, periods, key_biases)``: the state with masked biases, the file's periods (None for a
        timm file), and the masked key bias of each attention module by module name.

    Raises:
        BackboneWeightsError: an official-format file without a buffer the official model requires.
    """
    if "storage_tokens" not in state:
        return state, None, {}
    state = dict(state)
    missing = [k + "_mask" for k in state if k.endswith("attn.qkv.bias") and k + "_mask" not in state]
    if "rope_embed.periods" not in state:
        missing.insert(0, "rope_embed.periods")
    if missing:
        raise _mismatch(name, path, "missing keys", missing)
    periods = state.pop("rope_embed.periods")
    key_biases = {}
    for key in [k for k in state if k.endswith("attn.qkv.bias")]:
        bias = state[key].float() * state.pop(key + "_mask").float()
        state[key] = bias
        key_biases[key[: -len(".qkv.bias")]] = bias.chunk(3)[1]
    return state, periods, key_biases


def _load_weights(model: nn.Module, name: str, path: Path, state: Optional[dict] = None) -> None:
    state = _read_state(path) if state is None else state
    patch = state.get("patch_embed.proj.weight")
    expected_patch = tuple(model.patch_embed.proj.weight.shape)
    # timm's filter would silently resample a kernel of another patch size: refuse that instead.
    if patch is not None and patch.ndim == 4 and tuple(patch.shape) != expected_patch:
        raise _mismatch(name, path, "patch embedding shape differs",
                        [f"patch_embed.proj.weight {tuple(patch.shape)} != {expected_patch}"])
    periods, key_biases = None, {}
    if any(k.startswith("embeddings.patch_embeddings.") for k in state):
        # facebook/dinov3-* (and facebook/dinov2-*) repositories on the hub hold transformers-format weights.
        raise BackboneWeightsError(
            f"{path} holds Hugging Face transformers weights (embeddings.*, layer.*), which {name!r} does not "
            f"read: pass the official release file ({_official_url(name)}) or timm's model.safetensors "
            f"(https://huggingface.co/{(_hub_repos(name) or ['?'])[0]})")
    if isinstance(model, timm_eva.Eva):
        state, periods, key_biases = _dinov3_buffers(name, path, state)
        if key_biases and model.blocks[0].attn.q_bias is None:
            # timm's filter would drop the biases silently (the target has none): refuse instead.
            raise _mismatch(name, path, "unexpected keys", [f"{k}.qkv.bias" for k in key_biases])
        filter_fn = timm_eva.checkpoint_filter_fn
    else:
        filter_fn = checkpoint_filter_fn
    try:
        state = filter_fn(dict(state), model)
    except Exception as err:
        raise _mismatch(name, path, "timm could not convert it", [f"{type(err).__name__}: {err}"]) from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise _mismatch(name, path, "missing keys", missing)
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise _mismatch(name, path, "unexpected keys", unexpected)
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if state[k].shape != v.shape]
    if periods is not None and tuple(periods.shape) != tuple(model.rope.periods.shape):
        wrong.append(f"rope_embed.periods {tuple(periods.shape)} != {tuple(model.rope.periods.shape)}")
    if wrong:
        raise _mismatch(name, path, "shape mismatch", wrong)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        if periods is not None:
            model.rope.periods.copy_(periods)
        for module_name, key_bias in key_biases.items():
            model.get_submodule(module_name).k_bias.copy_(key_bias)


# ------------------------------------------------------------------------------------------ module
class Backbone(nn.Module):
    """A frozen ViT that returns patch features.

    Attributes:
        name: the backbone name (``dino_vits8``, ``dinov2_vitb14``, ``dinov3_vitb16``, ``toy``, ...).
        patch_size: side of a patch in pixels.
        embed_dim: number of feature channels C.
        weights_id: sha256 of the weights file, or ``random-init-seed<N>`` for the toy models.
        mean, std: ``[1, 3, 1, 1]`` input normalisation of the backbone's weights (the spec's; ImageNet
            statistics for a name outside :data:`BACKBONES`).
        autocast_dtype: dtype used under autocast on CUDA (None = fp32).

    Weight storage follows the precision: on a CUDA device with an autocast dtype, the weights and biases of
    the linear and convolution layers (:func:`matmul_parameters`, nearly all of a ViT's parameters) are stored
    in that dtype, which halves the memory a rank holds and changes no result, since autocast would cast them
    per matmul anyway; norms, layer scales, tokens, position embeddings and buffers stay float32. Elsewhere
    (CPU, or ``autocast_dtype=None``) every weight is float32. The cast happens inside every device move
    (``.to(device)``, ``.cuda()``, ``.cpu()``), tensor by tensor, so no caller does anything and a GPU never
    holds the float32 copy of more than one tensor. Setting ``autocast_dtype`` re-stores the weights; going
    back to float32 after a bf16 cast gives bf16-rounded values, so an fp32 reference is a second backbone
    built with ``dtype=None``.
    """

    # Device types whose forwards run under autocast (a class attribute so that a CPU test can run the bf16
    # path with CPU autocast; every run keeps CPUs in float32).
    autocast_device_types: tuple[str, ...] = ("cuda",)

    def __init__(self, model: nn.Module, *, name: str, weights_id: str, dtype: Optional[torch.dtype] = None,
                 mean: Optional[tuple[float, float, float]] = None, std: Optional[tuple[float, float, float]] = None):
        super().__init__()
        spec = BACKBONES.get(name)
        mean = mean or (spec.mean if spec else IMAGENET_DEFAULT_MEAN)
        std = std or (spec.std if spec else IMAGENET_DEFAULT_STD)
        self.model = model
        self.name = name
        self.weights_id = weights_id
        self._autocast_dtype = dtype
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        # The normalisation the weights were trained with (SAT-493M models have their own).
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)
        self._store_weights()

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return self._autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype: Optional[torch.dtype]) -> None:
        self._autocast_dtype = dtype
        self._store_weights()

    def _autocast_on(self, device: torch.device) -> bool:
        """Whether forwards on ``device`` run under autocast (CUDA with an autocast dtype; CPUs run float32)."""
        return self._autocast_dtype is not None and device.type in self.autocast_device_types

    def _weight_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the matmul weights are stored in on ``device``."""
        return self._autocast_dtype if self._autocast_on(device) else torch.float32

    def _store_weights(self) -> None:
        with torch.no_grad():
            for param in matmul_parameters(self.model):
                param.data = param.data.to(self._weight_dtype(param.device))

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (behind ``.to``, ``.cuda``, ``.cpu``) with the matmul weights stored in the
        dtype of the device they land on, each cast right after its own move."""
        matmul = {id(p) for p in matmul_parameters(self.model)}

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            out = fn(tensor)
            if id(tensor) in matmul and out.is_floating_point():
                out = out.to(self._weight_dtype(out.device))
            return out

        return super()._apply(convert, recurse)

    def train(self, mode: bool = True) -> Backbone:
        """The backbone is frozen: it stays in eval mode whatever a parent module asks."""
        return super().train(False)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {p} of {self.name!r}; "
                f"resize or crop to a multiple of {p} (e.g. {max(p, height // p * p)}x{max(p, width // p * p)})"
            )
        images = images.to(self.mean.device)
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (images - self.mean) / self.std

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features of a batch of images.

        Args:
            images: uint8 ``[B, 3, H, W]`` in 0..255 or float in [0, 1], H and W multiples of ``patch_size``.

        Returns:
            float32 ``[B, C, H/p, W/p]``.
        """
        x = self._prepare(images)
        use_amp = self._autocast_on(x.device)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype, enabled=use_amp):
            tokens = self.model.forward_features(x)
        batch, _, height, width = x.shape
        grid = tokens[:, self.num_prefix_tokens :].float()
        return grid.reshape(batch, height // self.patch_size, width // self.patch_size, -1).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_features(images)

    @torch.no_grad()
    def cls_features(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final LayerNorm (SPEC §8.2's crop descriptor).

        Args:
            images: as for :meth:`patch_features`.

        Returns:
            float32 ``[B, C]``.
        """
        x = self._prepare(images)
        use_amp = self._autocast_on(x.device)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype, enabled=use_amp):
            tokens = self.model.forward_features(x)
        return tokens[:, 0].float()

    @torch.no_grad()
    def last_attention_qk(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys of the last block's self-attention, every head (SPEC §8.1).

        They are read with a forward hook on the timm block's own ``attn.qkv`` projection, i.e. the linear
        map of ``norm1(tokens)`` with its bias, before the ``d^-1/2`` scale (and before any q/k norm, which
        DINO models do not have; for DINOv3, before the RoPE rotation of the patch tokens, with the masked
        key bias). Input preparation (normalisation, position-embedding interpolation) is that of
        :meth:`patch_features`.

        Args:
            images: as for :meth:`patch_features`.

        Returns:
            ``(q, k)``, each float32 ``[B, L, T, d]`` with L heads, ``d = C / L`` and
            ``T = num_prefix_tokens + N`` tokens in timm's order: CLS, then the register tokens (if any),
            then the N patches in raster order.
        """
        x = self._prepare(images)
        attn = self.model.blocks[-1].attn
        captured: list[torch.Tensor] = []
        if isinstance(self.model, timm_eva.Eva):
            # timm's DINOv3 attention adds its q/k/v biases in F.linear, outside the qkv module: capture the
            # attention's input (norm1 of the tokens) and apply the projection with those biases.
            def project(_module, inputs):
                bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                captured.append(F.linear(inputs[0], attn.qkv.weight, bias))

            handle = attn.register_forward_pre_hook(project)
        else:
            handle = attn.qkv.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        use_amp = self._autocast_on(x.device)
        try:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype, enabled=use_amp):
                self.model.forward_features(x)
        finally:
            handle.remove()
        if len(captured) != 1:  # pragma: no cover - a timm change that calls qkv differently
            raise RuntimeError(f"the last block's qkv projection ran {len(captured)} times, expected once")
        qkv = captured[0].float()
        batch, tokens, _ = qkv.shape
        qkv = qkv.reshape(batch, tokens, 3, int(attn.num_heads), -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1]

    @torch.no_grad()
    def global_descriptor(self, images: torch.Tensor) -> torch.Tensor:
        """``norm(mean over h, w of the patch features)`` → ``[B, C]`` float32 (SPEC §1)."""
        return gap_descriptor(self.patch_features(images))


def load_backbone(
    name: str,
    weights: Union[None, str, os.PathLike] = None,
    *,
    allow_download: bool = False,
    dtype: Union[None, str, torch.dtype] = None,
    weights_key: str = "backbone.weights",
) -> Backbone:
    """Build a frozen backbone with its weights.

    Args:
        name: one of :data:`BACKBONES` (``dino_vits8``, ``dino_vitb8``, ``dinov2_vits14``,
            ``dinov2_vits14_reg``, ``dinov3_vits16``, ``dinov3_vitl16_sat``, ..., ``toy``, ``toy_dinov3``).
        weights: path of a weights file (official release, DINO training checkpoint, timm/HF file).
            ``None``: the local hub cache, then (only with ``allow_download``) the Hugging Face hub.
            Ignored sources never lead to random weights for a named DINO model.
        allow_download: fetch missing weights from the Hugging Face hub.
        dtype: autocast dtype on CUDA (``"bf16"``, ``"fp16"``; ``None``/``"no"`` = fp32), also the dtype the
            matmul weights are stored in once the backbone is moved to a GPU. CPU runs fp32.
        weights_key: the config key that sets ``weights``, named in the error messages
            (``maskdistill.mine.weights`` for MaskDistill's mining backbone).

    Returns:
        A :class:`Backbone` in eval mode with ``requires_grad=False`` on every parameter (on CPU, float32).

    Raises:
        ValueError: unknown name or dtype.
        BackboneWeightsError: weights missing (naming the file to pass), unreadable, or of another model.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    autocast_dtype = resolve_dtype(dtype)
    if name in _TOY and weights is None:
        return Backbone(_build_timm(name), name=name, weights_id=f"random-init-seed{TOY_SEED}", dtype=autocast_dtype)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(f"backbone weights file not found: {path} (check {weights_key})")
    else:
        path = _find_cached(name)
        if path is None:
            if not allow_download:
                raise BackboneWeightsError(_missing_weights_message(name, weights_key))
            path = _download(name, weights_key)
    state = _read_state(path)
    model = _build_timm(name, empty=name not in _TOY, timm_name=_timm_name_for(name, state))
    _load_weights(model, name, path, state)
    return Backbone(model, name=name, weights_id=_sha256(path), dtype=autocast_dtype)
