"""Image decoding under operator limits, and preprocessing identical to transformers'.

`decode_image` turns untrusted bytes into a loaded PIL image or an `InvalidImageError`.
`ClipPreprocessor` turns that image into the float32 (3, H, W) array the vision tower
takes, bit for bit what the checkpoint's Pillow-backed image processor computes from the
same image: `transformers.CLIPImageProcessorPil` (the shortest side resized, then a centre
crop) or `SiglipImageProcessorPil` (resized straight to H x W, the aspect ratio not kept):
the same PIL calls for RGB conversion, resizing and cropping, and a per-channel lookup
table that holds the exact float results of its rescale and normalise for each byte value.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageFile, ImageOps

from clipvision.server.config.limits import ImageLimits
from clipvision.server.errors import InvalidImageError, Reason

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL opens multi-picture JPEGs (MPO) with its JPEG plugin.
_OPENED_BY = {"MPO": "JPEG"}

# Modes whose premultiplied alpha PIL cannot convert to RGB(A); un-premultiplying first keeps them.
_UNPREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}

# Every mode an allowed format decodes to that PIL converts to RGB and RGBA.
_CONVERTIBLE_MODES = frozenset(
    {"1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "F"}
    | {"I", "I;16", "I;16B", "I;16L", "I;16N"}
)

# A resized-but-uncropped image larger than this (64 MiB as PIL stores RGB) comes only from
# extreme aspect ratios (over ~330:1 at 224 px); a 1x4,000,000 strip would need terabytes, so
# such images are resized through a box around the crop instead, within a level or two of exact.
MAX_RESIZED_PIXELS = 1 << 24

FloatArray = npt.NDArray[np.float32]
UInt8Array = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ProbedImage:
    """An encoded image whose header is parsed and checked against the limits, not yet decoded.

    What the header says (size, pixel mode, format) prices the decode before it runs; the
    parsed header is then decoded by `load_image`, so it is parsed once.
    """

    image: ImageFile.ImageFile = field(repr=False)
    encoded_bytes: int
    width: int
    height: int
    mode: str
    format: str

    @property
    def pixels(self) -> int:
        """Width times height, as the header declares them."""
        return self.width * self.height


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Validate and fully decode one encoded image: EXIF orientation applied, first frame only.

    Raises InvalidImageError, and nothing else, for any bytes that are not an acceptable image.
    """
    return load_image(probe_image(data, limits))


def probe_image(data: bytes, limits: ImageLimits) -> ProbedImage:
    """Parse and check the header only: size, mode and format, before a pixel is decoded.

    Raises InvalidImageError, and nothing else, for bytes that are not an acceptable image.
    """
    if not data:
        raise InvalidImageError(
            Reason.IMAGE_EMPTY, "The image is empty; send the bytes of an encoded image file."
        )
    if len(data) > limits.max_image_bytes:
        raise InvalidImageError(
            Reason.IMAGE_TOO_LARGE,
            f"The image is {len(data)} bytes, over this server's limit of "
            f"{limits.max_image_bytes} bytes; send a smaller or more compressed file.",
        )
    image = _open(data, limits)
    width, height = image.size
    # Checked on the header's size, before a single pixel is decoded.
    if width * height > limits.max_image_pixels:
        raise InvalidImageError(
            Reason.IMAGE_TOO_MANY_PIXELS,
            f"The image is {width}x{height} = {width * height} pixels, over this server's limit "
            f"of {limits.max_image_pixels} pixels; downscale it before sending.",
        )
    if min(width, height) < limits.min_image_side:
        raise InvalidImageError(
            Reason.IMAGE_TOO_SMALL,
            f"The image is {width}x{height} pixels, under this server's minimum of "
            f"{limits.min_image_side} pixels per side; send a larger image.",
        )
    return ProbedImage(image, len(data), width, height, image.mode, image.format or "")


