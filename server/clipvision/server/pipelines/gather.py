"""Items of one call awaited together: every result, or the first failure and none left running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from clipvision.server.errors import OverloadedError
from clipvision.server.ops.calls import HeldBytes
from clipvision.server.resources.admission import Ticket

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


def settle_failed(future: asyncio.Future[Any], error: BaseException) -> None:
    """End an item's future with its fault (a cancellation cancels it)."""
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(error)


def admitted(wait: asyncio.Task[Ticket], future: asyncio.Future[Any]) -> Ticket | None:
    """The ticket an item's wait for the memory budget ended with, or None when the item is
    over: the wait cancelled or failed (the item's future is settled so) or the caller gone
    meanwhile (the ticket given back)."""
    if wait.cancelled():
        if not future.done():
            future.cancel()
        return None
    error = wait.exception()
    if error is not None:
        if not future.done():
            settle_failed(future, error)
        return None
    ticket = wait.result()
    if future.done():
        ticket.release()  # admitted just as the caller left
        return None
    return ticket


async def outcomes_of(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """Each future's result or exception, in order, once all are done.

    The first OverloadedError cancels the rest and is raised: a call refused for
    capacity fails as a whole (retrying it later is the remedy). Cancelling the
    caller cancels every future; so does a future cancelled on its own (the
    server stopping), which cancels the call.
    """
    if not futures:
        return []
    all_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    left = len(futures)

    def one_done(future: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if all_done.done():
            return
        if future.cancelled() or isinstance(future.exception(), OverloadedError) or not left:
            all_done.set_result(None)

    for future in futures:
        future.add_done_callback(one_done)
    try:
        await all_done
        results: list[Any] = []
        for future in futures:
            if not future.done():
                continue  # the rest are cancelled below, as the call ends here
            if future.cancelled():
                raise asyncio.CancelledError
            error = future.exception()
            if isinstance(error, OverloadedError):
                raise error
            results.append(error if error is not None else future.result())
        return results
    finally:
        for future in futures:
            future.cancel()


class _Reading(Protocol):
    held: HeldBytes | None
    read_share: int | None


def give_back_read(item: _Reading) -> None:
    """Give back an item's read room once: its share of a message several items share, else
    all of it (its admission counts those bytes now, or it is gone)."""
    held, item.held = item.held, None
    if held is None:
        return
    if item.read_share is None:
        held.release()
    else:
        held.release_part(item.read_share)
