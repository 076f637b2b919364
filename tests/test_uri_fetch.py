"""Remote fetches run on the event loop under one total deadline and a bound on their number.

A host that drips its status line and headers a byte at a time used to keep a
preprocessing worker busy until the client's own deadline, since every read
made progress; with two such calls no image could be decoded at all.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import grpc
import pytest

from clipvision.server.config.flags import parse_settings
from clipvision.server.config.limits import FetchPolicy
from clipvision.server.config.settings import Settings
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with
from tests.test_errors import error_info

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

PHOTO = photo_bytes("rocket.jpg")
FETCH_TIMEOUT_S = 3.0


class DripHandler(BaseHTTPRequestHandler):
    """/photo answers at once; /drip sends its status line and headers a byte per 0.1 s."""

    def do_GET(self) -> None:
        if self.path == "/photo":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PHOTO)))
            self.end_headers()
            self.wfile.write(PHOTO)
            return
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: " + b"x" * 200
        for byte in head[:100]:  # bounded: 10 s at most, less once the client hangs up
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, format: str, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    """The fetcher hangs up on the dripping host on purpose."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@pytest.fixture(scope="module")
def drip_base() -> Iterator[str]:
    """The dripping HTTP server on 127.0.0.1, for as long as the module runs."""
    server = QuietServer(("127.0.0.1", 0), DripHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
async def fetch_stub(base_settings: Settings) -> AsyncIterator[Stub]:
    """A server that fetches from localhost, two URIs at a time (preprocess_workers is 2 too)."""
    policy = FetchPolicy(
        fetch_domains=("localhost",),
        allow_http=True,
        allow_private_addresses=True,
        timeout_s=FETCH_TIMEOUT_S,
        max_concurrent_fetches=2,
    )
    async with running_server(settings_with(base_settings, fetch_policy=policy)) as (_, channel):
        yield pb_grpc.EmbeddingServiceStub(channel)


def by_uri(uri: str) -> pb.EmbedImageRequest:
    return pb.EmbedImageRequest(image=pb.Image(uri=uri))


async def test_dripping_headers_are_cut_at_the_fetch_timeout(
    fetch_stub: Stub, drip_base: str
) -> None:
    async def drip() -> tuple[grpc.aio.AioRpcError, float]:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fetch_stub.EmbedImage(by_uri(f"{drip_base}/drip"), timeout=10)
        return caught.value, time.monotonic() - started

    content = pb.EmbedImageRequest(image=pb.Image(content=PHOTO))
    reply = await fetch_stub.EmbedImage(content, timeout=5)  # warm: the first call is slower
    drips = [asyncio.create_task(drip()) for _ in range(2)]
    await asyncio.sleep(0.3)
    # Both fetch slots are taken: a third fetch waits, for as long as its own deadline.
    with pytest.raises(grpc.aio.AioRpcError) as waited:
        await fetch_stub.EmbedImage(by_uri(f"{drip_base}/photo"), timeout=0.5)
    assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Images sent as bytes are answered promptly all the while.
    for _ in range(3):
        started = time.monotonic()
        assert (await fetch_stub.EmbedImage(content, timeout=5)).embedding.values
        assert time.monotonic() - started < 1
    assert not any(task.done() for task in drips)

    for error, seconds in await asyncio.gather(*drips):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).reason == "URI_UNREADABLE"
        assert f"longer than {FETCH_TIMEOUT_S:g} s" in (error.details() or "")
        assert FETCH_TIMEOUT_S - 0.2 < seconds < FETCH_TIMEOUT_S + 1.5  # slack for a busy CI
    # The slots are free again.
    fetched = await fetch_stub.EmbedImage(by_uri(f"{drip_base}/photo"), timeout=5)
    assert list(fetched.embedding.values) == list(reply.embedding.values)


def test_fetch_concurrency_is_an_option() -> None:
    assert parse_settings([], environ={}).fetch_policy.max_concurrent_fetches == 16
    from_env = parse_settings([], environ={"CLIPVISION_MAX_CONCURRENT_FETCHES": "4"})
    assert from_env.fetch_policy.max_concurrent_fetches == 4
    flagged = parse_settings(["--max-concurrent-fetches", "2"], environ={})
    assert flagged.fetch_policy.max_concurrent_fetches == 2
    with pytest.raises(SystemExit):
        parse_settings(["--max-concurrent-fetches", "0"], environ={})
