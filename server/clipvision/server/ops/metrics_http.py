"""The Prometheus HTTP endpoint, bounded in connections and header time, on one thread of its own.

prometheus_client's ``start_http_server`` gives every connection a thread and
waits forever for its request, so half-sent requests could exhaust the process.
Here one asyncio event loop on one thread serves every connection, each an
``asyncio.Protocol`` with a timer, no thread or task: a stalled connection
costs a socket until its header timeout, the connections open at once are
capped, and at the cap a new connection replaces the oldest one still waiting
for its request head, so stalled connections cannot lock scrapes out (a real
scraper sends its request within milliseconds of connecting; an attacker must
keep outpacing the eviction to hold a slot). A thread pool with socket timeouts
would instead let a few stalled connections hold every thread for the whole
timeout. The loop is not the gRPC server's, so a scrape is answered even when
that loop is busy, and the exposition's blocking work never runs on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote, urlsplit
from wsgiref.types import WSGIApplication, WSGIEnvironment

import h11

logger = logging.getLogger(__name__)

# Status code, reason phrase, headers, body.
Answer = tuple[int, str, list[tuple[str, str]], bytes]

# Connections open at once (each costs one file descriptor and at most MAX_HEAD_BYTES
# of buffered request); a scraper needs one, the rest is headroom for eviction.
MAX_CONNECTIONS = 64
# From accept to a complete request head; a scraper on any network needs far less.
HEADER_TIMEOUT_S = 5.0
# For a client to take the whole response once it is written; then it is cut off.
RESPONSE_TIMEOUT_S = 10.0
# Request line and headers; Prometheus sends a few hundred bytes.
MAX_HEAD_BYTES = 8192
# How often, at most, dropped connections are reported in the log.
DROP_LOG_INTERVAL_S = 60.0
# The kernel's queue of connections not yet accepted: it holds no file descriptor, and a
# deep one spares a scraper's SYN being dropped (and retried a second later) during a flood.
LISTEN_BACKLOG = 1024
# Connections taken from that queue per turn of the loop. Far below MAX_CONNECTIONS, so a
# scraper's request is read (a turn or two after its accept) before a flood of newer
# connections can make it the oldest one waiting, the one evicted.
ACCEPT_BATCH = 8
JOIN_TIMEOUT_S = 5.0


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket on the first address ``host`` resolves to, as prometheus_client binds."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(sockaddr, family=family, backlog=backlog)


def _environ(request: h11.Request, server: tuple[str, int]) -> WSGIEnvironment:
    """The PEP 3333 environ of a request that has no body."""
    target = urlsplit(request.target.decode("latin-1"))
    environ: WSGIEnvironment = {
        "REQUEST_METHOD": request.method.decode("ascii"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(target.path, encoding="latin-1"),
        "QUERY_STRING": target.query,
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": "HTTP/" + request.http_version.decode("ascii"),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),  # no body is read: one request, then close
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in request.headers:
        name = raw_name.decode("ascii").upper().replace("-", "_")
        key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{name}"
        value = raw_value.decode("latin-1")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def _call(app: WSGIApplication, environ: WSGIEnvironment) -> Answer:
    """Run a WSGI app to completion: status code and reason, headers, body."""
    started: list[tuple[str, list[tuple[str, str]]]] = []
    written: list[bytes] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> Callable[[bytes], object]:
        started.append((status, headers))
        return written.append

    chunks = app(environ, start_response)
    try:
        written.extend(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    status, headers = started[-1]
    code, _, reason = status.partition(" ")
    return int(code), reason, headers, b"".join(written)


@dataclass
class _Drops:
    """Connections closed by the limits since the last log line."""

    stalled: int = 0
    refused: int = 0
    last_logged: float = field(default=float("-inf"))


class _Connection(asyncio.Protocol):
    """One connection: read a request head within the timeout, answer it, close."""

    def __init__(self, endpoint: MetricsHTTPServer) -> None:
        self._endpoint = endpoint
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=endpoint.max_head_bytes)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.waiting_for_head = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Take a slot (or give up) and start the header timer."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self._endpoint.admit(self):
            transport.abort()
            return
        self._timer = asyncio.get_running_loop().call_later(
            self._endpoint.header_timeout_s, self._time_out
        )

    def data_received(self, data: bytes) -> None:
        """Feed the request head to h11; answer once it is complete or malformed."""
        if not self.waiting_for_head:
            return  # a body or pipelined requests: one request per connection, as before
        self._http.receive_data(data)
        try:
            event = self._http.next_event()
        except h11.RemoteProtocolError as error:
            status = HTTPStatus(error.error_status_hint)
            self._answer((status, status.phrase, [], b""), head_only=False)
            return
        if isinstance(event, h11.Request):
            self._answer(self._endpoint.call_app(event), head_only=event.method == b"HEAD")

    def eof_received(self) -> bool:
        """The client closed its side before a complete head: nothing to answer."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Free the slot and the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self._endpoint.forget(self)

    def abort(self) -> None:
        """Close at once, without flushing."""
        if self._transport is not None:
            self._transport.abort()

    def _time_out(self) -> None:
        self._endpoint.dropped(stalled=True)
        self.abort()

    def _answer(self, answer: Answer, head_only: bool) -> None:
        assert self._transport is not None
        self.waiting_for_head = False
        status, reason, headers, body = answer
        response = h11.Response(
            status_code=status,
            reason=reason,
            headers=[*headers, ("Content-Length", str(len(body))), ("Connection", "close")],
        )
        data = self._http.send(response) or b""
        if not head_only:
            data += self._http.send(h11.Data(data=body)) or b""
        self._transport.write(data + (self._http.send(h11.EndOfMessage()) or b""))
        # Closing flushes first; a client that does not read is cut off after the timeout.
        self._transport.close()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(
            self._endpoint.response_timeout_s, self._time_out
        )


