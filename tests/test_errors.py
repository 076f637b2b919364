"""Every request-level fault becomes the documented status, with an ErrorInfo reason."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clipvision.server.app import ClipVisionServer
from clipvision.server.config.settings import Settings
from clipvision.server.runtime.image_encoder import ClipImageEncoder
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call (google.rpc.Status in the trailers)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the status carries no google.rpc.Status details"
    assert status.code == error.code().value[0]
    assert status.message == error.details()
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == "clipvision.dev"
    return info


async def expect_status(call: object, code: grpc.StatusCode, reason: str) -> str:
    """Await a call that must fail with ``code`` and ``reason``; returns its message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    assert error_info(caught.value).reason == reason
    return caught.value.details() or ""


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (pb.Image(content=b"definitely not an image"), "IMAGE_FORMAT_UNSUPPORTED"),
        (pb.Image(content=photo_bytes("rocket.jpg")[:2000]), "IMAGE_DECODE_FAILED"),
        (pb.Image(content=b""), "IMAGE_EMPTY"),
        (pb.Image(), "IMAGE_MISSING"),
        (pb.Image(uri="data:image/png;base64,@@@not-base64@@@"), "URI_INVALID"),
        (pb.Image(uri="data:image/png;base64"), "URI_INVALID"),
        (pb.Image(uri="ftp://example.com/cat.jpg"), "URI_INVALID"),
    ],
)
async def test_bad_images_are_invalid_argument(stub: Stub, image: pb.Image, reason: str) -> None:
    message = await expect_status(
        stub.EmbedImage(pb.EmbedImageRequest(image=image)), grpc.StatusCode.INVALID_ARGUMENT, reason
    )
    assert message.endswith(".")


@pytest.mark.parametrize(
    "uri", ["file:///etc/passwd", "https://example.com/cat.jpg", "HTTP://169.254.169.254/"]
)
async def test_fetching_uris_are_refused_by_default(stub: Stub, uri: str) -> None:
    message = await expect_status(
        stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(uri=uri))),
        grpc.StatusCode.PERMISSION_DENIED,
        "URI_SCHEME_REFUSED",
    )
    assert "not enabled" in message


async def test_unknown_model_is_not_found_and_lists_the_served_ones(stub: Stub) -> None:
    request = pb.EmbedImageRequest(
        image=pb.Image(content=photo_bytes("rocket.jpg")), model="ViT-H/14"
    )
    message = await expect_status(
        stub.EmbedImage(request), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"
    )
    assert "tiny" in message
    assert "tiny-vision" in message
    batch = pb.EmbedImagesRequest(images=[request.image], model="ViT-H/14")
    await expect_status(stub.EmbedImages(batch), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


async def test_too_many_images_in_one_batch_is_invalid_argument(stub: Stub) -> None:
    images = [pb.Image(content=b"x")] * 17
    message = await expect_status(
        stub.EmbedImages(pb.EmbedImagesRequest(images=images)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TOO_MANY_IMAGES",
    )
    assert "16" in message
    assert "17" in message


async def test_oversized_message_is_resource_exhausted(base_settings: Settings) -> None:
    settings = settings_with(base_settings, max_message_bytes=64 * 1024)
    async with running_server(settings) as (_, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.EmbedImageRequest(image=pb.Image(content=b"\xff" * (100 * 1024)))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EmbedImage(request)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_unavailable_while_loading_then_served(base_settings: Settings) -> None:
    async with running_server(base_settings, load=False) as (server, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("rocket.jpg")))
        message = await expect_status(
            stub.EmbedImage(request), grpc.StatusCode.UNAVAILABLE, "MODEL_LOADING"
        )
        assert "retry" in message
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert [m.loaded for m in info.models] == [False, False]
        await server.load_models()
        response = await stub.EmbedImage(request)
        assert len(response.embedding.values) == 16


async def test_unavailable_while_draining(base_settings: Settings) -> None:
    async with running_server(base_settings) as (server, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        server.registry.drain()
        request = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("rocket.jpg")))
        await expect_status(
            stub.EmbedImage(request), grpc.StatusCode.UNAVAILABLE, "SERVER_DRAINING"
        )


async def test_bugs_are_internal_without_leaking_details(
    server_channel: tuple[ClipVisionServer, grpc.aio.Channel],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: ClipImageEncoder, data: bytes) -> object:
        raise RuntimeError("secret internal detail /srv/models/key")

    monkeypatch.setattr(ClipImageEncoder, "preprocess", broken)
    stub = pb_grpc.EmbeddingServiceStub(server_channel[1])
    request = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("rocket.jpg")))
    message = await expect_status(stub.EmbedImage(request), grpc.StatusCode.INTERNAL, "INTERNAL")
    assert "secret" not in message
    assert "secret internal detail" in caplog.text  # the operator sees the traceback

    batch = await stub.EmbedImages(pb.EmbedImagesRequest(images=[request.image]))
    assert batch.results[0].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "secret" not in batch.results[0].error.message


async def test_deadline_is_honoured(stub: Stub) -> None:
    request = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("retina.jpg")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EmbedImage(request, timeout=0.001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server is unharmed.
    assert (await stub.EmbedImage(request, timeout=30)).embedding.values


async def test_cancelled_call_reports_cancelled(stub: Stub) -> None:
    request = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("retina.jpg")))
    call = stub.EmbedImage(request)
    await asyncio.sleep(0.005)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await call.code() == grpc.StatusCode.CANCELLED
    assert (await stub.EmbedImage(request)).embedding.values
