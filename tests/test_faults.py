"""Faults harm nothing: a stalled device, a vanishing client, bombs, SIGTERM under load."""

from __future__ import annotations

import asyncio
import io
import signal
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipvision.server.config.settings import Settings
from clipvision.server.runtime.image_encoder import ClipImageEncoder, FloatArray
from clipvision.server.runtime.preprocess import UInt8Array
from clipvision.server.runtime.text_encoder import ClipTextEncoder, IdArray
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with
from tests.processes import server_process

REQUEST = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("rocket.jpg")))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def slow_device(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make every forward pass take ``seconds`` longer, as a hung or overloaded device would."""
    real = ClipImageEncoder.forward

    def forward(encoder: ClipImageEncoder, pixels: UInt8Array) -> torch.Tensor:
        time.sleep(seconds)
        return real(encoder, pixels)

    monkeypatch.setattr(ClipImageEncoder, "forward", forward)


async def health_status(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return int(response.status)


async def test_a_stalled_device_turns_health_off_until_it_recovers(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_with(base_settings, watchdog_timeout_s=0.4)
    async with running_server(settings) as (_, channel):
        assert await health_status(channel) == SERVING
        slow_device(monkeypatch, 2.0)
        stuck = asyncio.ensure_future(pb_grpc.EmbeddingServiceStub(channel).EmbedImage(REQUEST))
        seen = []
        async with asyncio.timeout(10):
            while not stuck.done():
                seen.append(await health_status(channel))
                await asyncio.sleep(0.1)
        assert len((await stuck).embedding.values) == 16
        assert NOT_SERVING in seen
        assert seen[0] == SERVING
        assert "watchdog limit" in caplog.text
        async with asyncio.timeout(5):
            while await health_status(channel) != SERVING:
                await asyncio.sleep(0.1)


async def test_a_stalled_text_tower_is_seen_by_the_watchdog_too(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_with(base_settings, watchdog_timeout_s=0.4)
    real = ClipTextEncoder.embed_batch
    stall = threading.Event()

    def embed_batch(encoder: ClipTextEncoder, texts: list[IdArray]) -> FloatArray:
        if stall.is_set():
            time.sleep(2.0)
        return real(encoder, texts)

    # Patched before the model loads: the batcher holds the bound batch function.
    monkeypatch.setattr(ClipTextEncoder, "embed_batch", embed_batch)
    async with running_server(settings) as (_, channel):
        stall.set()
        request = pb.EmbedTextRequest(text="a photo of a cat")
        stuck = asyncio.ensure_future(pb_grpc.EmbeddingServiceStub(channel).EmbedText(request))
        seen = []
        async with asyncio.timeout(10):
            while not stuck.done():
                seen.append(await health_status(channel))
                await asyncio.sleep(0.1)
        assert len((await stuck).embedding.values) == 16
        assert NOT_SERVING in seen
        assert "model tiny (texts)" in caplog.text


async def test_a_client_that_vanishes_mid_stream_frees_everything(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(base_settings) as (server, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        batcher = (await server.registry.get("")).batcher
        slow_device(monkeypatch, 0.05)

        async def endless() -> AsyncIterator[pb.EmbedImageStreamRequest]:
            for index in range(1000):  # bounded; the client leaves long before
                yield pb.EmbedImageStreamRequest(id=str(index), image=REQUEST.image)

        call = stub.EmbedImageStream(endless())
        received = 0
        async for _ in call:
            received += 1
            if received == 5:
                break
        call.cancel()
        async with asyncio.timeout(10):
            while batcher.capacity.used:
                await asyncio.sleep(0.05)
        assert batcher.capacity.used == 0
        await asyncio.sleep(0.3)  # nothing left to run
        assert (await stub.EmbedImage(REQUEST)).embedding.values


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` black pixels, compressed to a few kilobytes."""
    row = b"\x00" + b"\x00" * (width // 8 + 1)
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


async def test_a_decompression_bomb_is_refused_before_decoding(
    server_channel: tuple[object, grpc.aio.Channel],
) -> None:
    bomb = png_bomb(30_000, 30_000)  # 900 megapixels in a few kilobytes
    assert len(bomb) < 200_000
    stub = pb_grpc.EmbeddingServiceStub(server_channel[1])
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=bomb)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "900000000 pixels" in (caught.value.details() or "")
    assert time.monotonic() - started < 2
    assert await health_status(server_channel[1]) == SERVING


async def test_overload_is_refused_quickly_and_health_stays_serving(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_with(base_settings, max_queue_size=16, max_batch_images=16)
    async with running_server(settings) as (_, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        slow_device(monkeypatch, 0.2)
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(stub.EmbedImage(REQUEST, timeout=60) for _ in range(80)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert refused
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
        assert len(outcomes) - len(refused) >= 16
        assert time.monotonic() - started < 30
        assert await health_status(channel) == SERVING


async def test_sigterm_under_load_loses_nothing(clip_dir: Path) -> None:
    async with server_process(
        "--model", f"tiny={clip_dir}", "--device", "cpu", "--grace-period", "20"
    ) as server:
        port = int((await server.wait_for(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
        await server.wait_for(r"serving tiny")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            big = photo_bytes("retina.jpg")
            calls = [
                asyncio.ensure_future(
                    stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=big)), timeout=60)
                )
                for _ in range(40)
            ]
            await asyncio.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        code, log = await server.finish()
    # Every call was in flight when the signal came: each one completes.
    failed = [o for o in outcomes if not isinstance(o, pb.EmbedImageResponse)]
    assert not failed, failed
    assert all(len(o.embedding.values) == 16 for o in outcomes)  # type: ignore[union-attr]
    assert "draining" in log
    assert code == 0, log


def test_png_bomb_helper_makes_a_real_png() -> None:
    from PIL import Image

    with Image.open(io.BytesIO(png_bomb(64, 48))) as image:
        image.load()
        assert image.size == (64, 48)
