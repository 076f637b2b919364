"""Decoding under operator limits, and parity with transformers' Pillow-backed processors.

The reference is transformers itself, fed the same decoded image: CLIPImageProcessorPil
(shortest side, centre crop) or SiglipImageProcessorPil (straight to H x W). Our pixels
must equal its pixels, and a tiny CLIP vision model must embed both the same, on real
photographs and on generated images of every pixel mode, size and aspect ratio that
reaches the server.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import ExifTags, Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    SiglipImageProcessorPil,
)

from clipvision.server.config.limits import ImageLimits
from clipvision.server.errors import InvalidImageError, Reason
from clipvision.server.runtime.preprocess import (
    ClipPreprocessor,
    PreprocessConfig,
    decode_image,
)

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(path.name for path in DATA.iterdir() if path.suffix in {".png", ".jpg"})
LIMITS = ImageLimits()

# preprocessor_config.json contents, as checkpoints ship them ({} is the OpenAI default).
CONFIGS: dict[str, dict[str, Any]] = {
    "openai-224": {},
    "openai-336": {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
    "small-30": {
        "size": {"shortest_edge": 30},
        "crop_size": {"height": 30, "width": 30},
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3],
    },
    # Crop larger than the resized image (zero padding), not square, bilinear, odd rescale.
    "padded-bilinear": {
        "size": {"shortest_edge": 24},
        "crop_size": {"height": 32, "width": 41},
        "resample": Image.Resampling.BILINEAR,
        "rescale_factor": 1 / 127.5,
        "image_mean": [1.0, 1.0, 1.0],
        "image_std": [1.0, 1.0, 1.0],
    },
    "unnormalised-lanczos": {
        "size": {"shortest_edge": 64},
        "crop_size": {"height": 56, "width": 48},
        "resample": Image.Resampling.LANCZOS,
        "do_normalize": False,
    },
    # SiglipImageProcessorPil's (straight to H x W, no crop): its defaults, as
    # google/siglip-base-patch16-224 ships them, and a small oblong bilinear one.
    "siglip-224": {},
    "siglip-oblong": {
        "size": {"height": 30, "width": 41},
        "resample": Image.Resampling.BILINEAR,
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3],
    },
}

SIZES = [
    (1, 1),
    (7, 500),
    (500, 7),
    (223, 224),
    (224, 224),
    (225, 300),
    (1920, 1080),
    (640, 480),
    (480, 640),
    (1000, 100),
    (31, 29),
]


@cache
def reference(name: str) -> Any:
    """transformers' Pillow-backed processor for one config: SigLIP's or CLIP's."""
    kind = SiglipImageProcessorPil if name.startswith("siglip") else CLIPImageProcessorPil
    return kind(**CONFIGS[name])


@cache
def ours(name: str) -> ClipPreprocessor:
    """Our preprocessor, configured from the reference processor as a checkpoint would be."""
    return ClipPreprocessor(PreprocessConfig.from_image_processor(reference(name)))


def reference_pixels(image: Image.Image, name: str) -> npt.NDArray[np.float32]:
    pixels: npt.NDArray[np.float32] = reference(name)(images=image, return_tensors="np")[
        "pixel_values"
    ][0]
    return pixels.astype(np.float32)


def assert_parity(image: Image.Image, name: str) -> None:
    expected = reference_pixels(image, name)
    got = ours(name)(image)
    assert got.dtype == np.float32
    assert got.flags.c_contiguous
    config = ours(name).config
    assert got.shape == expected.shape == (3, config.crop_height, config.crop_width)
    assert np.abs(got - expected).max() <= 1e-6


@cache
def photo_bytes(name: str) -> bytes:
    return (DATA / name).read_bytes()


@cache
def astronaut(size: tuple[int, int]) -> Image.Image:
    """A real photograph at any size, so that generated images have natural content."""
    return decode_image(photo_bytes("astronaut.png"), LIMITS).resize(size, Image.Resampling.BOX)


