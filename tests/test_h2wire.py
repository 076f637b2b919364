"""The raw HTTP/2 toolkit speaks gRPC well enough that the real server answers it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

from clipvision.server.config.settings import Settings
from clipvision.v1 import embedding_service_pb2 as pb
from tests.conftest import settings_with
from tests.h2wire import WireConnection, grpc_message, split_messages
from tests.live_server import LiveServer, live_server

GET_MODEL_INFO = "/clipvision.v1.EmbeddingService/GetModelInfo"
EMBED_IMAGE = "/clipvision.v1.EmbeddingService/EmbedImage"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
OK, DEADLINE_EXCEEDED, UNIMPLEMENTED, UNAUTHENTICATED = 0, 4, 12, 16


@pytest.fixture(scope="module")
async def live(base_settings: Settings) -> AsyncIterator[LiveServer]:
    """One loaded server for the read-only tests of this module."""
    async with live_server(base_settings) as server:
        yield server


def test_messages_are_framed_and_may_lie_about_their_length() -> None:
    assert grpc_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert grpc_message(b"abc", compressed=True, declared_length=1000) == b"\x01\x00\x00\x03\xe8abc"
    assert split_messages(grpc_message(b"a") + grpc_message(b"") + b"\x00\x00\x00\x00\x09xy") == [
        b"a",
        b"",
    ]


async def test_a_hand_made_get_model_info_is_answered(live: LiveServer) -> None:
    async with await WireConnection.open(live.port) as wire:
        result = await wire.call(GET_MODEL_INFO, pb.GetModelInfoRequest().SerializeToString())
    assert result.http_status == 200
    assert result.grpc_status == OK
    (message,) = result.messages
    info = pb.GetModelInfoResponse.FromString(message)
    assert [model.name for model in info.models] == ["tiny", "tiny-vision"]


async def test_a_hand_made_health_check_answers_serving(live: LiveServer) -> None:
    async with await WireConnection.open(live.port) as wire:
        request = health_pb2.HealthCheckRequest(service="clipvision.v1.EmbeddingService")
        result = await wire.call(HEALTH_CHECK, request.SerializeToString())
    assert result.grpc_status == OK
    (message,) = result.messages
    assert health_pb2.HealthCheckResponse.FromString(message).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


async def test_many_streams_share_one_connection(live: LiveServer) -> None:
    body = pb.GetModelInfoRequest().SerializeToString()
    async with await WireConnection.open(live.port) as wire:
        streams = []
        for _ in range(50):
            stream_id = wire.start_call(GET_MODEL_INFO)
            wire.send_message(stream_id, body)
            streams.append(stream_id)
        await wire.flush()
        results = await wire.results(streams, timeout_s=10)
    assert [result.grpc_status for result in results] == [OK] * 50
    assert len({result.stream_id for result in results}) == 50


async def test_an_unknown_path_in_any_bytes_is_unimplemented(live: LiveServer) -> None:
    async with await WireConnection.open(live.port) as wire:
        result = await wire.call(b"/no.Such/Method", b"")
    assert result.grpc_status == UNIMPLEMENTED


async def test_a_message_that_never_completes_meets_its_grpc_timeout(live: LiveServer) -> None:
    async with await WireConnection.open(live.port) as wire:
        stream_id = wire.start_call(EMBED_IMAGE, grpc_timeout="300m")
        # The prefix announces 1,000 bytes; 900 come, and no END_STREAM.
        wire.send_message(stream_id, b"\x00" * 900, declared_length=1000, end_stream=False)
        await wire.flush()
        result = await wire.result(stream_id, timeout_s=10)
        assert result.grpc_status == DEADLINE_EXCEEDED
        # The connection is still good for the next call.
        follow_up = await wire.call(GET_MODEL_INFO, b"")
    assert follow_up.grpc_status == OK


async def test_metadata_reaches_the_server_and_trailers_come_back(live: LiveServer) -> None:
    async with await WireConnection.open(live.port) as wire:
        result = await wire.call(GET_MODEL_INFO, b"", [("x-request-id", "wire-test-1")])
    assert result.grpc_status == OK
    assert result.metadata(b"x-request-id") == b"wire-test-1"


async def test_authorization_and_status_details_travel(base_settings: Settings) -> None:
    settings = settings_with(base_settings, auth_token="wire-secret")
    async with live_server(settings) as server, await WireConnection.open(server.port) as wire:
        refused = await wire.call(GET_MODEL_INFO, b"")
        allowed = await wire.call(GET_MODEL_INFO, b"", [("authorization", "Bearer wire-secret")])
    assert refused.grpc_status == UNAUTHENTICATED
    assert refused.grpc_message
    assert refused.status_details is not None
    status = status_pb2.Status.FromString(refused.status_details)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "UNAUTHENTICATED"
    assert allowed.grpc_status == OK


async def test_a_reset_stream_and_a_stopping_server_are_reported(base_settings: Settings) -> None:
    async with live_server(base_settings) as server:
        wire = await WireConnection.open(server.port)
        try:
            stream_id = wire.start_call(EMBED_IMAGE)
            wire.reset(stream_id)
            await wire.round_trip()
            assert wire.stream(stream_id).reset_by_us
            assert wire.stream(stream_id).grpc_status is None
            stopping = asyncio.create_task(server.server.stop(grace=0.5))
            goaway = await wire.wait_goaway(timeout_s=10)
            await stopping
            assert goaway is not None, (wire.goaways, wire.close_reason)
            assert await wire.wait_closed(timeout_s=10)
        finally:
            await wire.close()
