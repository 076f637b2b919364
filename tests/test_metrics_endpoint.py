"""The /metrics endpoint under hostile traffic: bounded threads, sockets and time."""

from __future__ import annotations

import asyncio
import collections
import gzip
import http.client
import threading
import time
from collections.abc import AsyncIterator

import psutil
import pytest
from prometheus_client import start_http_server

from clipvision.server.app import ClipVisionServer
from clipvision.server.config.settings import Settings
from clipvision.server.ops.metrics_http import (
    ACCEPT_BATCH,
    HEADER_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_HEAD_BYTES,
)
from tests.conftest import running_server, settings_with
from tests.scrape import scrape, value

ATTACK_SOCKETS = 300
# What the attacker sends on each connection: a request line cut in the middle.
HALF_REQUEST = b"GET /metr"


@pytest.fixture
async def metrics_server(base_settings: Settings) -> AsyncIterator[tuple[ClipVisionServer, int]]:
    """A real server (models not loaded: only the endpoint matters) with /metrics on a free port."""
    settings = settings_with(base_settings, metrics_address="127.0.0.1:0")
    async with running_server(settings, load=False) as (server, _):
        assert server.metrics_port is not None
        yield server, server.metrics_port


def server_side_sockets(port: int) -> int:
    """Accepted connections this process holds open on the metrics port."""
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.raddr
    )


def request(port: int, method: str, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to the endpoint (blocking): status, headers, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed this connection without answering (EOF or reset)."""
    try:
        return await reader.read(1024) == b""
    except ConnectionResetError:
        return True


async def test_stalled_connections_cost_no_thread_and_scrapes_still_succeed(
    metrics_server: tuple[ClipVisionServer, int],
) -> None:
    server, port = metrics_server
    await scrape(port)  # starts the thread that asyncio.to_thread uses, before counting
    threads, fds = threading.active_count(), psutil.Process().num_fds()
    held: collections.deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = collections.deque()
    attempted = 0
    stop = asyncio.Event()
    peak_threads = peak_server_sockets = 0

    async def attack() -> None:
        # Open stalled connections as fast as the loop allows, holding the newest 300.
        nonlocal attempted, peak_threads, peak_server_sockets
        while not stop.is_set() or attempted < ATTACK_SOCKETS:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HALF_REQUEST)
            held.append((reader, writer))
            attempted += 1
            if len(held) > ATTACK_SOCKETS:
                held.popleft()[1].close()
            if attempted % 50 == 0:
                peak_threads = max(peak_threads, threading.active_count())
                peak_server_sockets = max(peak_server_sockets, server_side_sockets(port))

    async def scrape_during_attack() -> list[float]:
        while attempted < 100:
            await asyncio.sleep(0.01)
        took = []
        for _ in range(3):
            started = time.monotonic()
            samples = await scrape(port)
            took.append(time.monotonic() - started)
            # The exposition of the server's own registry, not just any 200.
            assert value(samples, "clipvision_queue_depth", model="tiny") == 0
            assert any(name.startswith("clipvision_") for name, _ in samples)
        stop.set()
        return took

    async with asyncio.timeout(30):
        _, took = await asyncio.gather(attack(), scrape_during_attack())
    assert attempted >= ATTACK_SOCKETS
    assert max(took) < 3.0, took
    # One thread for the endpoint whatever the attacker does (before: one per connection).
    assert peak_threads <= threads + 2
    # The cap, plus sockets accepted or cut within the loop's current turn.
    server_bound = MAX_CONNECTIONS + 2 * ACCEPT_BATCH
    assert peak_server_sockets <= server_bound
    # Our 300 client sockets, at most that bound on the server's side, and nothing else grows.
    assert psutil.Process().num_fds() <= fds + ATTACK_SOCKETS + server_bound
    # Once the attacker stops opening, a scrape takes the place of a stalled connection.
    assert (await asyncio.to_thread(request, port, "GET", "/metrics"))[0] == 200

    # Every stalled connection is closed by the server within the header timeout.
    started = time.monotonic()
    async with asyncio.timeout(HEADER_TIMEOUT_S + 2):
        closed = await asyncio.gather(*(closed_by_server(reader) for reader, _ in held))
    assert all(closed)
    assert time.monotonic() - started <= HEADER_TIMEOUT_S + 1
    for _, writer in held:
        writer.close()
    assert server_side_sockets(port) == 0
    assert server.metrics_port == port


# Requests whose answers must be what prometheus_client's own server gave: content
# negotiation, compression, the name filter, any path, favicon, methods refused.
SAME_AS_BEFORE: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("GET", "/metrics", {}),
    ("GET", "/", {}),
    ("GET", "/favicon.ico", {}),
    ("GET", "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}),
    ("GET", "/metrics", {"Accept-Encoding": "gzip"}),
    ("GET", "/metrics?name[]=clipvision_model_load_seconds", {}),
    ("OPTIONS", "/metrics", {}),
    ("HEAD", "/metrics", {}),
    ("POST", "/metrics", {}),
)
COMPARED_HEADERS = ("Content-Type", "Content-Encoding", "Allow")


async def test_serves_what_prometheus_client_served(
    metrics_server: tuple[ClipVisionServer, int],
) -> None:
    server, port = metrics_server
    # prometheus_client's own server (the one the endpoint replaces) on the same registry.
    before, thread = start_http_server(0, addr="127.0.0.1", registry=server.metrics.registry)
    try:
        for method, path, headers in SAME_AS_BEFORE:
            ours, theirs = await asyncio.gather(
                asyncio.to_thread(request, port, method, path, **headers),
                asyncio.to_thread(request, before.server_port, method, path, **headers),
            )
            assert ours[0] == theirs[0], (method, path, headers)
            for name in COMPARED_HEADERS:
                assert ours[1].get(name) == theirs[1].get(name), (method, path, name)
            if method != "HEAD":  # a body is not sent in answer to HEAD (wsgiref sent one)
                assert unzipped(ours) == unzipped(theirs), (method, path, headers)
    finally:
        before.shutdown()
        before.server_close()
        thread.join(timeout=5)
    status, headers, body = await asyncio.to_thread(request, port, "GET", "/metrics")
    assert (status, headers["Connection"]) == (200, "close")
    assert b"# TYPE clipvision_batch_size histogram" in body


def unzipped(answer: tuple[int, dict[str, str], bytes]) -> bytes:
    """The body, decompressed if it came gzipped (gzip's header holds a time stamp)."""
    _, headers, body = answer
    return gzip.decompress(body) if headers.get("Content-Encoding") == "gzip" else body


async def test_malformed_or_oversized_request_heads_get_a_clean_error(
    metrics_server: tuple[ClipVisionServer, int],
) -> None:
    _, port = metrics_server
    for sent, expected in (
        (b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 400 "),
        (b"GET /\xff HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 "),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES, b"HTTP/1.1 431 "),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(expected), answer
    status, _, _ = await asyncio.to_thread(request, port, "GET", "/metrics")
    assert status == 200