def encode(image: Image.Image, image_format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def roundtrip(image: Image.Image, image_format: str, **params: Any) -> Image.Image:
    """Encode and decode through decode_image, as a request's bytes would travel."""
    return decode_image(encode(image, image_format, **params), LIMITS)


def with_alpha(image: Image.Image) -> Image.Image:
    """Add a real alpha channel: a gradient from fully transparent to opaque, left to right."""
    alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
    result = image.copy()
    result.putalpha(Image.fromarray(alpha))
    return result


def sixteen_bit(image: Image.Image, scale: int) -> Image.Image:
    grey = np.asarray(image.convert("L"), dtype=np.uint16) * scale
    return roundtrip(Image.fromarray(grey), "PNG")


# Every pixel mode an accepted format decodes to, made from a real photograph.
MODES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "RGB": lambda rgb: rgb,
    "RGBA": lambda rgb: roundtrip(with_alpha(rgb), "PNG"),
    "L": lambda rgb: roundtrip(rgb.convert("L"), "PNG"),
    "LA": lambda rgb: roundtrip(with_alpha(rgb.convert("L")), "PNG"),
    "P": lambda rgb: roundtrip(rgb.quantize(64), "PNG"),
    "P-transparency": lambda rgb: roundtrip(rgb.quantize(64), "PNG", transparency=0),
    "P-GIF": lambda rgb: roundtrip(rgb, "GIF"),
    "RGB-transparency": lambda rgb: roundtrip(rgb, "PNG", transparency=rgb.getpixel((0, 0))),
    "1": lambda rgb: roundtrip(rgb.convert("1"), "PNG"),
    "CMYK-JPEG": lambda rgb: roundtrip(rgb.convert("CMYK"), "JPEG", quality=90),
    "I;16-PNG": lambda rgb: sixteen_bit(rgb, 257),
    "I;16-PNG-low": lambda rgb: sixteen_bit(rgb, 1),
    "F-TIFF": lambda rgb: roundtrip(
        Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32)), "TIFF"
    ),
    "LAB-TIFF": lambda rgb: roundtrip(rgb.convert("LAB"), "TIFF"),
    "RGBA-WEBP": lambda rgb: roundtrip(with_alpha(rgb), "WEBP", lossless=True),
}


def reason_of(data: bytes, limits: ImageLimits = LIMITS) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data, limits)
    return caught.value


def decode_or_error(data: bytes) -> Image.Image | InvalidImageError:
    try:
        return decode_image(data, LIMITS)
    except InvalidImageError as error:
        return error


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds no valid pixel data: only a header check refuses it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"junk")
        + chunk(b"IEND", b"")
    )


# -- parity of the pixel tensor -------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("photo", PHOTOS)
def test_photographs_match_transformers(photo: str, config: str) -> None:
    assert_parity(decode_image(photo_bytes(photo), LIMITS), config)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_every_size_matches_transformers(size: tuple[int, int], config: str) -> None:
    assert_parity(astronaut(size), config)


@pytest.mark.parametrize("config", ["openai-224", "padded-bilinear"])
@pytest.mark.parametrize("size", [(1, 1), (7, 500), (225, 300), (640, 480)], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_every_pixel_mode_matches_transformers(
    mode: str, size: tuple[int, int], config: str
) -> None:
    assert_parity(MODES[mode](astronaut(size)), config)


def test_modes_are_what_they_claim() -> None:
    made = {name: build(astronaut((16, 12))) for name, build in MODES.items()}
    assert {name: image.mode for name, image in made.items()} == {
        "RGB": "RGB",
        "RGBA": "RGBA",
        "L": "L",
        "LA": "LA",
        "P": "P",
        "P-transparency": "P",
        "P-GIF": "P",
        "RGB-transparency": "RGB",
        "1": "1",
        "CMYK-JPEG": "CMYK",
        "I;16-PNG": "I;16",
        "I;16-PNG-low": "I;16",
        "F-TIFF": "F",
        "LAB-TIFF": "LAB",
        "RGBA-WEBP": "RGBA",
    }
    assert made["P-transparency"].info["transparency"] == 0
    assert made["RGB-transparency"].info["transparency"] is not None


def test_extreme_aspect_ratio_stays_close_without_a_huge_intermediate() -> None:
    # 2x1200 resizes to 224x134400 in transformers (120 MB); we resize only what is kept.
    strip = astronaut((512, 512)).crop((255, 0, 257, 512)).resize((2, 1200))
    expected = reference_pixels(strip, "openai-224")
    got = ours("openai-224")(strip)
    levels = np.abs(got - expected) * np.array(ours("openai-224").config.std)[:, None, None] * 255
    assert levels.max() <= 2.01
    assert levels.mean() <= 0.5
    # A 1x4,000,000 strip would need 224x896,000,000 pixels the exact way.
    assert ours("openai-224")(Image.new("RGB", (1, 4_000_000), "red")).shape == (3, 224, 224)


# -- parity of the embedding ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    """A CLIP vision tower and projection with fixed random weights, on 30 px images."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=30,
        patch_size=6,
        projection_dim=16,
    )
    model: torch.nn.Module = CLIPVisionModelWithProjection(config)
    return model.eval()


