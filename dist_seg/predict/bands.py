"""Label maps in bands of rows and in overlapping tiles, so memory follows the work, not the image.

Bilinear upsampling of a low-resolution code to the image's size (what evaluation does) needs
``C x H x W`` floats at once: 31 GB for an 11000 x 11000 image with a 64-channel code. Here the code is
upsampled and classified a band of output rows at a time. A band needs only the source rows its output
rows read: with ``align_corners=False``, output row ``i`` reads source rows ``floor(s)`` and
``min(floor(s) + 1, h - 1)`` with ``s = max(0, (i + 0.5) * h / H - 0.5)``, and weights ``1 - l``, ``l``
(``l = s - floor(s)``). The columns of those few source rows are interpolated by ``F.interpolate`` itself
(the same column weights as the whole-image call, since the width is the same), and the rows are combined
with the weights above in the order and rounding of the CPU kernel (one fused multiply-add, through
``torch.addcmul``; the variant is detected once per device type and channel count by :func:`_row_formula`),
so on the CPU each band equals the corresponding rows of the whole-image interpolation bit for bit;
elsewhere it agrees to float rounding. When the whole output fits one band, the kernel itself is called.

:func:`tile_grid` and :func:`blend_window` place overlapping tiles (sliding-window inference) and weigh
them: a tile's scores count most at its centre and least at its border, so overlapping tiles are blended
rather than overwritten.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

# Elements of a band's code (C x rows x W) processed at once: bounds a band at ~128 MB of float32, several
# times that with the classifier's intermediates.
BAND_ELEMENTS = 32 * 1024 * 1024

_FORMULAS: dict[str, tuple[bool, str]] = {}
_EXACT: dict[str, bool] = {}
_CANDIDATES = [(fused_index, mode) for fused_index in (True, False)
               for mode in ("addcmul_first", "addcmul_second", "fuse_first", "fuse_second", "plain")]


def _source_rows(out_size: int, in_size: int, fused_index: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rows ``(i0, i1)`` and weight ``l`` of ``i1`` for every output row (``align_corners=False``)."""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size  # the kernel's float32 in/out
    dst = torch.arange(out_size, dtype=torch.float64) + 0.5
    if fused_index:  # scale * (i + 0.5) - 0.5 rounded once (a fused multiply-add)
        src = (scale.double() * dst - 0.5).float()
    else:
        src = scale * dst.float() - 0.5
    src = src.clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    lam = (src - i0.float()).clamp(0, 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    if out_size == in_size:  # the kernel's identity case
        i0 = i1 = torch.arange(out_size)
        lam = torch.zeros(out_size)
    return i0, i1, lam


def _combine(cols: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor, lam: torch.Tensor, mode: str) -> torch.Tensor:
    """``(1 - l) * cols[i0] + l * cols[i1]`` (rows of ``cols``, dim 2) rounded as the kernel rounds it.

    ``mode`` says which product, if any, the kernel fuses into the sum; float32 products are exact in
    float64, so a float64 sum rounded once to float32 emulates the fused multiply-add.
    """
    w0 = (1 - lam).view(1, 1, -1, 1)
    lam = lam.view(1, 1, -1, 1)
    # torch.addcmul is one fused multiply-add per element where the CPU build vectorises it with FMA: the
    # same rounding as the kernel at a twentieth of the float64 emulation's cost (the probe decides).
    if mode == "addcmul_first":
        return torch.addcmul(cols.index_select(2, i1).mul_(lam), cols.index_select(2, i0), w0)
    if mode == "addcmul_second":
        return torch.addcmul(cols.index_select(2, i0).mul_(w0), cols.index_select(2, i1), lam)
    if mode == "fuse_first":  # fma(w0, t0, round(l * t1))
        out = cols.index_select(2, i0).double().mul_(w0.double())
        return out.add_(cols.index_select(2, i1).mul_(lam)).float()
    if mode == "fuse_second":  # fma(l, t1, round(w0 * t0))
        out = cols.index_select(2, i1).double().mul_(lam.double())
        return out.add_(cols.index_select(2, i0).mul_(w0)).float()
    return cols.index_select(2, i0).mul_(w0).add_(cols.index_select(2, i1).mul_(lam))


def _rows(code: torch.Tensor, size: tuple[int, int], start: int, stop: int, formula: tuple[bool, str]) -> torch.Tensor:
    fused_index, mode = formula
    i0, i1, lam = _source_rows(size[0], code.shape[-2], fused_index)
    i0, i1, lam = i0[start:stop], i1[start:stop], lam[start:stop]
    first, last = int(i0.min()), int(i1.max())
    # The band's source rows at full width: same column weights as the whole-image call; rows unchanged.
    cols = F.interpolate(code[:, :, first:last + 1], size=(last + 1 - first, size[1]), mode="bilinear",
                         align_corners=False)
    dev = code.device
    return _combine(cols, (i0 - first).to(dev), (i1 - first).to(dev), lam.to(dev), mode)


def _row_formula(device: torch.device, channels: int) -> tuple[bool, str]:
    """The rounding of the interpolation kernel on ``device``'s type: the variant that reproduces it on a probe.

    CPU builds with fused multiply-add (AVX2, AVX-512) round differently from those without; CUDA's kernel
    is not separable and none reproduces it exactly (the plain variant, equal to float rounding, is used).
    The probe has the code's channel count: the CPU kernel has a path of its own for 3 channels.
    """
    key = f"{device.type}:{channels}"
    if key not in _FORMULAS:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(1, channels, 7, 5, generator=gen).to(device)
        size = (613, 9)
        full = F.interpolate(probe, size=size, mode="bilinear", align_corners=False)
        _FORMULAS[key], _EXACT[key] = (False, "plain"), False
        for formula in _CANDIDATES:
            if torch.equal(_rows(probe, size, 0, size[0], formula), full):
                _FORMULAS[key], _EXACT[key] = formula, True
                break
    return _FORMULAS[key]


def is_exact(device: torch.device | str, channels: int) -> bool:
    """Whether bands reproduce the whole-image interpolation bit for bit for this device type and channel count
    (CPU: yes, except the kernel's own 3-channel path; CUDA: no, equal to float rounding)."""
    device = torch.device(device)
    _row_formula(device, channels)
    return _EXACT[f"{device.type}:{channels}"]


def upsample_rows(code: torch.Tensor, size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``F.interpolate(code, size, mode="bilinear", align_corners=False)``.

    Args:
        code: ``[B, C, h, w]`` float32.
        size: the full output size ``(H, W)``.
        start, stop: the output rows wanted.

    Returns:
        ``[B, C, stop - start, W]``; bit-identical to the whole-image call's rows on the CPU.
    """
    if (start, stop) == (0, size[0]) or size[0] <= code.shape[-2]:
        # One band is the whole-image call itself (the output fits the band budget); an image smaller than its
        # code grid needs no more than the code's rows at full width.
        return F.interpolate(code, size=size, mode="bilinear", align_corners=False)[:, :, start:stop]
    return _rows(code, size, start, stop, _row_formula(code.device, code.shape[1]))


def band_starts(height: int, width: int, channels: int,
                band_elements: int = BAND_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges covering ``height`` rows, each of at most
    ``band_elements / (channels * width)`` rows."""
    rows = max(1, band_elements // max(1, channels * width))
    for start in range(0, height, rows):
        yield start, min(height, start + rows)


def classify_bands(code: torch.Tensor, size: tuple[int, int], classify: Callable[[torch.Tensor], torch.Tensor],
                   *, band_elements: int = BAND_ELEMENTS) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Upsample ``code`` ``[1, C, h, w]`` to ``size`` a band at a time and classify each band.

    Yields:
        ``(start, stop, classify(band))`` for consecutive bands of output rows.
    """
    for start, stop in band_starts(size[0], size[1], code.shape[1], band_elements):
        yield start, stop, classify(upsample_rows(code, size, start, stop))


# ------------------------------------------------------------------------------------ sliding window
def tile_grid(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels every ``stride`` pixels covering ``length`` pixels.

    The last tile is moved back to end at the border (it overlaps its neighbour more), so no tile is padded;
    a side shorter than ``tile`` is one tile of that side.
    """
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got tile={tile}, stride={stride}")
    if stride > tile:
        raise ValueError(f"stride {stride} > tile {tile} would leave pixels no tile covers; use stride <= tile")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A separable Hann-like window ``[height, width]``, ``sin^2(pi (i + 0.5) / n)``: largest at the centre,
    small but never zero at the border (so a pixel covered by one tile keeps that tile's scores)."""

    def one(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32, device=device)
        return torch.sin(math.pi * (i + 0.5) / n) ** 2

    return one(height)[:, None] * one(width)[None, :]
