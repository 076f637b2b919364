"""The gRPC listener, watched: if grpc's serving loop dies, the process is told at once.

grpcio's asyncio server (1.85) accepts calls in one task, its serving loop. A
single call whose HTTP/2 ``:path`` is not UTF-8 makes that loop raise
``UnicodeDecodeError`` (it decodes the path of every call no handler was
registered for), after which grpc closes the port while the process lives on.
No handler or interceptor runs before that decode, so the call cannot be
refused earlier. Recovering in the same process is not safe either: after that
failure the process crashed later with SIGSEGV (in tests: when the dead server
was stopped, or simply later on), whether or not a new server had taken the
port. So the listener watches its serving loop and calls ``on_fatal`` the
moment it dies: the process must exit non-zero so that its supervisor starts a
fresh one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

logger = logging.getLogger(__name__)

# The coroutine grpc's AioServer runs as its serving loop (grpcio 1.6x to 1.85 at least).
SERVING_LOOP = "_server_main_loop"


class ListenerError(OSError):
    """The address cannot be listened on."""


class GrpcListener:
    """Binds one gRPC server to an address, starts it, and reports if its serving loop dies."""

    def __init__(
        self,
        server: grpc.aio.Server,
        address: str,
        credentials: grpc.ServerCredentials | None,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self.server = server
        self._address = address
        self._credentials = credentials
        self._on_fatal = on_fatal
        self._stopping = False
        self.port = 0

    def bind(self) -> int:
        """Listen on the address; returns the port (useful with port 0)."""
        try:
            if self._credentials is None:
                port = self.server.add_insecure_port(self._address)
            else:
                port = self.server.add_secure_port(self._address, self._credentials)
        except RuntimeError as exc:  # grpcio raises this when the bind fails
            raise ListenerError(_bind_failure(self._address)) from exc
        if port == 0:
            raise ListenerError(_bind_failure(self._address))
        self.port = port
        return port

    async def start(self) -> None:
        """Start answering calls, watching the serving loop."""
        loop = asyncio.get_running_loop()
        previous = loop.get_task_factory()

        def watch(
            event_loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
        ) -> asyncio.Future[Any]:
            task: asyncio.Future[Any]
            if previous is not None:
                task = previous(event_loop, coro, **kwargs)
            else:
                task = asyncio.Task(coro, loop=event_loop, **kwargs)
            if getattr(coro, "__qualname__", "").endswith(SERVING_LOOP):
                task.add_done_callback(self._serving_loop_ended)
            return task

        # Only while grpc starts: that is where it creates its serving-loop task.
        loop.set_task_factory(watch)  # type: ignore[arg-type]  # typeshed wants a Task
        try:
            await self.server.start()
        finally:
            loop.set_task_factory(previous)

    async def stop(self, grace: float | None) -> None:
        """Stop the server: refuse new calls, let those in flight finish within ``grace``."""
        self._stopping = True
        await self.server.stop(grace)

    def _serving_loop_ended(self, task: asyncio.Future[Any]) -> None:
        if self._stopping or task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        assert error is not None
        logger.critical(
            "the gRPC serving loop died (%s: a known grpcio fault, such as a call whose path is "
            "not UTF-8); the port no longer answers, so the process must restart",
            type(error).__name__,
        )
        self._on_fatal(error)


def _bind_failure(address: str) -> str:
    return (
        f"cannot listen on {address}: the address is in use by another process or is not "
        "an address of this machine (--reuse-port lets several servers share a port on purpose)"
    )
