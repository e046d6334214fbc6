"""How much bf16 autocast changes the frozen backbone's patch features (issue 20, precision defaults).

For each backbone, the same images go through the ViT once in float32 and once under
``torch.autocast(device, torch.bfloat16)`` (what ``backbone.dtype=auto`` does on a GPU). Printed per backbone:
absolute error (max, mean), relative error per patch ``|f_bf16 - f_fp32| / |f_fp32|`` (mean, max), cosine
similarity per patch (mean, min), and the overlap of each patch's exact top-k neighbours among all patches of
the batch (``dist_seg.knn.knn``, cosine) in bf16 vs float32 features.

The backbones are built with ``dtype=None``, so they keep float32 weights on every device and the bf16 pass
is autocast over float32 weights. A ``backbone.dtype=auto`` run on a GPU stores its linear/conv weights in
bf16 instead, which gives exactly the same features (autocast casts those weights to bf16 per matmul;
tests/test_backbones.py checks the equality), so the figures are those of the training path.

Backbones: the toy model, and ViT-S/8 and ViT-B/8 (``dino_vits8``/``dino_vitb8`` architectures) with timm's
random init: real-weight *shapes*, not real weights, since no weights are downloaded here.

    python tools/measure_backbone_precision.py --device cpu --images 4 --res 224
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F


def smooth_images(num: int, res: int, seed: int) -> torch.Tensor:
    """uint8 images with structure at several scales (random colour fields upsampled, plus fine noise)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(num, 3, res, res)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.15)):
        field = torch.rand(num, 3, cells, cells, generator=gen)
        out += weight * F.interpolate(field, size=(res, res), mode="bilinear", align_corners=False)
    out += 0.05 * torch.rand(num, 3, res, res, generator=gen)
    return (out.clamp(0, 1) * 255).to(torch.uint8)


def build(name: str):
    from dist_seg.backbones import Backbone, _build_timm, load_backbone

    if name == "toy":
        return load_backbone("toy")
    torch.manual_seed(0)
    return Backbone(_build_timm(name), name=name, weights_id="random-init-seed0")


def features(backbone, images: torch.Tensor, dtype) -> torch.Tensor:
    x = backbone._prepare(images)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        tokens = backbone.model.forward_features(x)
    b, _, h, w = x.shape
    grid = tokens[:, backbone.num_prefix_tokens:].float()
    return grid.reshape(b, h // backbone.patch_size, w // backbone.patch_size, -1)


def compare(ref: torch.Tensor, low: torch.Tensor, k: int) -> dict[str, float]:
    from dist_seg.knn import knn

    a, b = ref.reshape(-1, ref.shape[-1]), low.reshape(-1, low.shape[-1])
    diff = (b - a).abs()
    rel = (b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
    cos = F.cosine_similarity(a, b, dim=1)
    _, idx_ref = knn(a, a, k, exclude_self=True, backend="torch")
    _, idx_low = knn(b, b, k, exclude_self=True, backend="torch")
    overlap = (idx_ref[:, :, None] == idx_low[:, None, :]).any(-1).float().sum(1) / k
    return {"patches": a.shape[0], "feature_rms": float(a.pow(2).mean().sqrt()),
            "abs_max": float(diff.max()), "abs_mean": float(diff.mean()),
            "rel_mean": float(rel.mean()), "rel_max": float(rel.max()),
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            f"top{k}_overlap_mean": float(overlap.mean()), f"top{k}_overlap_min": float(overlap.min()),
            "top1_same": float((idx_ref[:, 0] == idx_low[:, 0]).float().mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--backbones", nargs="+", default=["toy", "dino_vits8", "dino_vitb8"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(json.dumps({"device": str(device), "torch": torch.__version__, "machine": platform.processor() or
                      platform.machine(), "images": args.images, "res": args.res, "k": args.k}))
    for name in args.backbones:
        backbone = build(name).to(device)
        res = 64 if name == "toy" else args.res
        images = smooth_images(args.images, res, seed=1).to(device)
        t0 = time.perf_counter()
        ref = features(backbone, images, None)
        low = features(backbone, images, torch.bfloat16)
        row = {"backbone": name, "res": res, **compare(ref, low, args.k), "wall_s": time.perf_counter() - t0}
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
