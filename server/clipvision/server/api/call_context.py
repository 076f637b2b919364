"""Who a call counts against for fair shares, and how long a unary call may wait for room."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc

from clipvision.server.ops.calls import HeldBytes, take_read_hold
from clipvision.server.resources.admission import UNARY_WAIT_S

Context = grpc.aio.ServicerContext[object, object]


def caller_of(context: Context) -> str:
    """Who a call counts against for fair shares: its authenticated identity (mutual TLS),
    else its connection (``peer()`` names the client's address and port, one per connection).
    """
    identities = context.peer_identities()
    if identities:
        return "identity:" + b",".join(identities).decode(errors="replace")
    return "peer:" + context.peer()


def budget_deadline(context: Context) -> float | None:
    """The loop time until which a call's items may wait for the memory budget: as long as
    its deadline allows, less a margin so that a refusal (MEMORY_BUDGET_FULL, with RetryInfo)
    still reaches the caller in time; None without a deadline (wait as long as it takes).

    A caller holding nothing is first in line for what frees up (admission.FairPool), so
    with a deadline of a few decode times it is answered, never refused, under attack.
    """
    remaining = context.time_remaining()
    if remaining is None:
        return None
    margin = max(0.05, remaining / 10)
    return asyncio.get_running_loop().time() + max(0.0, remaining - margin)


def patience(context: Context) -> float:
    """The loop time until which a unary call may wait for room another caller gives back.

    At most UNARY_WAIT_S, and half of what is left of the call's deadline, so that a
    refusal still reaches the caller in time and an admitted item has time to run.
    """
    remaining = context.time_remaining()
    wait = UNARY_WAIT_S if remaining is None else min(UNARY_WAIT_S, remaining / 2)
    return asyncio.get_running_loop().time() + max(0.0, wait)


@contextlib.contextmanager
def message_hold() -> Iterator[HeldBytes | None]:
    """The memory budget the call's request message holds (the gate reserved it before the
    read), taken over for the handler: its items give their shares back as they are
    admitted, and what is left goes back when the handler is done."""
    hold = take_read_hold()
    try:
        yield hold
    finally:
        if hold is not None:
            hold.release()
