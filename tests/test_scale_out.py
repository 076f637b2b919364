"""Scale-out that loses nothing: draining streams, client stream restarts, a replica killed.

The last test is the one docs/OPERATIONS.md reports: three clipvision-server
processes, the blocking client balancing round_robin over all three with four
concurrent streams of 250 images, one replica SIGKILLed mid-run. It prints its
figures (run it with ``-s`` to see them); it asserts none of its timings.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status
from PIL import Image

from clipvision.client import (
    AsyncEmbeddingClient,
    EmbeddingClient,
    InvalidImageError,
    UnavailableError,
)
from clipvision.server.app import ClipVisionServer
from clipvision.server.config.settings import Settings
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import encode, settings_with
from tests.live_server import LiveServer, live_server
from tests.processes import ServerProcess, server_process
from tests.scrape import scrape, value

ATOL = 1e-5
RESTART_LOG = "EmbedImageStream broke"


def tiny_png(index: int) -> bytes:
    """A 16x16 PNG whose colour, and so embedding, differs for each index."""
    colour = ((index * 53) % 256, (index * 97 + 40) % 256, (index * 151 + 80) % 256)
    image = Image.new("RGB", (16, 16), colour)
    image.putpixel((index % 16, index // 16 % 16), (255 - colour[0], 0, 0))
    return encode(image, "PNG")


async def reference_vectors(address: str, images: list[bytes]) -> list[np.ndarray]:
    """Each image's embedding from one server, by EmbedImages in chunks."""
    vectors: list[np.ndarray] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for start in range(0, len(images), 16):
            response = await stub.EmbedImages(
                pb.EmbedImagesRequest(
                    model="tiny", images=[pb.Image(content=c) for c in images[start : start + 16]]
                )
            )
            vectors += [np.asarray(r.embedding.values, np.float32) for r in response.results]
    return vectors


def embedded(server: ClipVisionServer) -> float:
    """Images that went through this in-process server's model."""
    count = server.metrics.registry.get_sample_value(
        "clipvision_images_embedded_total", {"model": "tiny"}
    )
    return count or 0.0


