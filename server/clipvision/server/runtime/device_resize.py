"""Pillow's resize and crop of 8-bit RGB, bit for bit, in torch on the model's device.

Pillow resamples 8-bit images in fixed point (libImaging/Resample.c): for each
output pixel of an axis it computes the filter's weights in double precision,
normalises them to sum one and rounds them to integers of 22 fractional bits;
each pass then sums integer products with a rounding offset, shifts and clips to
0..255, horizontally first, then vertically over the horizontal pass's 8-bit
result. This module computes the same integer weights with numpy, in the same
order of floating-point operations, and runs each pass as a product with a band
matrix of those integers in float64: every product and every partial sum is an
integer below 2**31, which float64 holds exactly, so the order of summation
(whatever a BLAS or a GPU picks) cannot change the result, and the shift and clip
give Pillow's bytes. Crops are Pillow's too (zero outside the image).

Exact for the filters whose weights are polynomials (bicubic, bilinear, box);
Hamming and Lanczos weights use sin and cos, whose last bit differs between math
libraries, so `supports` refuses them (their images keep the CPU path), as it does
nearest-neighbour, which Pillow does not resample this way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import PIL
import torch
from PIL import Image

from clipvision.server.runtime.preprocess import MAX_RESIZED_PIXELS, PreprocessConfig

PRECISION_BITS = 32 - 8 - 2
_ROUNDING = float(1 << (PRECISION_BITS - 1))
_SCALE = float(1 << PRECISION_BITS)

Float64Array = npt.NDArray[np.float64]


def _bicubic(x: Float64Array) -> Float64Array:
    # Resample.c's bicubic_filter with a = -0.5, operation for operation.
    x = np.abs(x)
    inner = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _bilinear(x: Float64Array) -> Float64Array:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: Float64Array) -> Float64Array:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


# PIL.Image.Resampling value -> (filter, support), as Resample.c defines them.
_FILTERS = {
    int(Image.Resampling.BICUBIC): (_bicubic, 2.0),
    int(Image.Resampling.BILINEAR): (_bilinear, 1.0),
    int(Image.Resampling.BOX): (_box, 0.5),
}


def supports(config: PreprocessConfig) -> bool:
    """Whether the device reproduces this preprocessing exactly (its resampling filter)."""
    return not config.do_resize or config.resample in _FILTERS


@dataclass(frozen=True)
class AxisWeights:
    """One axis of a resize: which input indices each output index reads, with what weight."""

    first: int
    """The first input index any output reads."""
    last: int
    """One past the last input index any output reads."""
    starts: npt.NDArray[np.int64]
    """(outputs,): each output's first input index."""
    taps: Float64Array
    """(outputs, taps): Pillow's integer weights from each start on, zero past its window."""

    @functools.cached_property
    def band(self) -> Float64Array:
        """The weights as an (outputs, last - first) band matrix, for one matrix product."""
        outputs, taps = self.taps.shape
        matrix = np.zeros((outputs, self.last - self.first), dtype=np.float64)
        columns = self.starts[:, None] + np.arange(taps)[None, :] - self.first
        inside = columns < matrix.shape[1]
        rows = np.broadcast_to(np.arange(outputs)[:, None], columns.shape)
        matrix[rows[inside], columns[inside]] = self.taps[inside]
        return matrix


def axis_weights(in_size: int, in0: float, in1: float, out_size: int, resample: int) -> AxisWeights:
    """Resample.c's precompute_coeffs and normalize_coeffs_8bpc for one axis.

    ``in0`` and ``in1`` are the box's edges on this axis, as Pillow gets them: C floats.
    """
    kernel, support_1 = _FILTERS[resample]
    box0, box1 = np.float32(in0), np.float32(in1)
    scale = float(np.float64(box1 - box0)) / out_size  # (double)(in1 - in0) / outSize
    filterscale = max(scale, 1.0)
    support = support_1 * filterscale
    ss = 1.0 / filterscale
    centers = float(box0) + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # (int)(value + 0.5): C truncates toward zero; negative starts clamp to 0 anyway.
    starts = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    ends = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size)
    counts = np.maximum(ends - starts, 0)
    ksize = int(np.ceil(support)) * 2 + 1
    offsets = np.arange(ksize, dtype=np.int64)
    valid = offsets[None, :] < counts[:, None]
    # filter((x + xmin - center + 0.5) * ss), with x + xmin an int, as in C.
    positions = (offsets[None, :] + starts[:, None]).astype(np.float64)
    weights = np.where(valid, kernel(((positions - centers[:, None]) + 0.5) * ss), 0.0)
    # C sums left to right; numpy's pairwise sum could differ in the last bit.
    totals = np.zeros(out_size, dtype=np.float64)
    for column in range(ksize):
        totals += weights[:, column]
    divisors = np.where(totals == 0.0, 1.0, totals)
    weights = np.where(totals[:, None] != 0.0, weights / divisors[:, None], weights)
    # (int)(-0.5 + w * 2**22) below zero, (int)(0.5 + w * 2**22) above: half away from zero.
    scaled = weights * _SCALE
    taps = np.where(valid, np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)), 0.0)
    first = int(starts.min()) if out_size else 0
    last = int((starts + counts).max()) if out_size else 0
    return AxisWeights(first, last, starts, taps)


