"""Deterministic image / label geometry shared by training, evaluation and prediction.

Training crops and evaluation crops both use "resize the minor side to ``res``, then centre crop
``res``×``res``" (SPEC §6/§7). Images are resized bilinearly with antialiasing (what PIL's bilinear
downscale does in STEGO's ``T.Resize``); labels with nearest neighbour on pixel centres
(``NEAREST_EXACT``, PIL's ``NEAREST`` semantics) so no new class ids appear.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IGNORE_INDEX = 255  # on disk (8-bit PNG)
IGNORE_LABEL = -1  # in tensors handed to models and metrics


def _resize_crop_tensor(t: torch.Tensor, res: int, interpolation: InterpolationMode) -> torch.Tensor:
    antialias = interpolation == InterpolationMode.BILINEAR
    t = TF.resize(t, [res], interpolation=interpolation, antialias=antialias)
    return TF.center_crop(t, [res, res])


def resize_center_crop_tensor(image: torch.Tensor, res: int) -> torch.Tensor:
    """Resize the minor side of ``[..., 3, H, W]`` uint8 (or float) images to ``res`` and centre-crop."""
    return _resize_crop_tensor(image, res, InterpolationMode.BILINEAR)


def resize_center_crop_label_tensor(label: torch.Tensor, res: int) -> torch.Tensor:
    """Nearest-neighbour version of :func:`resize_center_crop_tensor` for ``[..., H, W]`` label maps."""
    squeeze = label.ndim == 2
    t = label[None] if squeeze else label
    out = _resize_crop_tensor(t, res, InterpolationMode.NEAREST_EXACT)
    return out[0] if squeeze else out


def resize_center_crop(image: np.ndarray, res: int) -> np.ndarray:
    """Resize the minor side of an ``H×W×3`` uint8 image to ``res`` (bilinear, antialiased), centre-crop.

    Args:
        image: ``H×W×3`` uint8 RGB.
        res: output side.

    Returns:
        ``res×res×3`` uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 image, got shape {image.shape}")
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    return resize_center_crop_tensor(t, res).permute(1, 2, 0).contiguous().numpy()


def resize_center_crop_label(label: np.ndarray, res: int) -> np.ndarray:
    """Resize the minor side of an ``H×W`` label map to ``res`` (nearest), centre-crop to ``res×res``."""
    if label.ndim != 2:
        raise ValueError(f"expected an H×W label map, got shape {label.shape}")
    return resize_center_crop_label_tensor(torch.from_numpy(np.require(label, requirements=["C", "W"])), res).numpy()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` (0..255) -> float, normalised with ImageNet mean/std (SPEC §1)."""
    x = images.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, back to uint8 (for overlays and CRF)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    return ((images * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def label_to_tensor(label: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor:
    """8-bit label map (255 = ignore) -> int64 tensor with -1 = ignore; all -1 when ``label`` is None."""
    if label is None:
        return torch.full(shape, IGNORE_LABEL, dtype=torch.int64)
    t = torch.from_numpy(np.require(label, requirements=["C", "W"])).to(torch.int64)
    t[t == IGNORE_INDEX] = IGNORE_LABEL
    return t


def check_decode_device(decode_device: str) -> None:
    """Refuse ``data.decode_device=cuda`` where torch sees no CUDA device, in one line naming the fix."""
    if decode_device == "cuda" and not torch.cuda.is_available():
        from dist_seg.config import ConfigError

        raise ConfigError("data.decode_device=cuda needs a CUDA GPU, and torch sees none here; "
                        "use data.decode_device=cpu (the default)")


def decode_jpeg_batch(data: list[torch.Tensor], res: int, device: torch.device | str) -> torch.Tensor:
    """Decode a batch of JPEG byte tensors on ``device`` and resize/crop them like the CPU loader does.

    torchvision's batched ``decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU) decodes to RGB;
    each image then goes through :func:`resize_center_crop_tensor` on the device, the function the CPU
    path applies after PIL decodes. PIL and nvJPEG/libjpeg-turbo may differ by a few grey levels
    (chroma upsampling, IDCT); the geometry is identical.

    Args:
        data: one uint8 tensor of encoded bytes per image (on the CPU, as the loader yields them).
        res: output side.
        device: where to decode (``"cuda"``, or ``"cpu"`` to test this path without a GPU).

    Returns:
        uint8 ``[B, 3, res, res]`` on ``device``.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    images = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
    return torch.stack([resize_center_crop_tensor(image, res) for image in images])