def test_embeddings_match_transformers(tiny_model: torch.nn.Module) -> None:
    images = [decode_image(photo_bytes(photo), LIMITS) for photo in PHOTOS]
    images += [MODES[mode](astronaut((225, 300))) for mode in ("RGBA", "P-transparency", "L")]
    with torch.inference_mode():
        got = tiny_model(
            pixel_values=torch.from_numpy(np.stack([ours("small-30")(i) for i in images]))
        )
        expected = tiny_model(
            pixel_values=torch.from_numpy(
                np.stack([reference_pixels(i, "small-30") for i in images])
            )
        )
    assert (got.image_embeds - expected.image_embeds).abs().max().item() <= 1e-5


# -- configuration --------------------------------------------------------------------------


def test_openai_defaults_are_transformers_defaults() -> None:
    assert PreprocessConfig.from_image_processor(reference("openai-224")) == (
        PreprocessConfig.openai_clip()
    )
    assert PreprocessConfig.from_image_processor(reference("openai-336")) == (
        PreprocessConfig.openai_clip(336)
    )


def test_config_is_read_from_a_saved_checkpoint(tmp_path: Path) -> None:
    reference("small-30").save_pretrained(tmp_path)
    loaded = PreprocessConfig.from_image_processor(CLIPImageProcessorPil.from_pretrained(tmp_path))
    assert loaded == ours("small-30").config
    assert loaded.mean == (0.5, 0.4, 0.3)


def test_siglip_defaults_are_transformers_defaults() -> None:
    config = PreprocessConfig.from_image_processor(reference("siglip-224"))
    assert config == PreprocessConfig.siglip(224)
    assert (config.shortest_edge, config.resize_height, config.resize_width) == (0, 224, 224)
    assert not config.do_center_crop
    assert config.size_after_resize(640, 480) == (224, 224)


def test_a_siglip_config_is_read_from_a_saved_checkpoint(tmp_path: Path) -> None:
    reference("siglip-oblong").save_pretrained(tmp_path)
    loaded = PreprocessConfig.from_image_processor(
        SiglipImageProcessorPil.from_pretrained(tmp_path)
    )
    assert loaded == ours("siglip-oblong").config
    assert (loaded.crop_height, loaded.crop_width) == (30, 41)


def test_size_configs_of_another_shape_are_refused() -> None:
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224, "longest_edge": 448})
    with pytest.raises(ValueError, match="shortest_edge"):
        PreprocessConfig.from_image_processor(processor)


# -- decoding -------------------------------------------------------------------------------


def test_exif_orientation_is_applied_first() -> None:
    image = Image.new("RGB", (60, 40), "white")
    image.paste((255, 0, 0), (0, 0, 20, 10))  # a red block in the top-left corner
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # the camera was turned 90 degrees clockwise
    data = encode(image, "JPEG", quality=95, exif=exif)

    decoded = decode_image(data, LIMITS)

    assert decoded.size == (40, 60)
    expected = Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))
    top_right = np.asarray(decoded, dtype=np.int16)[8, 35]
    assert np.abs(top_right - (255, 0, 0)).max() < 40  # the red block turned with the camera


def frames(image_format: str, **params: Any) -> bytes:
    first, second = Image.new("RGB", (32, 24), (255, 0, 0)), Image.new("RGB", (32, 24), (0, 0, 255))
    return encode(first, image_format, save_all=True, append_images=[second], **params)


@pytest.mark.parametrize(
    ("image_format", "params"),
    [
        ("GIF", {"duration": 100, "loop": 0}),
        ("WEBP", {"lossless": True}),
        ("TIFF", {}),
        ("MPO", {}),
    ],
)
def test_animations_and_multi_page_files_give_the_first_frame(
    image_format: str, params: dict[str, Any]
) -> None:
    data = frames(image_format, **params)
    decoded = decode_image(data, LIMITS)
    assert decoded.format == image_format
    assert getattr(decoded, "n_frames", 1) == 2
    centre = np.asarray(decoded.convert("RGB"), dtype=np.int16)[12, 16]
    assert np.abs(centre - (255, 0, 0)).max() < 16  # red, not the blue second frame


def test_empty_bytes_are_refused() -> None:
    assert reason_of(b"").reason is Reason.IMAGE_EMPTY


