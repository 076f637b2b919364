"""The gRPC listener: calls to paths no service registered never reach grpc's serving loop.

grpcio's asyncio server (1.85) accepts calls in one task, its serving loop. It
requests the calls of each registered method, and those of every other path
through one coroutine (``AioServer._request_call``); for the latter it decodes
the HTTP/2 ``:path`` as UTF-8 in the serving loop itself, so one call whose path
is not UTF-8 made that loop raise and grpc close the port (and the process
crashed later when it was stopped). Every method this server serves is
registered, so a call on any other path is junk or a typo: the listener, whose
task factory sees grpc create that coroutine as the server starts, runs it
inside a loop of its own that answers each such call UNIMPLEMENTED
(METHOD_NOT_FOUND) without decoding its path and asks grpc for the next, and so
never hands one to the serving loop.

This relies on grpcio's internals: pyproject pins grpcio to the releases it is
tested on, the listener checks at start that it found the coroutine (and says so
in the log if not), and the serving loop stays watched: if it dies anyway,
``on_fatal`` tells the process, which must exit non-zero so that its supervisor
starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import grpc
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # no stubs: grpc internals

logger = logging.getLogger(__name__)

# The coroutine grpc's AioServer runs as its serving loop (grpcio 1.6x to 1.85 at least).
SERVING_LOOP = "AioServer._server_main_loop"
# The coroutine through which it takes the next call of a path no service registered.
UNREGISTERED_CALLS = "AioServer._request_call"


class ListenerError(OSError):
    """The address cannot be listened on."""


class GrpcListener:
    """Binds one gRPC server to an address, starts it, refuses calls on unregistered paths
    before grpc decodes them, and reports if its serving loop dies anyway."""

    def __init__(
        self,
        server: grpc.aio.Server,
        address: str,
        credentials: grpc.ServerCredentials | None,
        on_fatal: Callable[[BaseException], None],
        refuse_unregistered: Callable[[], grpc.Status] | None = None,
    ) -> None:
        self.server = server
        self._address = address
        self._credentials = credentials
        self._on_fatal = on_fatal
        # Counts and logs one refused call, and gives the status to answer it with.
        self._refuse_unregistered = refuse_unregistered
        self._stopping = False
        self._refusals: set[asyncio.Task[None]] = set()
        self.guards_unregistered = False
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
        """Start answering calls, guarding and watching the serving loop."""
        loop = asyncio.get_running_loop()
        previous = loop.get_task_factory()

        def watch(
            event_loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
        ) -> asyncio.Future[Any]:
            name = getattr(coro, "__qualname__", "")
            is_serving_loop = name.endswith(SERVING_LOOP)
            if name.endswith(UNREGISTERED_CALLS) and self._refuse_unregistered is not None:
                coro = self._take_unregistered(coro)
                self.guards_unregistered = True
            task: asyncio.Future[Any]
            if previous is not None:
                task = previous(event_loop, coro, **kwargs)
            else:
                task = asyncio.Task(coro, loop=event_loop, **kwargs)
            if is_serving_loop:
                task.add_done_callback(self._serving_loop_ended)
            return task

        # Only while grpc starts: that is where it creates its serving-loop task and the
        # first (and, guarded, only) task that takes unregistered calls.
        loop.set_task_factory(watch)  # type: ignore[arg-type]  # typeshed wants a Task
        try:
            await self.server.start()
        finally:
            loop.set_task_factory(previous)
        if self._refuse_unregistered is not None and not self.guards_unregistered:
            logger.warning(
                "grpcio %s takes calls to unregistered paths in a way this server does not "
                "know; a call whose path is not UTF-8 would end its serving loop (the process "
                "then exits with status 1 for its supervisor to restart it)",
                grpc.__version__,
            )

    async def stop(self, grace: float | None) -> None:
        """Stop the server: refuse new calls, let those in flight finish within ``grace``."""
        self._stopping = True
        await self.server.stop(grace)
        for task in list(self._refusals):
            task.cancel()

    async def _take_unregistered(self, first: Coroutine[Any, Any, Any]) -> NoReturn:
        """Stand in for grpc's task that takes the next call of an unregistered path: take
        each such call, answer it, take the next. It ends only when grpc cancels it (the
        server stops), so grpc's serving loop never sees one of these calls."""
        aio: Any = self.server._server  # type: ignore[attr-defined]  # cygrpc.AioServer
        pending: Coroutine[Any, Any, Any] = first
        while True:
            try:
                call = await pending
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # grpc's _RequestCallError, as the server shuts down
                if self._stopping or not aio.is_running():
                    raise
                logger.warning("taking a call for an unregistered path failed: %r", exc)
                await asyncio.sleep(0.01)  # not a busy loop if grpc keeps failing
                pending = aio._request_call()
                continue
            pending = aio._request_call()  # ask for the next one before answering this one
            task = asyncio.get_running_loop().create_task(self._answer_unregistered(call))
            self._refusals.add(task)
            task.add_done_callback(self._refusals.discard)

    async def _answer_unregistered(self, call: Any) -> None:
        """UNIMPLEMENTED with METHOD_NOT_FOUND for one call, as grpc would send for a path no
        handler has, but with our error details; its path is never read."""
        assert self._refuse_unregistered is not None
        status = self._refuse_unregistered()
        try:
            await cygrpc._send_error_status_from_server(
                call,
                cygrpc.StatusCode.unimplemented,
                status.details,
                tuple(status.trailing_metadata),
                cygrpc.SendInitialMetadataOperation((), 0),  # a status goes after headers
                asyncio.get_running_loop(),
            )
        except Exception as exc:  # the caller may be gone already: nothing more to do
            logger.debug("answering a call on an unregistered path failed: %r", exc)

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
