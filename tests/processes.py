"""clipvision-server as a child process, with its log, for tests of the real entry point."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

START_TIMEOUT = 90.0


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipvision.server.cli", "--address", "127.0.0.1:0", *args]


class ServerProcess:
    """A clipvision-server child process and what it has logged so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log: list[str] = []
        self.port = 0

    async def wait_for(self, pattern: str) -> re.Match[str]:
        assert self.process.stderr is not None
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                line = (await self.process.stderr.readline()).decode()
                if not line:
                    raise AssertionError("server exited early:\n" + "".join(self.log))
                self.log.append(line)
                match = re.search(pattern, line)
                if match:
                    return match

    async def finish(self) -> tuple[int, str]:
        assert self.process.stderr is not None
        async with asyncio.timeout(START_TIMEOUT):
            rest = await self.process.stderr.read()
            code = await self.process.wait()
        return code, "".join(self.log) + rest.decode()


@asynccontextmanager
async def server_process(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[ServerProcess]:
    process = await asyncio.create_subprocess_exec(
        *server_command(*args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    server = ServerProcess(process)
    try:
        yield server
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
