"""Continuous batching, admission and fault isolation, observed on a real server.

The device is the real model; a spy around ClipImageEncoder.forward records the
batches it is given and can slow it down (so that a queue forms) or fail it for
one poisoned image, which no real input can be made to do on purpose.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from clipvision.server.config.settings import Settings
from clipvision.server.runtime.image_encoder import ClipImageEncoder, l2_normalize_rows
from clipvision.server.runtime.preprocess import UInt8Array
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with

PHOTOS = ["rocket.jpg", "chelsea.png", "camera.png", "coffee.png"]


@dataclass
class DeviceSpy:
    """Records every batch the device is given; optionally slow, optionally poisoned."""

    delay_s: float = 0.0
    batches: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real: Callable[[ClipImageEncoder, UInt8Array], torch.Tensor] = ClipImageEncoder.forward
        spy = self

        def forward(encoder: ClipImageEncoder, pixels: UInt8Array) -> torch.Tensor:
            time.sleep(spy.delay_s)  # runs on the device thread, like real compute
            # A black image is the poison: it decodes fine and fails only on the device.
            if any(not image.any() for image in pixels):
                spy.failed.append(len(pixels))
                raise RuntimeError("the device failed on a poisoned image")
            spy.batches.append(len(pixels))
            return real(encoder, pixels)

        monkeypatch.setattr(ClipImageEncoder, "forward", forward)


def black_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def request(name: str) -> pb.EmbedImageRequest:
    return pb.EmbedImageRequest(image=pb.Image(content=photo_bytes(name)))


async def expected_vectors(stub: pb_grpc.EmbeddingServiceStub) -> dict[str, np.ndarray]:
    return {
        name: np.asarray((await stub.EmbedImage(request(name))).embedding.values)  # type: ignore[misc]
        for name in PHOTOS
    }


async def test_concurrent_callers_share_batches_and_get_their_own_results(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(base_settings) as (_, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        expected = await expected_vectors(stub)
        spy = DeviceSpy(delay_s=0.1)
        spy.install(monkeypatch)
        names = [PHOTOS[i % len(PHOTOS)] for i in range(24)]
        responses = await asyncio.gather(*(stub.EmbedImage(request(n)) for n in names))
        for name, response in zip(names, responses, strict=True):
            np.testing.assert_allclose(response.embedding.values, expected[name], atol=1e-6)
        assert sum(spy.batches) == 24
        assert max(spy.batches) > 1, spy.batches
        assert len(spy.batches) < 24


async def test_cancelled_and_expired_items_are_never_computed(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(base_settings) as (_, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        await stub.EmbedImage(request("rocket.jpg"))  # warm the path
        spy = DeviceSpy(delay_s=0.5)
        spy.install(monkeypatch)
        busy = asyncio.ensure_future(stub.EmbedImage(request("rocket.jpg")))
        await asyncio.sleep(0.1)  # the device is now busy with `busy`
        expiring = stub.EmbedImage(request("chelsea.png"), timeout=0.2)
        cancelled = stub.EmbedImage(request("camera.png"))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await expiring
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await busy
        await asyncio.sleep(0.6)  # give a (wrong) computation of the dropped items time to run
        assert spy.batches == [1], spy.batches
        after = await stub.EmbedImage(request("coffee.png"))
        assert len(after.embedding.values) == 16


async def test_a_poisoned_image_fails_alone(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch delay gathers the whole request into one forward pass.
    settings = settings_with(base_settings, max_batch_delay_ms=300.0)
    async with running_server(settings) as (_, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        expected = await expected_vectors(stub)
        spy = DeviceSpy()
        spy.install(monkeypatch)
        images = [pb.Image(content=photo_bytes(n)) for n in PHOTOS]
        images.insert(2, pb.Image(content=black_png()))
        response = await stub.EmbedImages(pb.EmbedImagesRequest(images=images))
        kinds = [r.WhichOneof("result") for r in response.results]
        assert kinds == ["embedding", "embedding", "error", "embedding", "embedding"]
        assert response.results[2].error.code == grpc.StatusCode.INTERNAL.value[0]
        good = [r for r in response.results if r.WhichOneof("result") == "embedding"]
        for name, result in zip(PHOTOS, good, strict=True):
            np.testing.assert_allclose(result.embedding.values, expected[name], atol=1e-6)
        assert spy.failed[0] == 5  # the whole batch failed once...
        assert spy.failed[1:] == [1]  # ...then only the guilty image, retried alone
        assert spy.batches == [1, 1, 1, 1]


async def test_a_full_queue_refuses_unary_calls_at_once_with_retry_info(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_with(base_settings, max_queue_size=4, max_batch_images=4)
    async with running_server(settings) as (_, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        spy = DeviceSpy(delay_s=0.3)
        spy.install(monkeypatch)
        calls = [stub.EmbedImage(request(PHOTOS[i % 4])) for i in range(12)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        served = [o for o in outcomes if isinstance(o, pb.EmbedImageResponse)]
        assert len(served) + len(refused) == 12
        assert len(served) >= 4
        assert refused, "the queue bound was never hit"
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None
            retry = error_details_pb2.RetryInfo()
            info = error_details_pb2.ErrorInfo()
            packed = {d.type_url.rsplit("/", 1)[-1]: d for d in status.details}
            packed["google.rpc.RetryInfo"].Unpack(retry)
            packed["google.rpc.ErrorInfo"].Unpack(info)
            assert info.reason == "QUEUE_FULL"
            assert retry.retry_delay.ToTimedelta().total_seconds() > 0
            assert "limit is 4" in (error.details() or "")
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        # Once the queue drains, calls are served again.
        assert len((await stub.EmbedImage(request("rocket.jpg"))).embedding.values) == 16


async def test_a_stream_waits_for_room_instead_of_failing(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_with(base_settings, max_queue_size=4, max_batch_images=4)
    async with running_server(settings) as (server, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        spy = DeviceSpy(delay_s=0.02)
        spy.install(monkeypatch)
        batcher = (await server.registry.get("")).batcher
        peak = 0

        async def items() -> AsyncIterator[pb.EmbedImageStreamRequest]:
            nonlocal peak
            for index in range(40):
                peak = max(peak, batcher.capacity.used)
                yield pb.EmbedImageStreamRequest(
                    id=str(index), image=pb.Image(content=photo_bytes(PHOTOS[index % 4]))
                )

        responses = []
        async for response in stub.EmbedImageStream(items()):
            peak = max(peak, batcher.capacity.used)
            responses.append(response)
        assert [r.id for r in responses] == [str(i) for i in range(40)]
        assert all(r.WhichOneof("result") == "embedding" for r in responses)
        assert peak == 4  # the bound was reached and never passed
        assert sum(spy.batches) == 40


def test_a_vector_is_normalized_the_same_whatever_it_was_batched_with() -> None:
    # The batcher normalizes a whole batch in one pass on the device thread: a row's unit
    # vector must not depend on the rows beside it (nor differ from a lone vector's).
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((33, 512)).astype(np.float32) * 40.0
    rows[5] = 0.0  # a zero vector stays zero (eps), as torch.nn.functional.normalize keeps it
    whole = l2_normalize_rows(rows)
    assert whole.dtype == np.float32
    for size in (1, 2, 7, 33):
        part = l2_normalize_rows(rows[:size].copy())
        np.testing.assert_array_equal(part, whole[:size])
    for index, row in enumerate(rows):
        np.testing.assert_array_equal(l2_normalize_rows(row[np.newaxis])[0], whole[index])
    np.testing.assert_allclose(np.linalg.norm(np.delete(whole, 5, axis=0), axis=1), 1.0, rtol=1e-6)
    assert not whole[5].any()
    expected = torch.nn.functional.normalize(torch.from_numpy(rows), dim=1).numpy()
    np.testing.assert_allclose(whole, expected, rtol=1e-6, atol=1e-7)
