"""Items of one call awaited together: every result, or the first failure and none left running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def all_or_none(awaitables: list[Awaitable[T]]) -> list[T]:
    """Await every item; if one raises, cancel the rest and raise that."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        # Collected, so that a second failure is not reported as never retrieved.
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