@dataclass(frozen=True)
class Resize:
    """One resize of Pillow's, as ``Image.resize(size, resample, box)`` runs it: a crop when
    the box is whole pixels of the output's size, else up to two fixed-point passes."""

    crop: tuple[int, int] | None
    """(left, top) of a plain crop (ImagingCrop), or None for a resample."""
    horizontal: AxisWeights | None
    """None when Pillow skips the horizontal pass (same width, box from 0 to the width)."""
    vertical: AxisWeights
    """The vertical weights; a horizontal pass first reads only its rows (first to last)."""
    vertical_pass: bool
    vertical_first: bool
    out_width: int
    out_height: int


# Pillow 13 runs the vertical pass first when the height shrinks more than twice as much
# as the width (Resample.c, ImagingResampleInner); earlier releases never do.
_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


def plan_resize(
    width: int,
    height: int,
    out_width: int,
    out_height: int,
    resample: int,
    box: tuple[float, float, float, float] | None = None,
) -> Resize:
    """How ``Image.resize((out_width, out_height), resample, box)`` treats a ``width`` x
    ``height`` RGB image (_imaging.c's _resize, then ImagingResampleInner)."""
    edges = box if box is not None else (0.0, 0.0, float(width), float(height))
    x0, y0, x1, y1 = (np.float32(edge) for edge in edges)  # C floats, as "(ffff)" parses them
    if (
        x0 == np.float32(int(x0))
        and y0 == np.float32(int(y0))
        and x1 - x0 == out_width
        and y1 - y0 == out_height
    ):
        return Resize((int(x0), int(y0)), None, _NO_AXIS, False, False, out_width, out_height)
    need_horizontal = out_width != width or bool(x0) or x1 != out_width
    need_vertical = out_height != height or bool(y0) or y1 != out_height
    shrink = height - out_height
    vertical_first = _VERTICAL_FIRST and shrink > 0 and shrink > (width - out_width) * 2
    vertical = axis_weights(height, float(y0), float(y1), out_height, resample)
    horizontal = (
        axis_weights(width, float(x0), float(x1), out_width, resample) if need_horizontal else None
    )
    return Resize(None, horizontal, vertical, need_vertical, vertical_first, out_width, out_height)


_NO_AXIS = AxisWeights(0, 0, np.zeros(0, dtype=np.int64), np.zeros((0, 1)))


def resample(pixels: torch.Tensor, plan: Resize) -> torch.Tensor:
    """Resize (..., 3, H, W) uint8 pixels as Pillow does; returns (..., 3, h, w) uint8."""
    if plan.crop is not None:
        left, top = plan.crop
        return pixels[..., top : top + plan.out_height, left : left + plan.out_width]
    values = pixels.to(torch.float64)
    vertical, horizontal = plan.vertical, plan.horizontal
    if plan.vertical_first:
        values = _pass(values, vertical, -2, 0)
        if horizontal is not None:
            values = _pass(values, horizontal, -1, 0)
        return values.to(torch.uint8)
    first = 0
    if horizontal is not None:
        # Only the rows the vertical pass reads (Pillow's ybox_first to ybox_last).
        values = _pass(values[..., vertical.first : vertical.last, :], horizontal, -1, 0)
        first = vertical.first
    if plan.vertical_pass:
        values = _pass(values, vertical, -2, first)
    return values.to(torch.uint8)


# Above this many weights a band matrix is replaced by one gather per tap (extreme sizes).
_BAND_LIMIT = 1 << 24


def _pass(values: torch.Tensor, weights: AxisWeights, axis: int, offset: int) -> torch.Tensor:
    """One fixed-point pass along ``axis`` (-1: columns, -2: rows), clipped to 0..255.

    ``offset`` is the input index of ``values``' first row or column along ``axis``.
    """
    outputs, taps = weights.taps.shape
    if outputs * (weights.last - weights.first) <= _BAND_LIMIT:
        matrix = torch.from_numpy(weights.band).to(values.device)
        span = values.narrow(axis, weights.first - offset, weights.last - weights.first)
        summed = span @ matrix.T if axis == -1 else matrix @ span
    else:
        size = values.shape[axis]
        starts = torch.from_numpy(weights.starts - offset).to(values.device)
        tap_weights = torch.from_numpy(weights.taps).to(values.device)
        columns = axis == -1

        def term(tap: int) -> torch.Tensor:
            index = torch.clamp(starts + tap, max=size - 1)
            scale = tap_weights[:, tap] if columns else tap_weights[:, tap, None]
            return values.index_select(axis, index) * scale

        summed = term(0)
        for tap in range(1, taps):
            summed += term(tap)
    # Exact integers: the shift is a floor division, then clip8()'s clip.
    return torch.clamp(torch.floor((summed + _ROUNDING) / _SCALE), 0, 255)


