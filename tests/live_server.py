"""A real server on the test's event loop, reachable by address, for clients and CLIs.

Blocking clients must not run on the loop that serves them: tests call them
through ``asyncio.to_thread`` and run command-line tools as asyncio subprocesses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from clipvision.server.app import ClipVisionServer, create_server
from clipvision.server.config.settings import Settings


@dataclass(frozen=True)
class LiveServer:
    """A started server and the address it listens on."""

    server: ClipVisionServer
    port: int

    @property
    def address(self) -> str:
        """HOST:PORT to dial."""
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def live_server(
    settings: Settings,
    *,
    load: bool = True,
) -> AsyncIterator[LiveServer]:
    """Start a real server on 127.0.0.1 and stop it afterwards."""
    server, port = await create_server(settings)
    await server.start()
    try:
        if load:
            await server.load_models()
        yield LiveServer(server, port)
    finally:
        await server.stop(grace=1.0)