async def test_a_draining_server_answers_what_it_admitted_then_ends_the_stream(
    base_settings: Settings,
) -> None:
    async with (
        live_server(base_settings) as live,
        grpc.aio.insecure_channel(live.address) as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        # No request iterator: this test writes each request itself, with call.write.
        call = stub.EmbedImageStream()  # type: ignore[call-arg]
        for index in range(4):
            await call.write(
                pb.EmbedImageStreamRequest(id=str(index), image=pb.Image(content=tiny_png(index)))
            )
        answered: list[pb.EmbedImageStreamResponse] = [await call.read() for _ in range(4)]  # type: ignore[misc]
        stopping = asyncio.create_task(live.server.stop(grace=5.0))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        await stopping
    assert [r.id for r in answered] == ["0", "1", "2", "3"]
    assert all(r.HasField("embedding") for r in answered)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    assert b"SERVER_DRAINING" in status.details[0].value
    assert embedded(live.server) == 4


async def test_the_client_resumes_a_drained_stream_on_another_replica(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    images = [tiny_png(i) for i in range(200)]
    images[10] = b"not an image"  # a definitive in-band error: answered once, never re-sent
    async with AsyncExitStack() as stack:
        replicas: list[LiveServer] = [
            await stack.enter_async_context(live_server(base_settings)) for _ in range(2)
        ]
        address = ",".join(replica.address for replica in replicas)
        stopping: list[asyncio.Task[None]] = []

        async def inputs() -> AsyncIterator[bytes]:
            for index, image in enumerate(images):
                if index == 60:
                    # The stream's replica is the one that has embedded anything.
                    victim = max(replicas, key=lambda replica: embedded(replica.server))
                    stopping.append(asyncio.create_task(victim.server.stop(grace=5.0)))
                yield image

        async with AsyncEmbeddingClient(address, stream_window=8) as client:
            results = [
                r async for r in client.embed_images(inputs(), model="tiny", return_exceptions=True)
            ]
        await asyncio.gather(*stopping)
        # Counted before the reference pass below, which meets the bad image once more.
        item_errors = sum(
            replica.server.metrics.registry.get_sample_value(
                "clipvision_item_errors_total", {"reason": "IMAGE_FORMAT_UNSUPPORTED"}
            )
            or 0.0
            for replica in replicas
        )
        survivor = next(r for r in replicas if not r.server.registry.draining)
        expected = await reference_vectors(survivor.address, images)
    assert len(results) == len(images)
    assert isinstance(results[10], InvalidImageError)
    for index, result in enumerate(results):
        if index != 10:
            assert isinstance(result, np.ndarray)
            np.testing.assert_allclose(result, expected[index], atol=ATOL)
    assert item_errors == 1
    assert any(RESTART_LOG in record.getMessage() for record in caplog.records)


async def test_stream_restarts_can_be_turned_off(base_settings: Settings) -> None:
    async with live_server(base_settings) as live:

        async def inputs() -> AsyncIterator[bytes]:
            for index in range(40):
                if index == 20:
                    asyncio.create_task(live.server.stop(grace=5.0))  # noqa: RUF006 (awaited by the fixture)
                yield tiny_png(index)

        async with AsyncEmbeddingClient(
            live.address, stream_window=4, max_stream_restarts=0, max_attempts=1
        ) as client:
            with pytest.raises(UnavailableError) as caught:
                async for _ in client.embed_images(inputs(), model="tiny"):
                    pass
    # SERVER_DRAINING, or STREAM_BROKEN when grpc.aio was sending as the stream ended.
    assert caught.value.reason in {"SERVER_DRAINING", "STREAM_BROKEN"}


def test_max_stream_restarts_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_stream_restarts"):
        EmbeddingClient("127.0.0.1:1", max_stream_restarts=-1)


# --- three processes, one killed ----------------------------------------------------------

IMAGES = 1000
STREAMS = 4
PAUSE_AT = 100  # each stream pauses after this many inputs until the kill is done


async def start_replica(stack: AsyncExitStack, clip_dir: Path) -> tuple[ServerProcess, int]:
    process = await stack.enter_async_context(
        server_process(
            "--model",
            f"tiny={clip_dir}",
            "--device",
            "cpu",
            "--metrics-address",
            "127.0.0.1:0",
            "--max-batch-size",
            "16",
            "--stream-window",
            "16",
            "--preprocess-workers",
            "1",
            "--grace-period",
            "2",
        )
    )
    metrics_port = int((await process.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics"))[1])
    process.port = int((await process.wait_for(r"listening on 127\.0\.0\.1:(\d+)"))[1])
    return process, metrics_port


async def test_three_replicas_lose_nothing_when_one_is_killed_mid_run(
    clip_dir: Path, base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="clipvision.client")
    images = [tiny_png(i) for i in range(IMAGES)]
    single = settings_with(base_settings, models=base_settings.models[:1])
    async with live_server(single) as reference_server:
        expected = await reference_vectors(reference_server.address, images)
    async with AsyncExitStack() as stack:
        replicas = await asyncio.gather(*(start_replica(stack, clip_dir) for _ in range(3)))
        for process, _ in replicas:
            await process.wait_for(r"serving tiny")
        metrics_ports = [port for _, port in replicas]
        address = ",".join(f"127.0.0.1:{process.port}" for process, _ in replicas)
        client = EmbeddingClient(address, stream_window=16)
        stack.callback(client.close)
        # Until round_robin has a connection to every replica, it spreads over fewer.
        for _ in range(60):
            await asyncio.to_thread(client.model_info)
            seen = [await scrape(port) for port in metrics_ports]
            if all(
                value(
                    s,
                    "clipvision_requests_total",
                    protocol="grpc",
                    method="GetModelInfo",
                    code="OK",
                )
                for s in seen
            ):
                break
        paused = threading.Barrier(STREAMS + 1)
        resume = threading.Event()

        def stream(part: int) -> list[np.ndarray]:
            def inputs() -> Iterator[bytes]:
                for offset, image in enumerate(images[part::STREAMS]):
                    if offset == PAUSE_AT:
                        paused.wait(timeout=60)
                        resume.wait(timeout=60)
                    yield image

            return list(client.embed_images(inputs(), model="tiny"))

        started = time.monotonic()
        streams = [asyncio.create_task(asyncio.to_thread(stream, part)) for part in range(STREAMS)]
        await asyncio.to_thread(paused.wait, 60)
        # Let the replicas answer what they admitted, so the counts below are final.
        for _ in range(200):
            depths = [
                value(await scrape(p), "clipvision_queue_depth", model="tiny")
                for p in metrics_ports
            ]
            if not any(depths):
                break
            await asyncio.sleep(0.05)
        before_kill = [
            value(await scrape(port), "clipvision_images_embedded_total", model="tiny")
            for port in metrics_ports
        ]
        victim = max(range(3), key=lambda index: before_kill[index])
        replicas[victim][0].process.kill()
        await replicas[victim][0].process.wait()
        resume.set()
        parts = await asyncio.gather(*streams)
        duration = time.monotonic() - started
        after = [
            None
            if index == victim
            else value(await scrape(port), "clipvision_images_embedded_total", model="tiny")
            for index, port in enumerate(metrics_ports)
        ]
    restarts = sum(RESTART_LOG in record.getMessage() for record in caplog.records)
    print(  # the figures docs/OPERATIONS.md reports
        f"\nscale-out: {IMAGES} images, {STREAMS} streams, {duration:.1f} s; replica "
        f"{victim} killed; embedded before the kill {before_kill}, after {after}; "
        f"{restarts} stream restarts"
    )
    results: list[np.ndarray | None] = [None] * IMAGES
    for part, vectors in enumerate(parts):
        assert len(vectors) == len(images[part::STREAMS])  # none lost, none twice
        results[part::STREAMS] = vectors
    for index, vector in enumerate(results):
        assert vector is not None
        np.testing.assert_allclose(vector, expected[index], atol=ATOL)
    # The load was spread: at least two replicas had embedded images before the kill,
    # and the survivors took over the rest.
    assert sum(count > 0 for count in before_kill) >= 2
    assert before_kill[victim] > 0
    assert restarts >= 1
    survivors = [count for count in after if count is not None]
    assert sum(survivors) + before_kill[victim] >= IMAGES