def load_image(probed: ProbedImage) -> Image.Image:
    """Decode a probed image: EXIF orientation applied, first frame only, RGB-convertible mode.

    Raises InvalidImageError, and nothing else, for data that cannot be decoded.
    """
    image: Image.Image = probed.image
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode in _UNPREMULTIPLIED:
            image = image.convert(_UNPREMULTIPLIED[image.mode])
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            Reason.IMAGE_TOO_MANY_PIXELS,
            f"The {probed.format} image declares more pixels than this server accepts; "
            "downscale it before sending.",
        ) from exc
    except Exception as exc:  # PIL raises many types for corrupt data; none may escape.
        raise InvalidImageError(
            Reason.IMAGE_DECODE_FAILED,
            f"The {probed.format} image could not be decoded because it is truncated or "
            "corrupt; send a complete, valid file.",
        ) from exc
    if image.mode not in _CONVERTIBLE_MODES:
        raise InvalidImageError(
            Reason.IMAGE_FORMAT_UNSUPPORTED,
            f"The {probed.format} image has pixel mode {image.mode}, which cannot be converted "
            "to RGB; send an RGB, RGBA or greyscale image.",
        )
    return image


def _open(data: bytes, limits: ImageLimits) -> ImageFile.ImageFile:
    """Identify the format and parse the header with allowed plugins only.

    This is `Image.open` without its own decompression-bomb check, which would warn (or raise)
    before ours can refuse the image with a clear message.
    """
    Image.init()
    allowed = limits.allowed_formats
    prefix = data[:16]
    stream = io.BytesIO(data)
    wanted = {_OPENED_BY.get(name, name) for name in allowed}
    looks_like: str | None = None
    for name in Image.ID:
        if name not in wanted:
            continue
        factory, accept = Image.OPEN[name]
        if accept is not None and not _accepts(accept, prefix):
            continue
        try:
            stream.seek(0)
            image = factory(stream, "")
        except Image.DecompressionBombError as exc:  # Some plugins check while parsing.
            raise _bomb(name, limits) from exc
        except Exception:  # Not this format after all (as in Image.open), or a corrupt header.
            looks_like = looks_like or (name if accept is not None else None)
            continue
        if image.format not in allowed:
            raise _unsupported(image.format, allowed)
        return image
    if looks_like is not None:
        raise InvalidImageError(
            Reason.IMAGE_DECODE_FAILED,
            f"The image looks like {looks_like} but its header is corrupt; "
            "send a complete, valid file.",
        )
    # Name the format if only its magic bytes match; its plugin never runs on the data.
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if accept is not None and _accepts(accept, prefix):
            raise _unsupported(name, allowed)
    raise _unsupported(None, allowed)


def _accepts(accept: Any, prefix: bytes) -> bool:
    try:
        result = accept(prefix)
    except Exception:  # Some checks index past the end of a very short prefix.
        return False
    # A string means "this format, but its codec is not installed".
    return bool(result) and not isinstance(result, str)


def _bomb(image_format: str | None, limits: ImageLimits) -> InvalidImageError:
    return InvalidImageError(
        Reason.IMAGE_TOO_MANY_PIXELS,
        f"The {image_format} image declares more than this server's limit of "
        f"{limits.max_image_pixels} pixels; downscale it before sending.",
    )


