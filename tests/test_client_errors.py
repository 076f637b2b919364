"""One mapping from statuses to exceptions, whether the fault came as a status or in-band."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from clipvision.client import (
    AsyncEmbeddingClient,
    CallCancelledError,
    ClipVisionError,
    DeadlineExceededError,
    EmbeddingClient,
    ImageReadError,
    InternalError,
    InvalidImageError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_from_status,
)
from clipvision.v1 import embedding_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (3, "IMAGE_DECODE_FAILED", InvalidImageError),
        (3, "IMAGE_TOO_MANY_PIXELS", InvalidImageError),
        (3, "URI_INVALID", InvalidImageError),
        (3, "IMAGE_UNREADABLE", ImageReadError),
        (3, "TOO_MANY_IMAGES", InvalidRequestError),
        (5, "MODEL_NOT_FOUND", ModelNotFoundError),
        (7, "URI_SCHEME_REFUSED", PermissionDeniedError),
        (16, "", UnauthenticatedError),
        (8, "QUEUE_FULL", ResourceExhaustedError),
        (14, "MODEL_LOADING", UnavailableError),
        (14, "SERVER_DRAINING", UnavailableError),
        (4, "", DeadlineExceededError),
        (1, "", CallCancelledError),
        (13, "INTERNAL", InternalError),
        (12, "", ClipVisionError),  # UNIMPLEMENTED: an older server, say
        (99, "", InternalError),  # a number no gRPC version defines: UNKNOWN
    ],
)
def test_item_errors_and_statuses_map_to_one_class_each(
    code: int, reason: str, expected: type[ClipVisionError]
) -> None:
    from_number = error_from_status(code, reason, "What to do.")
    assert type(from_number) is expected
    if code != 99:
        status_code = next(c for c in grpc.StatusCode if c.value[0] == code)
        assert type(error_from_status(status_code, reason, "What to do.")) is expected
        assert from_number.code is status_code
    assert (from_number.reason, from_number.message) == (reason, "What to do.")


def queue_full_handler() -> grpc.GenericRpcHandler[object, object]:
    """Answers like an overloaded server: RESOURCE_EXHAUSTED, QUEUE_FULL, retry in 1.5 s."""

    async def embed_image(
        request: pb.EmbedImageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.EmbedImageResponse:
        info, retry = any_pb2.Any(), any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="clipvision.dev"))
        delay = duration_pb2.Duration(seconds=1, nanos=500_000_000)
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status = rpc_status.to_status(
            status_pb2.Status(code=8, message="The queue is full; retry.", details=[info, retry])
        )
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("abort returns only by raising")

    handler = grpc.unary_unary_rpc_method_handler(
        embed_image,
        request_deserializer=pb.EmbedImageRequest.FromString,
        response_serializer=pb.EmbedImageResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"EmbedImage": handler})


async def test_retry_info_from_the_server_becomes_retry_after_s() -> None:
    server = grpc.aio.server(handlers=[queue_full_handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncEmbeddingClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(ResourceExhaustedError) as caught:
                await client.embed_image(b"any bytes")
    finally:
        await server.stop(0)
    assert caught.value.reason == "QUEUE_FULL"
    assert caught.value.retry_after_s == pytest.approx(1.5)
    assert caught.value.message == "The queue is full; retry."


@pytest.mark.parametrize(
    ("code", "asked_again"),
    [
        (grpc.StatusCode.UNIMPLEMENTED, False),  # a server without GetModelInfo
        (grpc.StatusCode.PERMISSION_DENIED, False),
        (grpc.StatusCode.UNAVAILABLE, True),  # not reached: ask before the next stream
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),  # too busy to answer now
    ],
)
def test_a_failed_limits_question_is_asked_again_only_when_it_may_succeed(
    code: grpc.StatusCode, asked_again: bool
) -> None:
    with EmbeddingClient("127.0.0.1:1") as client:  # nothing is dialled
        client._limits_unknowable(error_from_status(code, "", "What to do."))
        assert client._limits_learned is not asked_again
        assert client._message_limit() == 64 * 1024 * 1024  # its own limit holds meanwhile
