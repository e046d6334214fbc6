"""DINOv3 parity: dist_seg's patch features against the official implementation on official-format files.

The official code (facebookresearch/dinov3) is under its own licence and is not part of this repository:
pass the path of a checkout. For each model, the official network is built with its hub constructor
(``pretrained=False``), every parameter and buffer is given non-trivial random values (biases, layer
scales, norms, tokens, the local CLS norm, the RoPE periods; the key-bias mask in its released pattern
(1, 0, 1) and, with ``--random-mask``, an arbitrary 0/1 pattern; ``--release-periods`` keeps the periods
at the bf16-rounded formula values the releases hold instead of perturbing them), its ``state_dict()`` is
saved exactly as the release files are (a plain ``torch.save``), and
``load_backbone(name, weights=FILE).patch_features`` is compared with the official
``forward_features(x)["x_norm_patchtokens"]`` on the same images.

    python tools/dinov3_parity.py --official /path/to/dinov3 [--models dinov3_vits16 ...] [--sizes 224x224 ...]

Prints one line per model and size: the maximum absolute difference divided by the largest official
feature magnitude ("rel"), which must stay under ``--tol`` (1e-4); exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

# This checkout's dist_seg, not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The official README's input normalisation (LVD-1689M: ImageNet; SAT-493M: its own), kept here rather
# than read from dist_seg so that a wrong spec would show.
NORMALISATION = {"LVD1689M": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 "SAT493M": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))}
# name -> (official hub constructor, its weights argument, images per size)
MODELS = {
    "dinov3_vits16": ("dinov3_vits16", "LVD1689M", 2),
    "dinov3_vits16plus": ("dinov3_vits16plus", "LVD1689M", 2),
    "dinov3_vitb16": ("dinov3_vitb16", "LVD1689M", 1),
    "dinov3_vitl16": ("dinov3_vitl16", "LVD1689M", 1),
    "dinov3_vitl16_sat": ("dinov3_vitl16", "SAT493M", 1),
}


def _official_model(official: Path, name: str) -> torch.nn.Module:
    sys.path.insert(0, str(official))
    from dinov3.hub import backbones as hub  # noqa: PLC0415 - the user's checkout, imported on demand

    fn, weights, _ = MODELS[name]
    torch.manual_seed(0)  # the official init draws the weight matrices from the global generator
    # pretrained=False runs the official init; weights=SAT493M turns on the SAT ViT-L's local CLS norm.
    return getattr(hub, fn)(pretrained=False, weights=getattr(hub.Weights, weights)).eval()


def _randomise(model: torch.nn.Module, seed: int, random_mask: bool, release_periods: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            noise = torch.randn(value.shape, generator=gen)
            if key.endswith("bias_mask"):
                if random_mask:
                    value.copy_((torch.rand(value.shape, generator=gen) < 0.5).float())
                else:  # the released pattern: q and v biases kept, key bias zeroed
                    third = value.numel() // 3
                    assert value[:third].eq(1).all() and value[third: 2 * third].eq(0).all()
            elif key.endswith("periods"):
                if release_periods:  # the formula's values rounded to bf16, as the release files store them
                    value.copy_(value.bfloat16().float())
                else:  # perturbed, so the check fails if the file's periods were replaced by the formula's
                    value.mul_(1 + 0.2 * torch.rand(value.shape, generator=gen))
            elif "gamma" in key:  # layer scales: trained values are far from the 1e-5 init
                value.copy_(0.3 + 0.2 * noise)
            elif key.endswith("norm.weight") or ".norm1.weight" in key or ".norm2.weight" in key:
                value.copy_(1 + 0.2 * noise)
            elif key.endswith("bias") or "token" in key:
                value.copy_(0.2 * noise)


def _images(count: int, height: int, width: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(height * 1000 + width)
    return torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8, generator=gen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="checkout of facebookresearch/dinov3")
    parser.add_argument("--models", nargs="+", default=["dinov3_vits16", "dinov3_vits16plus", "dinov3_vitl16_sat"],
                        choices=sorted(MODELS))
    parser.add_argument("--sizes", nargs="+", default=["224x224", "320x320", "448x320"], help="HxW")
    parser.add_argument("--random-mask", action="store_true", help="an arbitrary 0/1 key-bias mask pattern")
    parser.add_argument("--release-periods", action="store_true",
                        help="RoPE periods as the release files hold them (bf16-rounded formula) instead of perturbed")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)

    from dist_seg.backbones import load_backbone

    worst = 0.0
    for name in args.models:
        official = _official_model(args.official, name)
        _randomise(official, seed=0, random_mask=args.random_mask, release_periods=args.release_periods)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}_official.pth"
            torch.save(official.state_dict(), path)
            backbone = load_backbone(name, weights=path)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION[MODELS[name][1]])
        for size in args.sizes:
            height, width = (int(v) for v in size.split("x"))
            images = _images(MODELS[name][2], height, width)
            start = time.perf_counter()
            with torch.no_grad():
                ref = official.forward_features((images.float() / 255 - mean) / std)["x_norm_patchtokens"]
            ref = ref.reshape(len(images), height // 16, width // 16, -1).permute(0, 3, 1, 2)
            got = backbone.patch_features(images)
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, rel)
            print(f"{name:20s} {size:8s} images {len(images)}  rel {rel:.2e}  max|ref| {ref.abs().max().item():.3g}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    ok = worst < args.tol
    print(f"worst rel {worst:.2e} ({'within' if ok else 'ABOVE'} {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
