"""Truthful health when the device hangs: a batch running too long turns health off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from clipvision.server.ops.health import HealthReporter

# What runs on the device now: a name for the log, and the monotonic time each batch began.
BusyBatches = Callable[[], Iterable[tuple[str, float]]]

logger = logging.getLogger(__name__)


class DeviceWatchdog:
    """Checks that no batch has been on the device longer than ``timeout_s``.

    While one has, health reports NOT_SERVING (so load balancers and Kubernetes
    route around the replica) and the log says which model is stuck; when the
    batch finishes, health returns to SERVING.
    """

    def __init__(self, busy: BusyBatches, health: HealthReporter, timeout_s: float) -> None:
        self._busy = busy
        self._health = health
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self.stalled = False

    def start(self) -> None:
        """Start checking; a timeout of 0 turns the watchdog off."""
        if self._timeout_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="watchdog")

    async def stop(self) -> None:
        """Stop checking."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        interval = min(1.0, self._timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            stuck = [
                (name, now - since) for name, since in self._busy() if now - since > self._timeout_s
            ]
            if stuck and not self.stalled:
                self.stalled = True
                name, seconds = stuck[0]
                logger.error(
                    "the device has run one batch of model %s for %.1f s (watchdog limit %.1f s); "
                    "reporting NOT_SERVING until it finishes",
                    name,
                    seconds,
                    self._timeout_s,
                )
                await self._health.set_serving(False)
            elif not stuck and self.stalled:
                self.stalled = False
                logger.warning("the device is making progress again; reporting SERVING")
                await self._health.set_serving(True)
