"""The HTTP listener: uvicorn's embeddable server on the gRPC server's event loop, hardened.

The socket is bound when the server is built, before readiness, so a busy port
fails the start with one line. uvicorn runs without its signal handlers (the
process's entry point owns SIGTERM and SIGINT), lifespan, access log or
``Server`` header, on h11 with these bounds:

- a request head (line and headers) of at most MAX_HEAD_BYTES, else 400 and close;
- a request head complete within ``head_timeout_s`` of the connection's first byte
  (or of its opening): slowloris connections are closed; the body's own time is the
  exchange's (--request-read-timeout);
- at most ``max_connections`` open: past it, the oldest connection still waiting for
  its request head is closed to make room (a real client sends its head at once), or
  else the new one; idle keep-alive connections close after KEEP_ALIVE_S.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from clipvision.server.config.settings import TlsFiles

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
KEEP_ALIVE_S = 5
BACKLOG = 1024


class HttpBindError(OSError):
    """The HTTP address cannot be listened on."""


def guarded_protocol(
    head_timeout_s: float, max_connections: int, on_cut: Callable[[str], None]
) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the head timeout and the connection cap above."""
    waiting: dict[Any, None] = {}  # connections waiting for a request head, oldest first

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                oldest = next(iter(waiting), None)
                if oldest is None:
                    on_cut("connections")
                    transport.close()
                    return
                oldest.cut("connections")
            self._await_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                self._head_arrived()
            elif self.conn.their_state is h11.IDLE and data:
                self._await_head()  # part of a head: the clock runs from its first byte
            else:
                self._head_arrived()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_arrived()
            super().connection_lost(exc)

        def cut(self, why: str) -> None:
            self._head_arrived()
            on_cut(why)
            self.transport.close()

        def _await_head(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout_s, self.cut, "head timeout")
                waiting[self] = None

        def _head_arrived(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            waiting.pop(self, None)

    return GuardedH11Protocol


class HttpListener:
    """Binds the HTTP address at once; serves an ASGI app on it from ``start`` to ``stop``."""

    def __init__(
        self,
        app: ASGIApp,
        address: str,
        tls: TlsFiles | None,
        *,
        head_timeout_s: float,
        max_connections: int,
        on_cut: Callable[[str], None],
    ) -> None:
        self._sock = _bind(address)
        self.port: int = self._sock.getsockname()[1]
        self._config = uvicorn.Config(
            app,
            http=guarded_protocol(head_timeout_s, max_connections, on_cut),
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            # Callers are who connects: never a header a client could set.
            proxy_headers=False,
            timeout_keep_alive=KEEP_ALIVE_S,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            backlog=BACKLOG,
            ssl_certfile=str(tls.cert) if tls else None,
            ssl_keyfile=str(tls.key) if tls else None,
            ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        self._server: uvicorn.Server | None = None

    async def start(self) -> None:
        """Accept connections (without uvicorn's signal handlers: serve() owns the signals)."""
        config = self._config
        config.load()
        server = uvicorn.Server(config)
        # What Server.serve does before startup, less its signal handlers and process setup.
        server.lifespan = config.lifespan_class(config)
        self._server = server
        await server.startup(sockets=[self._sock])

    async def stop(self, grace: float) -> None:
        """Stop accepting, let calls in progress finish within ``grace``, close the rest."""
        server = self._server
        if server is None:
            self._sock.close()
            return
        self._server = None
        self._config.timeout_graceful_shutdown = max(1, round(grace))
        await server.shutdown(sockets=[self._sock])


def _bind(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104  # the operator's own address
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Only TIME_WAIT is ignored: a port another process listens on still fails.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise HttpBindError(f"cannot listen for HTTP on {address}: {reason}") from None
    sock.setblocking(False)
    return sock