class MetricsHTTPServer:
    """Serves a WSGI app (prometheus_client's) over HTTP/1.1 with bounded connections and time.

    One request per connection, answered with ``Connection: close``, as
    prometheus_client's own server does; ``start`` and ``close`` may be called
    from any thread, the rest runs on the endpoint's own loop.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        response_timeout_s: float = RESPONSE_TIMEOUT_S,
        max_head_bytes: int = MAX_HEAD_BYTES,
    ) -> None:
        self._app = app
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.response_timeout_s = response_timeout_s
        self.max_head_bytes = max_head_bytes
        # Dict order is accept order, so the first one waiting for its head is the oldest.
        self._connections: dict[_Connection, None] = {}
        self._drops = _Drops()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._address: tuple[str, int] = ("", 0)

    def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a port) and serve on a new thread; returns the port."""
        sock = _listen(host, port, LISTEN_BACKLOG)
        self._address = sock.getsockname()[:2]
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(sock, ready)), name="metrics-http", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            sock.close()
            raise
        return self._address[1]

    def close(self) -> None:
        """Stop listening, cut every open connection and end the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=JOIN_TIMEOUT_S)
        self._thread = None

    async def _serve(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            # asyncio accepts up to ``backlog`` connections per turn and re-listens with it;
            # listening again restores the kernel's deeper queue.
            server = await self._loop.create_server(
                lambda: _Connection(self), sock=sock, backlog=ACCEPT_BATCH
            )
            sock.listen(LISTEN_BACKLOG)
        except BaseException as error:
            ready.set_exception(error)
            return
        ready.set_result(None)
        async with server:
            await self._stop.wait()
            server.close()
            # Cut the connections here: from Python 3.12 leaving the block waits for them.
            for connection in list(self._connections):
                connection.abort()
            self._connections.clear()

    def admit(self, connection: _Connection) -> bool:
        """Give a new connection a slot, evicting the oldest one still waiting for its head."""
        assert self._stop is not None
        if self._stop.is_set():
            return False
        if len(self._connections) >= self.max_connections:
            oldest = next((c for c in self._connections if c.waiting_for_head), None)
            if oldest is None:
                self.dropped(stalled=False)
                return False
            del self._connections[oldest]
            oldest.abort()
            self.dropped(stalled=True)
        self._connections[connection] = None
        return True

    def forget(self, connection: _Connection) -> None:
        """Free a closed connection's slot."""
        self._connections.pop(connection, None)

    def call_app(self, request: h11.Request) -> Answer:
        """The app's answer to a request; a failing exposition is a 500 and a logged traceback."""
        try:
            return _call(self._app, _environ(request, self._address))
        except Exception:
            logger.exception("the metrics exposition failed")
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            return status, status.phrase, [], b""

    def dropped(self, *, stalled: bool) -> None:
        """Count a connection closed by the limits; say so in the log at most once a period."""
        if stalled:
            self._drops.stalled += 1
        else:
            self._drops.refused += 1
        now = time.monotonic()
        if now - self._drops.last_logged >= DROP_LOG_INTERVAL_S:
            logger.warning(
                "metrics endpoint: closed %d stalled connection(s) (no request within %.0f s, "
                "evicted at the limit of %d, or not reading the response) and refused %d "
                "while every connection was being answered",
                self._drops.stalled,
                self.header_timeout_s,
                self.max_connections,
                self._drops.refused,
            )
            self._drops = _Drops(last_logged=now)