def _unsupported(name: str | None, allowed: frozenset[str]) -> InvalidImageError:
    accepted = ", ".join(sorted(allowed))
    what = f"The image format {name} is not accepted" if name else "The image format is unknown"
    return InvalidImageError(Reason.IMAGE_FORMAT_UNSUPPORTED, f"{what}; send one of {accepted}.")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything preprocessing needs, as read from a checkpoint's preprocessor_config.json.

    Two ways to resize: CLIP's (``shortest_edge``: the shortest side to that length, the
    aspect ratio kept, then usually a centre crop) and SigLIP's (``resize_height`` and
    ``resize_width``: straight to that size). ``crop_height`` and ``crop_width`` are the
    size of the pixels the tower takes: the centre crop's, or without one after a resize
    straight to a size, that size.
    """

    shortest_edge: int
    crop_height: int
    crop_width: int
    resample: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resize_height: int = 0
    """Nonzero: resize straight to resize_height x resize_width (SigLIP); shortest_edge is 0."""
    resize_width: int = 0

    @classmethod
    def from_image_processor(cls, processor: Any) -> PreprocessConfig:
        """Read a transformers CLIPImageProcessor(Pil) or SiglipImageProcessor(Pil): the size
        is either ``{'shortest_edge': N}`` or ``{'height': H, 'width': W}``."""
        size = dict(processor.size or {})
        if set(size) == {"shortest_edge"}:
            shortest, height, width = int(size["shortest_edge"]), 0, 0
        elif set(size) == {"height", "width"}:
            shortest, height, width = 0, int(size["height"]), int(size["width"])
        else:
            raise ValueError(
                "size must be {'shortest_edge': N} as in CLIP checkpoints or "
                f"{{'height': H, 'width': W}} as in SigLIP ones, got {size}"
            )
        do_center_crop = bool(processor.do_center_crop)
        crop = dict(processor.crop_size or {})
        if height and not do_center_crop:
            crop = {"height": height, "width": width}
        if "height" not in crop or "width" not in crop:
            raise ValueError(f"crop_size must have height and width, got {crop}")
        resample = processor.resample
        # transformers resizes with bilinear when the config names no filter.
        resample = Image.Resampling.BILINEAR if resample is None else resample
        if not isinstance(resample, int):
            raise ValueError(f"resample must be a PIL.Image.Resampling value, got {resample!r}")
        return cls(
            shortest_edge=shortest,
            crop_height=int(crop["height"]),
            crop_width=int(crop["width"]),
            resample=int(resample),
            rescale_factor=float(processor.rescale_factor),
            mean=_three(processor.image_mean, "image_mean"),
            std=_three(processor.image_std, "image_std"),
            do_resize=bool(processor.do_resize),
            do_center_crop=do_center_crop,
            do_rescale=bool(processor.do_rescale),
            do_normalize=bool(processor.do_normalize),
            do_convert_rgb=bool(processor.do_convert_rgb),
            resize_height=height,
            resize_width=width,
        )

    @classmethod
    def openai_clip(cls, image_size: int = 224) -> PreprocessConfig:
        """The OpenAI CLIP defaults at one resolution, for checkpoints made with random weights."""
        return cls(
            shortest_edge=image_size,
            crop_height=image_size,
            crop_width=image_size,
            resample=int(Image.Resampling.BICUBIC),
            rescale_factor=1 / 255,
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
        )

    @classmethod
    def siglip(cls, image_size: int = 224) -> PreprocessConfig:
        """SigLIP's preprocessing at one resolution (bicubic straight to a square, mean = std =
        0.5), for checkpoints made with random weights."""
        return cls(
            shortest_edge=0,
            crop_height=image_size,
            crop_width=image_size,
            resample=int(Image.Resampling.BICUBIC),
            rescale_factor=1 / 255,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            do_center_crop=False,
            resize_height=image_size,
            resize_width=image_size,
        )

    def size_after_resize(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a ``width`` x ``height`` image once resized, before any crop."""
        if self.resize_height:
            return self.resize_width, self.resize_height
        return resized_size(width, height, self.shortest_edge)


