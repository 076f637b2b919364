"""Continuous batching: whatever is queued when the device frees up forms the next batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import torch

from clipvision.server.encoder import ClipImageEncoder, FloatArray
from clipvision.server.errors import InternalError, Reason

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    pixels: FloatArray
    future: asyncio.Future[FloatArray] = field(repr=False)


class MicroBatcher:
    """Queues preprocessed images of one model and runs them through the device in batches.

    One future per image; images whose caller has gone (a cancelled future) leave
    before compute; a batch that fails is retried image by image so that only the
    guilty image fails.
    """

    def __init__(
        self,
        encoder: ClipImageEncoder,
        device_executor: Executor,
        *,
        max_batch_size: int,
        max_batch_delay_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._encoder = encoder
        self._executor = device_executor
        self._max_batch_size = max_batch_size
        self._max_batch_delay_s = max_batch_delay_s
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher-{self._encoder.name}"
            )

    async def stop(self) -> None:
        """Stop the loop; images still queued are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()

    async def submit(self, pixels: FloatArray) -> FloatArray:
        """Embed one preprocessed image; returns its raw projected features."""
        future: asyncio.Future[FloatArray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(pixels, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._compute(batch)

    async def _next_batch(self) -> list[_Item]:
        batch = [await self._queue.get()]
        if self._max_batch_delay_s > 0:
            deadline = asyncio.get_running_loop().time() + self._max_batch_delay_s
            while len(batch) < self._max_batch_size:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
        while len(batch) < self._max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        # A caller that cancelled (or whose deadline passed) costs no compute.
        return [item for item in batch if not item.future.done()]

    async def _compute(self, batch: list[_Item]) -> None:
        try:
            rows = await self._embed([item.pixels for item in batch])
        except Exception:
            if len(batch) == 1:
                logger.exception(
                    "forward pass failed for one image of model %s", self._encoder.name
                )
                _fail(batch[0], InternalError(Reason.INTERNAL, "The model failed on this image."))
                return
            logger.warning(
                "a batch of %d failed; retrying image by image", len(batch), exc_info=True
            )
            for item in batch:
                if not item.future.done():
                    await self._compute([item])
            return
        for item, row in zip(batch, rows, strict=True):
            if not item.future.done():
                item.future.set_result(row)

    async def _embed(self, pixels: list[FloatArray]) -> FloatArray:
        loop = asyncio.get_running_loop()
        stacked = np.stack(pixels)
        features: torch.Tensor = await loop.run_in_executor(
            self._executor, self._encoder.forward, stacked
        )
        rows = await loop.run_in_executor(self._executor, self._encoder.to_host, features)
        if rows.shape[0] != len(pixels):
            raise RuntimeError(f"the model returned {rows.shape[0]} rows for {len(pixels)} images")
        if self._on_batch is not None:
            self._on_batch(len(pixels))
        return rows


def _fail(item: _Item, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)
