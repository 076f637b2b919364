"""Thousands of malformed, truncated and mutated images: every one answered, none INTERNAL.

Mutants of small real images in every accepted format go through the streaming
and unary RPCs of one server; hypothesis drives the decoder directly with many
more. The server must answer each item with an embedding or a precise
INVALID_ARGUMENT, stay SERVING, and keep its memory bounded.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import AsyncIterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipvision.server.app import ClipVisionServer
from clipvision.server.config.limits import ImageLimits
from clipvision.server.errors import InvalidImageError
from clipvision.server.runtime.preprocess import decode_image
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import DATA

STREAM_ITEMS = 2000
UNARY_CALLS = 300
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def seeds() -> list[bytes]:
    """Small real images in every accepted format, with some format features switched on."""
    with Image.open(DATA / "chelsea.png") as photo:
        rgb = photo.convert("RGB").resize((48, 32))
    frames = [rgb, rgb.rotate(90)]
    out = []
    cases: list[tuple[str, dict[str, object]]] = [
        ("JPEG", {"quality": 80}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("WEBP", {"quality": 70}),
        ("GIF", {"save_all": True, "append_images": frames[1:]}),
        ("BMP", {}),
        ("TIFF", {"compression": "tiff_deflate"}),
    ]
    for fmt, params in cases:
        buffer = io.BytesIO()
        rgb.save(buffer, format=fmt, **params)
        out.append(buffer.getvalue())
    rgba = io.BytesIO()
    rgb.convert("RGBA").save(rgba, format="PNG")
    out.append(rgba.getvalue())
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: truncate, flip bytes, insert junk, duplicate a run, or splice two images."""
    buffer = bytearray(data)
    kind = rng.integers(0, 6)
    if kind == 0:
        return bytes(buffer[: rng.integers(0, len(buffer))])
    if kind == 1:
        for _ in range(rng.integers(1, 16)):
            buffer[rng.integers(0, len(buffer))] = rng.integers(0, 256)
        return bytes(buffer)
    if kind == 2:
        at = rng.integers(0, len(buffer))
        return bytes(buffer[:at] + rng.bytes(int(rng.integers(1, 64))) + buffer[at:])
    if kind == 3:
        at = rng.integers(0, len(buffer))
        return bytes(buffer[:at] + buffer[at : at + 512] * 4 + buffer[at:])
    if kind == 4:  # header fields are where parsers go wrong: mutate the first 64 bytes
        for _ in range(rng.integers(1, 6)):
            buffer[rng.integers(0, min(64, len(buffer)))] = rng.integers(0, 256)
        return bytes(buffer)
    return bytes(data)  # some valid ones, so batches mix good and bad


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_stream_and_unary_fuzz(
    server_channel: tuple[ClipVisionServer, grpc.aio.Channel],
) -> None:
    rng = np.random.default_rng(20261127)
    corpus = seeds()
    stub = pb_grpc.EmbeddingServiceStub(server_channel[1])
    before = rss_bytes()

    async def items() -> AsyncIterator[pb.EmbedImageStreamRequest]:
        for index in range(STREAM_ITEMS):
            data = mutate(corpus[index % len(corpus)], rng)
            yield pb.EmbedImageStreamRequest(id=str(index), image=pb.Image(content=data))

    answered = 0
    codes: set[int] = set()
    async for response in stub.EmbedImageStream(items()):
        assert response.id == str(answered)
        answered += 1
        if response.HasField("error"):
            codes.add(response.error.code)
            assert response.error.reason.startswith("IMAGE_"), response.error
            assert response.error.message
    assert answered == STREAM_ITEMS
    assert codes == {INVALID_ARGUMENT}

    for index in range(UNARY_CALLS):
        data = mutate(corpus[index % len(corpus)], rng)
        try:
            single = await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=data)))
            assert len(single.embedding.values) == 16
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()

    health = await health_pb2_grpc.HealthStub(server_channel[1]).Check(
        health_pb2.HealthCheckRequest()
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Thousands of images later the process has not grown by more than a small bound.
    assert rss_bytes() - before < 300 * 1024 * 1024


CORPUS = seeds()
LIMITS = ImageLimits(max_image_bytes=1 << 20, max_image_pixels=4_000_000)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(CORPUS),
    cut=st.integers(min_value=0, max_value=4096),
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=4095), st.integers(0, 255)), max_size=12
    ),
)
def test_decoder_answers_any_mutation_with_an_image_or_a_clean_error(
    seed: bytes, cut: int, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(seed[: max(1, len(seed) - cut)])
    for position, value in edits:
        data[position % len(data)] = value
    try:
        image = decode_image(bytes(data), LIMITS)
    except InvalidImageError as error:
        assert error.message.endswith(".")
    else:
        assert image.width * image.height <= LIMITS.max_image_pixels


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_decoder_answers_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(InvalidImageError):
        decode_image(data, LIMITS)
