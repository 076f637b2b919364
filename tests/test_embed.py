"""EmbedImage, EmbedImages, EmbedImageStream and GetModelInfo against a real server."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPVisionModelWithProjection

from clipvision.v1 import embedding_service_pb2 as pb
from tests.conftest import encode, photo_bytes

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub


def reference_features(directory: Path, image: Image.Image) -> np.ndarray:
    """What transformers itself computes for a decoded image (get_image_features)."""
    processor = CLIPImageProcessorPil.from_pretrained(directory)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    config_type = (directory / "config.json").read_text()
    with torch.inference_mode():
        if '"model_type": "clip"' in config_type:
            output = (
                CLIPModel.from_pretrained(directory).eval().get_image_features(pixel_values=pixels)
            )
            features = output if isinstance(output, torch.Tensor) else output.pooler_output
        else:
            model = CLIPVisionModelWithProjection.from_pretrained(directory).eval()
            features = model(pixel_values=pixels).image_embeds
    return features[0].numpy()


def vector(embedding: pb.Embedding) -> np.ndarray:
    return np.asarray(embedding.values, dtype=np.float32)


async def test_embed_image_matches_transformers_normalised_and_raw(
    stub: Stub, clip_dir: Path
) -> None:
    data = photo_bytes("chelsea.png")
    with Image.open(DATA_PATH / "chelsea.png") as image:
        expected = reference_features(clip_dir, image.convert("RGB"))

    raw = await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=data), normalize=False))
    assert raw.embedding.model == "tiny"
    assert not raw.embedding.normalized
    assert len(raw.embedding.values) == 16
    np.testing.assert_allclose(vector(raw.embedding), expected, atol=1e-5, rtol=0)

    unit = await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=data)))
    assert unit.embedding.normalized
    np.testing.assert_allclose(np.linalg.norm(vector(unit.embedding)), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        vector(unit.embedding), expected / np.linalg.norm(expected), atol=1e-6, rtol=0
    )


async def test_second_model_uses_its_own_weights_and_preprocessing(
    stub: Stub, vision_dir: Path
) -> None:
    with Image.open(DATA_PATH / "astronaut.png") as image:
        expected = reference_features(vision_dir, image.convert("RGB"))
    response = await stub.EmbedImage(
        pb.EmbedImageRequest(
            image=pb.Image(content=photo_bytes("astronaut.png")),
            model="tiny-vision",
            normalize=False,
        )
    )
    assert response.embedding.model == "tiny-vision"
    assert len(response.embedding.values) == 24
    np.testing.assert_allclose(vector(response.embedding), expected, atol=1e-5, rtol=0)


async def test_data_uri_gives_the_same_embedding_as_content(stub: Stub) -> None:
    data = photo_bytes("rocket.jpg")
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    by_content = await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=data)))
    by_uri = await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(uri=uri)))
    assert list(by_uri.embedding.values) == list(by_content.embedding.values)


async def test_get_model_info_describes_models_preprocessing_and_limits(stub: Stub) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert [m.name for m in info.models] == ["tiny", "tiny-vision"]
    tiny, vision = info.models
    assert tiny.is_default
    assert not vision.is_default
    assert (tiny.embedding_dimension, tiny.image_size) == (16, 32)
    assert (vision.embedding_dimension, vision.image_size) == (24, 40)
    assert tiny.loaded
    assert not tiny.dummy_weights
    assert (tiny.dtype, tiny.device) == ("float32", "cpu")
    prep = vision.preprocessing
    assert prep.exif_transpose
    assert prep.interpolation == pb.INTERPOLATION_BICUBIC
    assert (prep.resize_shortest_edge, prep.crop_height, prep.crop_width) == (40, 40, 40)
    assert list(prep.mean) == [0.5, 0.5, 0.5]
    assert list(prep.std) == [0.25, 0.25, 0.25]
    assert prep.rescale_factor == pytest.approx(1 / 255)
    assert tiny.preprocessing.mean[0] == pytest.approx(0.48145466)
    assert info.limits.max_batch_images == 16
    assert info.limits.stream_window == 16
    assert info.limits.max_queue_size == 256
    assert info.limits.max_image_bytes > 0
    assert info.limits.max_image_pixels > 0
    assert info.limits.max_receive_message_bytes >= info.limits.max_image_bytes


async def test_embed_images_returns_one_result_per_image_in_order(stub: Stub) -> None:
    names = ["rocket.jpg", "camera.png", "logo.png", "coffee.png"]
    images = [pb.Image(content=photo_bytes(name)) for name in names]
    images.insert(1, pb.Image(content=b"not an image at all"))
    images.insert(3, pb.Image())
    response = await stub.EmbedImages(pb.EmbedImagesRequest(images=images))
    assert len(response.results) == 6
    kinds = [result.WhichOneof("result") for result in response.results]
    assert kinds == ["embedding", "error", "embedding", "error", "embedding", "embedding"]
    assert response.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert response.results[1].error.reason == "IMAGE_FORMAT_UNSUPPORTED"
    assert response.results[3].error.reason == "IMAGE_MISSING"
    good = [r for r in response.results if r.WhichOneof("result") == "embedding"]
    for name, result in zip(names, good, strict=True):
        single = await stub.EmbedImage(
            pb.EmbedImageRequest(image=pb.Image(content=photo_bytes(name)))
        )
        np.testing.assert_allclose(
            vector(result.embedding), vector(single.embedding), atol=1e-6, rtol=0
        )


async def test_stream_of_200_with_corrupt_items_answers_each_in_order(stub: Stub) -> None:
    good = [photo_bytes(n) for n in ("rocket.jpg", "chelsea.png", "camera.png", "coffee.png")]
    truncated = good[0][: len(good[0]) // 3]
    expected_vectors = [
        vector((await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=d)))).embedding)
        for d in good
    ]

    def item(index: int) -> pb.EmbedImageStreamRequest:
        if index % 7 == 3:
            return pb.EmbedImageStreamRequest(id=f"img-{index}", image=pb.Image(content=truncated))
        if index % 11 == 5:
            return pb.EmbedImageStreamRequest(
                id=f"img-{index}", image=pb.Image(content=b"\x00" * 64)
            )
        if index % 50 == 17:
            return pb.EmbedImageStreamRequest(
                id=f"img-{index}", image=pb.Image(content=good[0]), model="no-such-model"
            )
        return pb.EmbedImageStreamRequest(
            id=f"img-{index}", image=pb.Image(content=good[index % 4])
        )

    async def requests() -> AsyncIterator[pb.EmbedImageStreamRequest]:
        for index in range(200):
            yield item(index)

    responses = [response async for response in stub.EmbedImageStream(requests())]
    assert [r.id for r in responses] == [f"img-{i}" for i in range(200)]
    for index, response in enumerate(responses):
        if index % 7 == 3:
            assert response.error.reason == "IMAGE_DECODE_FAILED", index
            assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        elif index % 11 == 5:
            assert response.error.reason == "IMAGE_FORMAT_UNSUPPORTED", index
        elif index % 50 == 17:
            assert response.error.reason == "MODEL_NOT_FOUND"
            assert response.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        else:
            np.testing.assert_allclose(
                vector(response.embedding), expected_vectors[index % 4], atol=1e-6, rtol=0
            )


async def test_stream_items_may_name_different_models(stub: Stub) -> None:
    data = photo_bytes("coffee.png")

    async def requests() -> AsyncIterator[pb.EmbedImageStreamRequest]:
        for index, model in enumerate(["tiny", "tiny-vision", "", "tiny-vision"]):
            yield pb.EmbedImageStreamRequest(
                id=str(index), image=pb.Image(content=data), model=model, normalize=index != 2
            )

    responses = [r async for r in stub.EmbedImageStream(requests())]
    assert [len(r.embedding.values) for r in responses] == [16, 24, 16, 24]
    assert [r.embedding.normalized for r in responses] == [True, True, False, True]


async def test_empty_stream_ends_cleanly(stub: Stub) -> None:
    async def nothing() -> AsyncIterator[pb.EmbedImageStreamRequest]:
        return
        yield  # pragma: no cover

    assert [r async for r in stub.EmbedImageStream(nothing())] == []


async def test_every_image_format_is_accepted(stub: Stub) -> None:
    picture = Image.open(DATA_PATH / "chelsea.png").convert("RGB")
    frames = [picture, picture.rotate(90)]
    samples = {
        "JPEG": encode(picture, "JPEG"),
        "PNG": encode(picture, "PNG"),
        "WEBP": encode(picture, "WEBP", lossless=True),
        "GIF": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "BMP": encode(picture, "BMP"),
        "TIFF": encode(picture, "TIFF"),
    }
    response = await stub.EmbedImages(
        pb.EmbedImagesRequest(images=[pb.Image(content=data) for data in samples.values()])
    )
    errors = {
        fmt: r.error.message
        for fmt, r in zip(samples, response.results, strict=True)
        if r.WhichOneof("result") != "embedding"
    }
    assert errors == {}


DATA_PATH = Path(__file__).parent / "data"
