"""Resizing and cropping on the model's device give Pillow's bytes exactly.

On a GPU the server resizes and crops images on the device (runtime.device_resize);
the same code runs on CPU torch, so these tests prove it here, byte for byte,
against the CPU path (ClipPreprocessor.pixels, itself identical to transformers'
CLIPImageProcessorPil: tests/test_preprocess.py): the photographs in every pixel
mode and EXIF orientation, every size of that file's list, extreme aspect ratios,
images smaller than the crop, and random sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipvision.server.config.settings import Settings
from clipvision.server.runtime import backends, device_resize, models
from clipvision.server.runtime.device_resize import DeviceGeometry, plan_resize
from clipvision.server.runtime.gpu_decode import EncodedJpeg, GpuJpegDecoder
from clipvision.server.runtime.preprocess import (
    ClipPreprocessor,
    PreprocessConfig,
    decode_image,
)
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import running_server, settings_with
from tests.processes import server_process
from tests.test_preprocess import (
    CONFIGS,
    LIMITS,
    MODES,
    PHOTOS,
    SIZES,
    astronaut,
    encode,
    ours,
    photo_bytes,
)

EXACT_CONFIGS = [name for name in CONFIGS if device_resize.supports(ours(name).config)]
CPU = torch.device("cpu")


def on_device(preprocessor: ClipPreprocessor, image: Image.Image) -> np.ndarray:
    """What the device path computes: the CPU decodes to RGB, the device resizes and crops."""
    rgb = torch.from_numpy(np.array(preprocessor.rgb(image))).permute(2, 0, 1)
    return DeviceGeometry(preprocessor.config).pixels(rgb).numpy()


def assert_same_bytes(image: Image.Image, name: str) -> None:
    preprocessor = ours(name)
    expected = preprocessor.pixels(image)
    got = on_device(preprocessor, image)
    assert got.shape == expected.shape
    assert got.dtype == np.uint8
    differing = int(np.count_nonzero(got != expected))
    assert differing == 0, f"{differing} of {expected.size} bytes differ"


def test_the_exact_configs_cover_bicubic_and_bilinear() -> None:
    filters = {ours(name).config.resample for name in EXACT_CONFIGS}
    assert filters == {Image.Resampling.BICUBIC, Image.Resampling.BILINEAR}
    assert "unnormalised-lanczos" not in EXACT_CONFIGS


@pytest.mark.parametrize("config", EXACT_CONFIGS)
@pytest.mark.parametrize("photo", PHOTOS)
def test_photographs_match_pillow(photo: str, config: str) -> None:
    assert_same_bytes(decode_image(photo_bytes(photo), LIMITS), config)


@pytest.mark.parametrize("config", EXACT_CONFIGS)
@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_every_size_matches_pillow(size: tuple[int, int], config: str) -> None:
    assert_same_bytes(astronaut(size), config)


@pytest.mark.parametrize("mode", MODES)
def test_every_pixel_mode_matches_pillow(mode: str) -> None:
    # RGBA composited onto white, palettes, 16-bit, CMYK...: converted on the CPU, then resized.
    for size in [(7, 500), (225, 300), (640, 480)]:
        assert_same_bytes(MODES[mode](astronaut(size)), "openai-224")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_match_pillow(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(astronaut((300, 200)), "JPEG", exif=exif, quality=90)
    image = decode_image(data, LIMITS)
    assert image.size == ((200, 300) if orientation >= 5 else (300, 200))
    assert_same_bytes(image, "openai-224")


@pytest.mark.parametrize(
    "size", [(2, 1200), (1200, 2), (1, 4000), (3, 90_000)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_extreme_aspect_ratios_take_the_box_path_and_match_pillow(size: tuple[int, int]) -> None:
    # Over 16 megapixels once resized: both paths resize only the part the crop keeps.
    width, height = size
    image = Image.fromarray(
        np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)
    )
    assert_same_bytes(image, "openai-224")


def test_images_smaller_than_the_crop_are_padded_with_zeros_as_pillow_pads() -> None:
    for size in [(1, 1), (5, 3), (20, 17)]:
        assert_same_bytes(astronaut(size), "padded-bilinear")
        got = on_device(ours("padded-bilinear"), astronaut(size))
        assert got.shape == (3, 32, 41)


def test_both_orders_of_the_two_passes_are_exercised() -> None:
    # Pillow 13 resizes vertically first when the height shrinks much more than the width.
    tall = plan_resize(300, 4000, 224, 2986, int(Image.Resampling.BICUBIC))
    wide = plan_resize(4000, 300, 2986, 224, int(Image.Resampling.BICUBIC))
    assert tall.horizontal is not None
    assert wide.horizontal is not None
    assert tall.vertical_first != wide.vertical_first or not device_resize._VERTICAL_FIRST
    for size in [(300, 4000), (4000, 300)]:
        assert_same_bytes(astronaut(size), "openai-224")


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 500),
    height=st.integers(1, 500),
    seed=st.integers(0, 2**32 - 1),
    config=st.sampled_from(EXACT_CONFIGS),
)
def test_random_sizes_and_contents_match_pillow(
    width: int, height: int, seed: int, config: str
) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    assert_same_bytes(Image.fromarray(pixels), config)


def test_box_resizing_matches_pillow_for_one_pass_and_both() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (1200, 40, 3), np.uint8)
    for out_size, box in [
        ((224, 224), (0.0, 599.0, 2.0, 601.0)),
        ((40, 100), (0.0, 100.5, 40.0, 700.25)),
        ((13, 7), (3.25, 10.0, 33.0, 1190.0)),
        ((20, 30), (10.0, 30.0, 30.0, 60.0)),  # whole pixels, same size: Pillow crops
    ]:
        expected = np.asarray(
            Image.fromarray(image).resize(out_size, Image.Resampling.BICUBIC, box=box)
        )
        plan = plan_resize(40, 1200, *out_size, int(Image.Resampling.BICUBIC), box)
        got = device_resize.resample(torch.from_numpy(image).permute(2, 0, 1), plan)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), (out_size, box)


def test_filters_that_are_not_exact_on_a_device_are_refused() -> None:
    for resample in (Image.Resampling.LANCZOS, Image.Resampling.HAMMING, Image.Resampling.NEAREST):
        config = PreprocessConfig(224, 224, 224, int(resample), 1 / 255, (0.5,) * 3, (0.5,) * 3)
        assert not device_resize.supports(config)
        with pytest.raises(ValueError, match="not exact"):
            DeviceGeometry(config)


def test_siglip_resizes_straight_to_its_size_on_the_device_as_pillow_does() -> None:
    # SigLIP's geometry (no shortest edge, no crop): every size lands on 224 x 224, squashed.
    assert "siglip-224" in EXACT_CONFIGS
    assert device_resize.self_check(PreprocessConfig.siglip(224), CPU) == 0
    for size in [(640, 480), (480, 640), (2, 1200), (4000, 300), (224, 224), (9, 7)]:
        assert_same_bytes(astronaut(size), "siglip-224")
        assert on_device(ours("siglip-224"), astronaut(size)).shape == (3, 224, 224)


def test_the_start_up_check_finds_a_resize_that_differs_from_pillow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = PreprocessConfig.openai_clip(224)
    assert device_resize.self_check(config, CPU) == 0
    # The pass order of an older Pillow: the check must see it, and the CPU path then serves.
    monkeypatch.setattr(device_resize, "_VERTICAL_FIRST", not device_resize._VERTICAL_FIRST)
    assert device_resize.self_check(config, CPU) > 0


async def test_a_server_resizing_on_the_device_answers_as_one_resizing_with_pillow(
    base_settings: Settings, clip_dir: Path
) -> None:
    photos = [pb.Image(content=photo_bytes(name)) for name in PHOTOS]
    vectors = {}
    for mode in ("off", "on"):
        settings = settings_with(
            base_settings, device_preprocess=mode, max_batch_size=16, backend="torch"
        )
        async with running_server(settings) as (server, channel):
            stub = pb_grpc.EmbeddingServiceStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            assert info.models[0].preprocessing.resize_device == (
                "pillow" if mode == "off" else "cpu"
            )
            reply = await stub.EmbedImages(
                pb.EmbedImagesRequest(images=photos, normalize=False), timeout=60
            )
            errors = [r.error.message for r in reply.results if r.HasField("error")]
            assert errors == []
            vectors[mode] = np.array([result.embedding.values for result in reply.results])
            assert server.registry.budget.used == 0
    assert vectors["on"].shape == (len(PHOTOS), 16)
    np.testing.assert_allclose(vectors["on"], vectors["off"], rtol=0, atol=1e-6)


def test_an_unexact_filter_keeps_pillow_when_the_device_is_asked_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lanczos = int(Image.Resampling.LANCZOS)
    config = PreprocessConfig(32, 32, 32, lanczos, 1 / 255, (0.5,) * 3, (0.5,) * 3)
    checkpoint = type("Checkpoint", (), {"device": CPU, "preprocess": config})()
    assert not backends.prepare_device_preprocess("m", checkpoint, "on")
    assert "not reproduced exactly" in caplog.text
    assert not backends.prepare_device_preprocess("m", checkpoint, "auto")


# -- decoding on the GPU (--gpu-decode) ---------------------------------------------------------


class PillowAsGpu(GpuJpegDecoder):
    """Stands in for nvJPEG where there is no GPU: decodes with Pillow (so exactly), and
    refuses what a test names, as nvJPEG refuses some files. It tests the plumbing, not nvJPEG."""

    def __init__(self, device: torch.device, refuse: bytes = b"") -> None:
        self.device = device
        self.refuse = refuse
        self.batches: list[int] = []

    def decode(self, jpegs: list[EncodedJpeg]) -> list[torch.Tensor | None]:
        self.batches.append(len(jpegs))
        outcomes: list[torch.Tensor | None] = []
        for jpeg in jpegs:
            if self.refuse and self.refuse in jpeg.data:
                outcomes.append(None)
                continue
            rgb = ClipPreprocessor(PreprocessConfig.openai_clip()).rgb(
                decode_image(jpeg.data, LIMITS)
            )
            outcomes.append(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
        return outcomes


async def test_gpu_decode_is_refused_at_start_without_cuda(clip_dir: Path) -> None:
    async with server_process(
        "--model", f"tiny={clip_dir}", "--device", "cpu", "--gpu-decode"
    ) as server:
        code, log = await server.finish()
    assert code == 1
    assert "--gpu-decode needs the model on a CUDA device; it runs on cpu" in log
    assert "Traceback" not in log


async def test_jpegs_go_to_the_gpu_decoder_and_the_rest_and_its_refusals_to_pillow(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = encode(astronaut((300, 200)), "JPEG", quality=90, comment=b"refuse-me")
    truncated = photo_bytes("rocket.jpg")[:20_000]
    cmyk = encode(astronaut((120, 90)).convert("CMYK"), "JPEG", quality=90)
    images = [
        photo_bytes("rocket.jpg"),
        photo_bytes("chelsea.png"),
        refused,
        cmyk,
        truncated,
        photo_bytes("hubble_deep_field.jpg"),
    ]
    fake = PillowAsGpu(CPU, refuse=b"refuse-me")
    monkeypatch.setattr(models, "GpuJpegDecoder", lambda device: fake)
    answers = {}
    for gpu in (False, True):
        settings = settings_with(
            base_settings, device_preprocess="on", gpu_decode=gpu, backend="torch"
        )
        async with running_server(settings) as (server, channel):
            stub = pb_grpc.EmbeddingServiceStub(channel)
            request = pb.EmbedImagesRequest(
                images=[pb.Image(content=data) for data in images], normalize=False
            )
            reply = await stub.EmbedImages(request, timeout=60)
            answers[gpu] = reply.results
            assert server.registry.budget.used == 0
    # The two JPEGs it takes went to the "GPU" (the CMYK one and the PNG did not).
    assert sum(fake.batches) >= 3
    for plain, on_gpu in zip(answers[False], answers[True], strict=True):
        assert plain.WhichOneof("result") == on_gpu.WhichOneof("result")
        if plain.HasField("error"):
            assert on_gpu.error.reason == plain.error.reason == "IMAGE_DECODE_FAILED"
        else:
            np.testing.assert_allclose(
                on_gpu.embedding.values, plain.embedding.values, rtol=0, atol=1e-6
            )
    assert [r.WhichOneof("result") for r in answers[True]] == [
        "embedding",
        "embedding",
        "embedding",
        "embedding",
        "error",
        "embedding",
    ]
