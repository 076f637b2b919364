"""The Python client against a real server: inputs, numpy results, typed errors, streaming.

The blocking client runs in a worker thread (``asyncio.to_thread``) because the
server under test runs on this test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

import clipvision.client as client_package
from clipvision.client import (
    AsyncEmbeddingClient,
    ClipVisionError,
    DeadlineExceededError,
    EmbeddingClient,
    ImageReadError,
    InvalidImageError,
    ModelNotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from clipvision.server.config.settings import Settings
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import encode, photo_bytes, settings_with
from tests.live_server import LiveServer, live_server

ATOL = 1e-6


@pytest.fixture(scope="module")
async def live(base_settings: Settings) -> AsyncIterator[LiveServer]:
    """One loaded server (models ``tiny``, 16-d, and ``tiny-vision``, 24-d) for this module."""
    async with live_server(base_settings) as server:
        yield server


def solid_png(index: int, size: int = 16) -> bytes:
    """A small PNG whose colour, and so embedding, differs for each index."""
    colour = ((index * 53) % 256, (index * 97 + 40) % 256, (index * 151 + 80) % 256)
    image = Image.new("RGB", (size, size), colour)
    image.putpixel((index % size, 0), (255 - colour[0], 0, 0))
    return encode(image, "PNG")


async def reference(live: LiveServer, content: bytes, model: str = "") -> np.ndarray:
    """The embedding as the raw generated stub returns it."""
    async with grpc.aio.insecure_channel(live.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.EmbedImageRequest(image=pb.Image(content=content), model=model)
        response = await stub.EmbedImage(request)
    return np.asarray(response.embedding.values, dtype=np.float32)


async def test_embed_image_accepts_bytes_paths_files_pil_images_and_messages(
    live: LiveServer, tmp_path: Path
) -> None:
    content = solid_png(3)
    path = tmp_path / "three.png"
    path.write_bytes(content)
    expected = await reference(live, content)
    data_uri = "data:image/png;base64," + base64.b64encode(content).decode()

    def embed_all() -> list[np.ndarray]:
        with EmbeddingClient(live.address) as client, path.open("rb") as file:
            inputs: list[client_package.ImageInput] = [
                content,
                bytearray(content),
                memoryview(content),
                str(path),
                path,
                file,
                Image.open(io.BytesIO(content)),
                pb.Image(uri=data_uri),
            ]
            return [client.embed_image(image) for image in inputs]

    for vector in await asyncio.to_thread(embed_all):
        assert vector.dtype == np.float32
        np.testing.assert_allclose(vector, expected, atol=ATOL)


async def test_pil_images_in_any_mode_are_sent_with_their_pixels(live: LiveServer) -> None:
    rgb = Image.new("RGB", (20, 12), (10, 200, 30))
    cmyk = rgb.convert("CMYK")  # PNG cannot hold CMYK; the client sends it as RGB
    expected = await reference(live, encode(rgb, "PNG"))

    def embed() -> list[np.ndarray]:
        with EmbeddingClient(live.address) as client:
            return [client.embed_image(rgb), client.embed_image(cmyk)]

    for vector in await asyncio.to_thread(embed):
        np.testing.assert_allclose(vector, expected, atol=ATOL)


async def test_vectors_are_unit_length_unless_raw_and_models_can_be_chosen(
    live: LiveServer,
) -> None:
    content = photo_bytes("rocket.jpg")

    def embed() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with EmbeddingClient(live.address) as client:
            return (
                client.embed_image(content),
                client.embed_image(content, normalize=False),
                client.embed_image(content, model="tiny-vision"),
            )

    unit, raw, other = await asyncio.to_thread(embed)
    assert unit.shape == (16,)
    assert np.linalg.norm(unit) == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(raw) != pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-5)
    assert other.shape == (24,)


@pytest.mark.parametrize(
    ("image", "model", "error_class", "code", "reason"),
    [
        (b"not an image", None, InvalidImageError, "INVALID_ARGUMENT", "IMAGE_FORMAT_UNSUPPORTED"),
        (b"", None, InvalidImageError, "INVALID_ARGUMENT", "IMAGE_EMPTY"),
        (photo_bytes("rocket.jpg"), "ViT-H/14", ModelNotFoundError, "NOT_FOUND", "MODEL_NOT_FOUND"),
        (
            pb.Image(uri="file:///etc/passwd"),
            None,
            PermissionDeniedError,
            "PERMISSION_DENIED",
            "URI_SCHEME_REFUSED",
        ),
    ],
)
async def test_failures_raise_typed_errors_with_code_reason_and_message(
    live: LiveServer,
    image: bytes | pb.Image,
    model: str | None,
    error_class: type[ClipVisionError],
    code: str,
    reason: str,
) -> None:
    def embed() -> None:
        with EmbeddingClient(live.address) as client:
            client.embed_image(image, model=model)

    with pytest.raises(error_class) as caught:
        await asyncio.to_thread(embed)
    error = caught.value
    assert not isinstance(error, grpc.RpcError)
    assert isinstance(error.__cause__, grpc.RpcError)
    assert (error.code.name, error.reason) == (code, reason)
    assert error.message.endswith(".")
    assert reason in str(error)


async def test_a_missing_file_is_an_image_read_error_before_anything_is_sent(
    live: LiveServer, tmp_path: Path
) -> None:
    def embed() -> None:
        with EmbeddingClient(live.address) as client:
            client.embed_image(tmp_path / "absent.jpg")

    with pytest.raises(ImageReadError) as caught:
        await asyncio.to_thread(embed)
    assert "absent.jpg" in caught.value.message
    assert caught.value.__cause__ is not None
    assert not isinstance(caught.value.__cause__, grpc.RpcError)


def test_an_unsupported_input_type_is_a_type_error() -> None:
    with EmbeddingClient("127.0.0.1:1") as client, pytest.raises(TypeError, match="cannot embed"):
        client.embed_image(42)  # type: ignore[arg-type]


async def test_a_deadline_becomes_deadline_exceeded(live: LiveServer) -> None:
    def embed() -> None:
        with EmbeddingClient(live.address, timeout=0.001) as client:
            client.embed_image(photo_bytes("retina.jpg"))

    with pytest.raises(DeadlineExceededError):
        await asyncio.to_thread(embed)


async def test_a_loading_server_is_unavailable_with_its_reason(base_settings: Settings) -> None:
    async with live_server(base_settings, load=False) as loading:

        def embed() -> None:
            with EmbeddingClient(loading.address, max_attempts=1) as client:
                client.embed_image(photo_bytes("rocket.jpg"))

        with pytest.raises(UnavailableError) as caught:
            await asyncio.to_thread(embed)
    assert caught.value.reason == "MODEL_LOADING"


async def test_model_info_describes_models_and_limits(live: LiveServer) -> None:
    def info() -> pb.GetModelInfoResponse:
        with EmbeddingClient(live.address) as client:
            return client.model_info()

    response = await asyncio.to_thread(info)
    assert [(m.name, m.embedding_dimension) for m in response.models] == [
        ("tiny", 16),
        ("tiny-vision", 24),
    ]
    assert response.limits.max_batch_images == 16


async def test_a_closed_client_refuses_calls(live: LiveServer) -> None:
    def use_after_close() -> None:
        with EmbeddingClient(live.address) as client:
            client.model_info()
        client.model_info()

    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.to_thread(use_after_close)


# -- embed_images: one stream, input order, errors in place, bounded in flight


def mixed_inputs(tmp_path: Path) -> tuple[list[client_package.ImageInput], list[str | None]]:
    """Good images, each different, between bad ones; returns the inputs and expected reasons."""
    inputs: list[client_package.ImageInput] = []
    reasons: list[str | None] = []
    for index in range(12):
        inputs.append(solid_png(index))
        reasons.append(None)
        if index % 4 == 1:
            inputs.append(b"not an image at all")
            reasons.append("IMAGE_FORMAT_UNSUPPORTED")
        if index % 5 == 2:
            inputs.append(tmp_path / f"missing-{index}.png")
            reasons.append("IMAGE_UNREADABLE")
    return inputs, reasons


async def test_embed_images_yields_in_input_order_with_errors_in_place(
    live: LiveServer, tmp_path: Path
) -> None:
    inputs, reasons = mixed_inputs(tmp_path)
    expected = [await reference(live, item) if isinstance(item, bytes) and r is None else None
                for item, r in zip(inputs, reasons, strict=True)]  # fmt: skip

    def stream() -> list[client_package.Result]:
        with EmbeddingClient(live.address, stream_window=3) as client:
            return list(client.embed_images(inputs, return_exceptions=True))

    results = await asyncio.to_thread(stream)
    assert len(results) == len(inputs)
    for result, reason, vector in zip(results, reasons, expected, strict=True):
        if reason is None:
            assert isinstance(result, np.ndarray)
            assert vector is not None
            np.testing.assert_allclose(result, vector, atol=ATOL)
        else:
            assert isinstance(result, ClipVisionError)
            assert result.reason == reason
    assert isinstance(results[reasons.index("IMAGE_UNREADABLE")], ImageReadError)


async def test_embed_images_raises_at_the_first_bad_image_by_default(
    live: LiveServer, tmp_path: Path
) -> None:
    inputs, reasons = mixed_inputs(tmp_path)
    first_bad = next(i for i, reason in enumerate(reasons) if reason is not None)
    received: list[np.ndarray] = []

    def stream() -> None:
        with EmbeddingClient(live.address, stream_window=4) as client:
            received.extend(client.embed_images(inputs))

    with pytest.raises(InvalidImageError) as caught:
        await asyncio.to_thread(stream)
    assert caught.value.reason == reasons[first_bad]
    assert len(received) == first_bad


async def test_embed_images_reads_lazily_with_a_bounded_number_in_flight(
    live: LiveServer,
) -> None:
    window = 4
    pulled = 0

    def source() -> Iterator[bytes]:
        nonlocal pulled
        for index in range(40):
            pulled += 1
            yield solid_png(index)

    def stream() -> list[int]:
        ahead = []
        with EmbeddingClient(live.address, stream_window=window) as client:
            for consumed, _ in enumerate(client.embed_images(source()), start=1):
                ahead.append(pulled - consumed)
        return ahead

    ahead = await asyncio.to_thread(stream)
    assert len(ahead) == 40
    assert max(ahead) <= window - 1
    assert max(ahead) == window - 1  # the window is used, not just respected


async def test_an_image_too_large_for_a_message_is_refused_in_place(
    live: LiveServer,
) -> None:
    inputs = [solid_png(1), b"\xff" * (100 * 1024), solid_png(2)]

    def stream() -> list[client_package.Result]:
        with EmbeddingClient(live.address, max_message_bytes=64 * 1024) as client:
            return list(client.embed_images(inputs, return_exceptions=True))

    first, too_large, last = await asyncio.to_thread(stream)
    assert isinstance(first, np.ndarray)
    assert isinstance(last, np.ndarray)
    assert isinstance(too_large, InvalidImageError)
    assert too_large.reason == "IMAGE_TOO_LARGE"
    assert "65536" in too_large.message


async def test_an_item_over_the_servers_message_limit_is_refused_in_place_not_the_stream(
    base_settings: Settings,
) -> None:
    # The server takes messages of 1 MiB at most, the client 64 MiB (its default). The client
    # used to send a 2 MiB image, and gRPC refused the whole stream (RESOURCE_EXHAUSTED):
    # one large file stopped `clipvision embed` at the same place on every rerun.
    images = [solid_png(1), b"\xff" * (2 << 20), solid_png(2)]
    texts = ["a photo of a rocket", "x" * (2 << 20), "a photo of a cat"]
    async with live_server(settings_with(base_settings, max_message_bytes=1 << 20)) as server:

        def blocking() -> tuple[list[client_package.Result], list[client_package.TextResult]]:
            with EmbeddingClient(server.address) as client:
                streamed = list(client.embed_images(images, return_exceptions=True))
                batched = client.embed_texts(texts, return_exceptions=True)
            return streamed, batched

        streamed, batched = await asyncio.to_thread(blocking)
        async with AsyncEmbeddingClient(server.address) as client:
            texts_streamed = [
                result async for result in client.embed_text_stream(texts, return_exceptions=True)
            ]
    for image_result in (streamed[0], streamed[2]):
        assert isinstance(image_result, np.ndarray)
    assert isinstance(streamed[1], InvalidImageError)
    assert streamed[1].reason == "IMAGE_TOO_LARGE"
    assert f"at most {1 << 20} bytes (the server's limit" in streamed[1].message
    for results in (batched, texts_streamed):
        assert [type(result).__name__ for result in results] == [
            "TextEmbedding",
            "InvalidTextError",
            "TextEmbedding",
        ]
        assert isinstance(results[1], ClipVisionError)
        assert results[1].reason == "TEXT_TOO_LARGE"


async def test_stopping_early_ends_the_stream_and_leaves_the_client_usable(
    live: LiveServer,
) -> None:
    def stream() -> int:
        with EmbeddingClient(live.address, stream_window=2) as client:
            results = client.embed_images(solid_png(i) for i in range(1000))
            next(results)
            results.close()
            return len(list(client.embed_images([solid_png(5)])))

    assert await asyncio.wait_for(asyncio.to_thread(stream), timeout=30) == 1


async def test_empty_input_yields_nothing(live: LiveServer) -> None:
    def stream() -> list[np.ndarray]:
        with EmbeddingClient(live.address) as client:
            return list(client.embed_images([]))

    assert await asyncio.to_thread(stream) == []


# -- the asyncio twin


async def test_async_client_embeds_streams_and_raises_like_the_sync_one(
    live: LiveServer, tmp_path: Path
) -> None:
    inputs, reasons = mixed_inputs(tmp_path)

    async def source() -> AsyncIterator[client_package.ImageInput]:
        for item in inputs:
            yield item

    async with AsyncEmbeddingClient(live.address, stream_window=3) as client:
        single = await client.embed_image(solid_png(0))
        np.testing.assert_allclose(single, await reference(live, solid_png(0)), atol=ATOL)
        assert [m.name for m in (await client.model_info()).models] == ["tiny", "tiny-vision"]
        results = [r async for r in client.embed_images(source(), return_exceptions=True)]
        with pytest.raises(InvalidImageError) as caught:
            await client.embed_image(b"not an image")
        assert caught.value.reason == "IMAGE_FORMAT_UNSUPPORTED"
        with pytest.raises(ModelNotFoundError):
            await client.embed_image(solid_png(0), model="absent")

    assert [r.reason if isinstance(r, ClipVisionError) else None for r in results] == reasons

    def sync_stream() -> list[client_package.Result]:
        with EmbeddingClient(live.address) as sync_client:
            return list(sync_client.embed_images(inputs, return_exceptions=True))

    sync_results = await asyncio.to_thread(sync_stream)
    for mine, theirs in zip(results, sync_results, strict=True):
        if isinstance(mine, np.ndarray):
            np.testing.assert_allclose(mine, theirs, atol=ATOL)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="closed"):
        await client.model_info()


async def test_async_embed_images_raises_at_the_first_bad_image(live: LiveServer) -> None:
    received = []

    async def consume() -> None:
        async with AsyncEmbeddingClient(live.address) as client:
            async for vector in client.embed_images([solid_png(1), b"bad", solid_png(2)]):
                received.append(vector)

    with pytest.raises(InvalidImageError):
        await consume()
    assert len(received) == 1


async def test_a_server_going_away_mid_stream_raises_a_typed_error(
    base_settings: Settings,
) -> None:
    received = 0

    async def consume(doomed: LiveServer) -> None:
        nonlocal received

        async def source() -> AsyncIterator[bytes]:
            for index in range(1000):
                if index == 20:
                    await doomed.server.stop(grace=0)
                yield solid_png(index)

        async with AsyncEmbeddingClient(doomed.address, max_attempts=1, stream_window=4) as client:
            async for result in client.embed_images(source(), return_exceptions=True):
                received += not isinstance(result, ClipVisionError)

    async with live_server(base_settings) as doomed:
        with pytest.raises(ClipVisionError) as caught:
            await consume(doomed)
    assert not isinstance(caught.value, grpc.RpcError)
    # A hard stop (grace 0) resets the HTTP/2 stream; depending on the race gRPC
    # reports UNAVAILABLE, CANCELLED or its own INTERNAL "error from Core".
    assert isinstance(
        caught.value,
        UnavailableError | client_package.CallCancelledError | client_package.InternalError,
    )
    assert 0 < received < 1000


# -- the package surface


def test_the_public_names_are_exactly_the_documented_ones() -> None:
    assert sorted(client_package.__all__) == [
        "AsyncEmbeddingClient",
        "CallCancelledError",
        "ClipVisionError",
        "DeadlineExceededError",
        "EmbeddingClient",
        "FloatArray",
        "ImageInput",
        "ImageReadError",
        "InternalError",
        "InvalidImageError",
        "InvalidRequestError",
        "InvalidTextError",
        "LabelScore",
        "ModalityNotServedError",
        "ModelNotFoundError",
        "PermissionDeniedError",
        "ResourceExhaustedError",
        "Result",
        "TextEmbedding",
        "TextResult",
        "UnauthenticatedError",
        "UnavailableError",
        "error_from_rpc_error",
        "error_from_status",
    ]
    for name in client_package.__all__:
        value = getattr(client_package, name)
        if isinstance(value, type) or (callable(value) and hasattr(value, "__code__")):
            assert value.__doc__, f"{name} has no docstring"
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, ClipVisionError)


def test_importing_the_client_loads_neither_torch_nor_pillow_nor_the_server() -> None:
    code = (
        "import sys, clipvision.client, clipvision.client.cli\n"
        "heavy = {'torch', 'transformers', 'PIL', 'clipvision.server'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
