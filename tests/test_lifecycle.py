"""Health, reflection, lazy loading, graceful drain and a free event loop, in-process."""

from __future__ import annotations

import asyncio
import gc
import io
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from clipvision.server.config.settings import Settings
from clipvision.server.runtime import checkpoint as checkpoint_module
from clipvision.server.runtime import models
from clipvision.server.runtime.checkpoint import Checkpoint
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with

SERVICE = "clipvision.v1.EmbeddingService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def test_health_is_not_serving_until_loaded_then_serving(base_settings: Settings) -> None:
    async with running_server(base_settings, load=False) as (server, channel):
        assert await health_of(channel) == NOT_SERVING
        assert await health_of(channel, SERVICE) == NOT_SERVING
        await server.load_models()
        assert await health_of(channel) == SERVING
        assert await health_of(channel, SERVICE) == SERVING


async def test_drain_turns_health_off_and_finishes_in_flight_calls(base_settings: Settings) -> None:
    # A batch delay keeps the call in flight while the drain starts.
    settings = settings_with(base_settings, max_batch_delay_ms=400.0)
    async with running_server(settings) as (server, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        request = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("rocket.jpg")))
        in_flight = asyncio.ensure_future(stub.EmbedImage(request))
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(server.stop(grace=5.0))
        assert (await watch.read()).status == NOT_SERVING
        watch.cancel()  # an open Watch would hold the drain for the whole grace period
        response = await in_flight
        assert len(response.embedding.values) == 16
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EmbedImage(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_reflection_lists_and_describes_the_services(
    server_channel: tuple[object, grpc.aio.Channel],
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server_channel[1])

    async def ask(
        request: reflection_pb2.ServerReflectionRequest,
    ) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo()
        await call.write(request)
        await call.done_writing()
        response: reflection_pb2.ServerReflectionResponse = await call.read()
        return response

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in listed.list_services_response.service}
    assert {SERVICE, "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    described = await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    files = described.file_descriptor_response.file_descriptor_proto
    assert any(b"EmbedImageStream" in proto for proto in files)


async def test_lazy_mode_loads_once_under_concurrent_first_requests(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_load: Callable[..., Checkpoint] = checkpoint_module.load_checkpoint

    def counting_load(spec: object, **kwargs: object) -> Checkpoint:
        calls.append(spec.name)  # type: ignore[attr-defined]
        time.sleep(0.2)  # widen the window in which concurrent requests pile up
        return real_load(spec, **kwargs)

    monkeypatch.setattr(models, "load_checkpoint", counting_load)
    settings = settings_with(base_settings, lazy_load=True)
    async with running_server(settings) as (_, channel):
        assert await health_of(channel) == SERVING  # lazy: ready to take the first request
        stub = pb_grpc.EmbeddingServiceStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert [m.loaded for m in info.models] == [False, False]
        request = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("chelsea.png")))
        responses = await asyncio.gather(*(stub.EmbedImage(request) for _ in range(12)))
        vectors = np.array([r.embedding.values for r in responses])
        assert vectors.shape == (12, 16)
        # Batch composition moves float rounding, nothing more.
        np.testing.assert_allclose(vectors, np.broadcast_to(vectors[0], vectors.shape), atol=1e-6)
        assert calls == ["tiny"]
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert [m.loaded for m in info.models] == [True, False]


async def test_event_loop_stays_responsive_while_embedding(base_settings: Settings) -> None:
    # A 24-megapixel image costs far more than the lag bound to decode and resize,
    # so a pipeline that blocked the loop would fail this test. It is smooth, so its
    # file stays small and moving the request (client and server share this loop)
    # costs little.
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    big = Image.fromarray(noise).resize((6000, 4000), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()

    async with running_server(base_settings) as (server, channel):
        # As serve() does once the models are loaded (allocator.MemoryTrimmer): what is alive
        # leaves the collector, else a full collection of torch's objects (about 0.3 s, every
        # thread stopped) can fall in the measurement, which is not what it measures.
        gc.collect()
        gc.freeze()
        model = await server.registry.get("")
        started = time.perf_counter()
        model.encoder.preprocess(data)
        one_image_blocking = time.perf_counter() - started
        assert one_image_blocking > 0.1, "the test image is too cheap to detect blocking"

        stub = pb_grpc.EmbeddingServiceStub(channel)
        worst_lag = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal worst_lag
            while not stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                worst_lag = max(worst_lag, time.perf_counter() - before - 0.005)

        ticking = asyncio.ensure_future(ticker())
        images = [pb.Image(content=data)] * 8
        response = await stub.EmbedImages(pb.EmbedImagesRequest(images=images))
        stop.set()
        await ticking
        gc.unfreeze()
        assert all(r.WhichOneof("result") == "embedding" for r in response.results)
        assert worst_lag < one_image_blocking / 2, (worst_lag, one_image_blocking)