def test_too_many_bytes_are_refused_naming_the_limit() -> None:
    data = photo_bytes("rocket.jpg")
    error = reason_of(data, ImageLimits(max_image_bytes=100_000))
    assert error.reason is Reason.IMAGE_TOO_LARGE
    assert "100000" in error.message
    assert str(len(data)) in error.message
    assert decode_image(data, ImageLimits(max_image_bytes=len(data))).size == (640, 427)


@pytest.mark.parametrize("photo", ["rocket.jpg", "coffee.png", "hubble_deep_field.jpg"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_files_fail_to_decode(photo: str, keep: float) -> None:
    data = photo_bytes(photo)
    error = reason_of(data[: int(len(data) * keep)])
    assert error.reason is Reason.IMAGE_DECODE_FAILED
    assert "truncated or corrupt" in error.message
    assert "PIL" not in error.message
    assert "Error" not in error.message


def test_a_corrupt_header_fails_to_decode() -> None:
    error = reason_of(photo_bytes("coffee.png")[:12])
    assert error.reason is Reason.IMAGE_DECODE_FAILED
    assert "PNG" in error.message


@pytest.mark.parametrize("seed", range(5))
def test_garbage_is_an_unsupported_format(seed: int) -> None:
    garbage = np.random.default_rng(seed).bytes(1000)
    error = reason_of(garbage)
    assert error.reason is Reason.IMAGE_FORMAT_UNSUPPORTED
    assert "BMP, GIF, JPEG, MPO, PNG, TIFF, WEBP" in error.message


def test_text_is_an_unsupported_format() -> None:
    assert reason_of(b"hello, world").reason is Reason.IMAGE_FORMAT_UNSUPPORTED


def test_a_format_the_operator_did_not_allow_is_refused() -> None:
    error = reason_of(photo_bytes("rocket.jpg"), ImageLimits(allowed_formats=frozenset({"PNG"})))
    assert error.reason is Reason.IMAGE_FORMAT_UNSUPPORTED
    assert "JPEG is not accepted" in error.message
    assert "send one of PNG" in error.message


@pytest.mark.parametrize("image_format", ["ICO", "PPM", "TGA", "PCX"])
def test_formats_pillow_reads_but_we_do_not_list_are_refused(image_format: str) -> None:
    error = reason_of(encode(astronaut((32, 32)), image_format))
    assert error.reason is Reason.IMAGE_FORMAT_UNSUPPORTED
    assert "BMP, GIF, JPEG, MPO, PNG, TIFF, WEBP" in error.message


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000), (6_400, 6_251)])
def test_pixel_bombs_are_refused_from_the_header_without_warnings(size: tuple[int, int]) -> None:
    # The data holds no valid pixels, so only a check before decoding can give this reason;
    # 10000x10000 is over Pillow's own warning threshold (warnings are errors in tests).
    error = reason_of(png_header_only(*size))
    assert error.reason is Reason.IMAGE_TOO_MANY_PIXELS
    assert "40000000" in error.message
    assert str(size[0] * size[1]) in error.message


def test_pixel_limit_is_inclusive() -> None:
    limits = ImageLimits(max_image_pixels=1000)
    assert decode_image(encode(astronaut((40, 25)), "PNG"), limits).size == (40, 25)
    assert reason_of(png_header_only(40, 26), limits).reason is Reason.IMAGE_TOO_MANY_PIXELS


def test_images_below_the_minimum_side_are_refused() -> None:
    limits = ImageLimits(min_image_side=8)
    error = reason_of(encode(astronaut((7, 500)), "PNG"), limits)
    assert error.reason is Reason.IMAGE_TOO_SMALL
    assert "7x500" in error.message
    assert "minimum of 8 pixels" in error.message
    assert decode_image(encode(astronaut((8, 500)), "PNG"), limits).size == (8, 500)


def test_any_damaged_file_decodes_or_fails_cleanly() -> None:
    # Flipped bytes and cuts in every accepted format: InvalidImageError or a usable image.
    rng = np.random.default_rng(0)
    small = astronaut((48, 40))
    originals = [encode(small, name) for name in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")]
    originals.append(encode(with_alpha(small), "PNG"))
    preprocess = ours("small-30")
    for _ in range(600):
        data = bytearray(originals[int(rng.integers(len(originals)))])
        for position in rng.integers(len(data), size=int(rng.integers(1, 8))):
            data[position] = int(rng.integers(256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        outcome = decode_or_error(bytes(data))
        if isinstance(outcome, InvalidImageError):
            assert outcome.message.endswith(".")
        else:
            assert np.isfinite(preprocess(outcome)).all()