def center_crop(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """transformers' center_crop as Pillow runs it: zeros outside the image."""
    in_height, in_width = pixels.shape[-2:]
    return crop(pixels, (in_width - width) // 2, (in_height - height) // 2, width, height)


def crop(pixels: torch.Tensor, left: int, top: int, width: int, height: int) -> torch.Tensor:
    """Pillow's crop((left, top, left + width, top + height)): zeros outside the image."""
    in_height, in_width = pixels.shape[-2:]
    if left >= 0 and top >= 0 and left + width <= in_width and top + height <= in_height:
        return pixels[..., top : top + height, left : left + width]
    out = pixels.new_zeros((*pixels.shape[:-2], height, width))
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, in_width), min(top + height, in_height)
    if x1 > x0 and y1 > y0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = pixels[..., y0:y1, x0:x1]
    return out


class DeviceGeometry:
    """ClipPreprocessor.pixels' geometry on a device, for full-size RGB pixels: CLIP's (the
    shortest edge resized, a centre crop) or SigLIP's (resized straight to H x W); the plans
    of each input size are kept (their weights are small: a few hundred by a few thousand)."""

    def __init__(self, config: PreprocessConfig) -> None:
        if not supports(config):
            raise ValueError(f"resampling filter {config.resample} is not exact on a device")
        self.config = config
        self._plans = functools.lru_cache(maxsize=256)(self._plan)

    def pixels(self, rgb: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 in RGB order at full size -> (3, crop_h, crop_w) uint8 (or, with
        no centre crop, the resized size), exactly as the CPU path computes it."""
        config = self.config
        height, width = rgb.shape[-2:]
        if config.do_resize:
            plan, crop_at = self._plans(int(width), int(height))
            if plan is not None:
                rgb = resample(rgb, plan)
            if crop_at is not None:
                left, top = crop_at
                return crop(rgb, left, top, config.crop_width, config.crop_height)
            if config.do_center_crop:
                return center_crop(rgb, config.crop_width, config.crop_height)
            return rgb
        if config.do_center_crop:
            return center_crop(rgb, config.crop_width, config.crop_height)
        return rgb

    def _plan(self, width: int, height: int) -> tuple[Resize | None, tuple[int, int] | None]:
        """The resize of ClipPreprocessor._resize_and_crop, and for its box path the crop
        of the resized part (left, top); the plain path crops the centre afterwards."""
        config = self.config
        new_width, new_height = config.size_after_resize(width, height)
        crop_w, crop_h = config.crop_width, config.crop_height
        if not config.do_center_crop or new_width * new_height <= MAX_RESIZED_PIXELS:
            if (new_width, new_height) == (width, height):
                return None, None
            return plan_resize(width, height, new_width, new_height, config.resample), None
        # The box path: resize only the part of the image that survives the crop.
        left, top = (new_width - crop_w) // 2, (new_height - crop_h) // 2
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + crop_w, new_width), min(top + crop_h, new_height)
        sx, sy = width / new_width, height / new_height
        box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
        plan = plan_resize(width, height, x1 - x0, y1 - y0, config.resample, box)
        return plan, (left - x0, top - y0)


# Sizes that take every path of the resize: both pass orders, one pass only, the box path
# of extreme aspect ratios, the crop shortcut, an image smaller than the crop.
_CHECK_SIZES = ((640, 480), (480, 640), (1000, 100), (240, 1000), (224, 90), (2, 1200), (9, 7))


def self_check(config: PreprocessConfig, device: torch.device) -> int:
    """Bytes that differ between Pillow (the CPU path) and this module on ``device``, over
    random images of sizes that take every path; anything but 0 means it must not serve."""
    from clipvision.server.runtime.preprocess import ClipPreprocessor

    cpu = ClipPreprocessor(config)
    geometry = DeviceGeometry(config)
    generator = np.random.default_rng(20261206)
    differing = 0
    for width, height in _CHECK_SIZES:
        array = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = cpu.pixels(Image.fromarray(array))
        tensor = torch.from_numpy(array).to(device).permute(2, 0, 1)
        got = geometry.pixels(tensor).cpu().numpy()
        if got.shape != expected.shape:
            differing += expected.size
        else:
            differing += int(np.count_nonzero(got != expected))
    return differing