def _three(value: Any, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must have one value per RGB channel, got {value!r}")
    return values[0], values[1], values[2]


class ClipPreprocessor:
    """Turns a decoded PIL image into what the vision tower takes, in two steps.

    ``pixels`` does the geometry (RGB, resize, crop) and yields uint8, four times
    smaller than float32 to queue and to copy to the device; ``normalize`` applies
    the rescale and mean/std through ``lookup_table``, which the encoder also uses on
    the device. ``__call__`` does both, for callers that want float32 at once.
    """

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self.lookup_table = _pixel_lut(config)

    def __call__(self, image: Image.Image) -> FloatArray:
        """Convert to RGB, resize (and centre-crop) as the checkpoint says, rescale, normalise."""
        return self.normalize(self.pixels(image))

    def rgb(self, image: Image.Image) -> UInt8Array:
        """The image in RGB, at its full size, as (H, W, 3) uint8: what a device that resizes
        and crops itself (runtime.device_resize) takes."""
        rgb = _to_rgb(image) if self.config.do_convert_rgb else _plain_rgb(image)
        return np.asarray(rgb)

    def pixels(self, image: Image.Image) -> UInt8Array:
        """The RGB, resized and cropped image as a (3, crop_h, crop_w) uint8 array."""
        config = self.config
        rgb = _to_rgb(image) if config.do_convert_rgb else _plain_rgb(image)
        if config.do_resize:
            rgb = self._resize_and_crop(rgb)
        elif config.do_center_crop:
            rgb = _center_crop(rgb, config.crop_width, config.crop_height)
        return np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))

    def normalize(self, pixels: UInt8Array) -> FloatArray:
        """Rescale and normalise (3, H, W) uint8 pixels to float32, exactly as transformers does."""
        out = np.empty(pixels.shape, dtype=np.float32)
        for channel in range(3):
            # mode="clip" lets numpy write straight into `out` (bytes never exceed the table).
            np.take(self.lookup_table[channel], pixels[channel], out=out[channel], mode="clip")
        return out

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        config = self.config
        width, height = image.size
        new_width, new_height = config.size_after_resize(width, height)
        crop_w, crop_h = config.crop_width, config.crop_height
        if not config.do_center_crop or new_width * new_height <= MAX_RESIZED_PIXELS:
            if (new_width, new_height) != image.size:
                image = image.resize((new_width, new_height), config.resample)
            return _center_crop(image, crop_w, crop_h) if config.do_center_crop else image
        # Resize only the part of the image that survives the crop.
        left, top = (new_width - crop_w) // 2, (new_height - crop_h) // 2
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + crop_w, new_width), min(top + crop_h, new_height)
        sx, sy = width / new_width, height / new_height
        box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
        part = image.resize((x1 - x0, y1 - y0), config.resample, box=box)
        return part.crop((left - x0, top - y0, left - x0 + crop_w, top - y0 + crop_h))


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size, with its float arithmetic and truncation."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def decode_working_set(probed: ProbedImage, config: PreprocessConfig) -> int:
    """An upper bound on the bytes decoding and preprocessing ``probed`` holds at its peak.

    Counted from the header, before decoding, as the pipeline above allocates: the decoded
    image (PIL stores 1, 2 or 4 bytes per pixel), then the largest of the full-size copies
    that follow it one at a time (an EXIF rotation, an un-premultiplied copy, the RGB copy),
    the copies of one strip while transparency is composited onto white, the buffers of
    decoders that keep their own, then the resize's intermediate. Measured peaks stay under
    it (bench/decode_peak.py).
    """
    image = probed.image
    stored = _STORED_BYTES.get(probed.mode, 4)
    width, height = probed.width, probed.height
    strip = 0
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # The RGB result, filled strip by strip; each strip holds a copy of its part of the
        # image, a white canvas, an RGBA copy and the composite (or, later, its RGB).
        strip = min(height, max(1, _STRIP_PIXELS // width)) * width * (stored + 12)
    converted = 4 if probed.mode != "RGB" or strip else 0
    rotated = stored if _may_rotate(image) else 0
    per_pixel = stored + max(converted, rotated, 4 if probed.mode in _UNPREMULTIPLIED else 0)
    per_pixel += _DECODER_BYTES.get(probed.format, 0)
    out_w, out_h = config.size_after_resize(width, height)
    if config.do_center_crop and out_w * out_h > MAX_RESIZED_PIXELS:
        out_w, out_h = config.crop_width, config.crop_height
    # PIL resamples horizontally first, into out_w x (the source rows it needs), then vertically.
    resized = 4 * out_w * (max(height, width) + out_h)
    # Decoder buffers, the crop's arrays, allocator slack: measured under a quarter byte a pixel.
    slack = probed.pixels // 4 + (256 << 10)
    return probed.pixels * per_pixel + strip + resized + slack


@functools.cache
def _reference_headers() -> dict[str, ProbedImage]:
    """1x1 images of the cheapest and the dearest kind to decode, parsed: an opaque RGB JPEG
    (4 bytes a pixel) and a WebP with transparency (20: its decoder's canvas, the RGBA
    image, the composite onto white)."""
    limits = ImageLimits()
    made = {}
    for name, image, image_format in (
        ("cheapest", Image.new("RGB", (1, 1)), "JPEG"),
        ("dearest", Image.new("RGBA", (1, 1), (0, 0, 0, 0)), "WEBP"),
    ):
        buffer = io.BytesIO()
        image.save(buffer, image_format)
        made[name] = probe_image(buffer.getvalue(), limits)
    return made


def largest_image_cost(pixels: int, config: PreprocessConfig, kind: str, encoded_bytes: int) -> int:
    """What admitting a square image of ``pixels`` pixels in a file of ``encoded_bytes`` costs
    (ItemCost.total: the file twice, the crop, the decode), for the ``cheapest`` or the
    ``dearest`` kind of image to decode."""
    side = max(1, math.isqrt(pixels))
    probed = dataclasses.replace(_reference_headers()[kind], width=side, height=side)
    return 2 * encoded_bytes + decode_working_set(probed, config) + output_bytes(probed, config)


def output_bytes(probed: ProbedImage, config: PreprocessConfig) -> int:
    """The size of the uint8 (3, H, W) array preprocessing ``probed`` yields."""
    if config.do_center_crop:
        return 3 * config.crop_width * config.crop_height
    if config.do_resize:
        width, height = config.size_after_resize(probed.width, probed.height)
        return 3 * width * height
    return 3 * probed.pixels


# Pixels per strip when compositing transparency onto white (see _to_rgb): 16 MiB at most
# of temporary copies, whatever the image's size.
_STRIP_PIXELS = 1 << 20

# Full-size buffers some decoders hold beside the image: libwebp's RGBA canvas and the copy
# PIL reads it from (measured 12 B/px), libtiff's decoded strip or tile (up to 4 B/px).
_DECODER_BYTES = {"WEBP": 12, "TIFF": 4}

# Bytes per pixel as PIL stores each mode in memory (every multi-band mode takes four).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def _may_rotate(image: Image.Image) -> bool:
    """Whether EXIF orientation may make a rotated copy; known from the header for JPEG only.

    Other formats may carry their EXIF after the pixels (PNG's eXIf chunk), so reading it
    there would decode the image: they are assumed to rotate.
    """
    if image.format not in ("JPEG", "MPO"):
        return True
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # A corrupt EXIF block fails later, in decoding; price the worst case.
        return True
    return orientation not in (None, 1)


def _center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """transformers' center_crop: PIL fills outside the image with zeros, as its padding does."""
    left, top = (image.width - width) // 2, (image.height - height) // 2
    if (left, top, width, height) == (0, 0, image.width, image.height):
        return image
    return image.crop((left, top, left + width, top + height))


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: any transparency is composited onto white.

    transformers composites the whole image at once, which holds a white canvas, an RGBA
    copy and the composite beside the image (12 bytes a pixel more); every step is per
    pixel, so doing it in horizontal strips gives the same bytes with one RGB copy instead.
    """
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return _plain_rgb(image)
    width, height = image.size
    rows = max(1, _STRIP_PIXELS // width)
    if rows >= height:
        return _composite_on_white(image)
    rgb = Image.new("RGB", image.size)
    for top in range(0, height, rows):
        # crop() keeps the palette and info["transparency"], so each strip converts alike.
        strip = image.crop((0, top, width, min(top + rows, height)))
        rgb.paste(_composite_on_white(strip), (0, top))
    return rgb


def _composite_on_white(image: Image.Image) -> Image.Image:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def _plain_rgb(image: Image.Image) -> Image.Image:
    # The tower takes three channels even when a config says do_convert_rgb=false.
    return image if image.mode == "RGB" else image.convert("RGB")


def _pixel_lut(config: PreprocessConfig) -> FloatArray:
    """The (3, 256) float32 result of rescale + normalise for every byte value, per channel.

    The arithmetic is transformers': multiply in float64 and cast to float32, then subtract
    and divide in float32, so a table lookup gives exactly the values it computes per pixel.
    """
    values = np.arange(256, dtype=np.float64)
    if config.do_rescale:
        values = values * config.rescale_factor
    table = np.broadcast_to(values.astype(np.float32), (3, 256))
    if config.do_normalize:
        mean = np.array(config.mean, dtype=np.float32)[:, None]
        std = np.array(config.std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return np.ascontiguousarray(table, dtype=np.float32)
