"""Who a call counts against for fair shares, and how long a unary call may wait for room."""

from __future__ import annotations

import asyncio

import grpc

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


def patience(context: Context) -> float:
    """The loop time until which a unary call may wait for room another caller gives back.

    At most UNARY_WAIT_S, and half of what is left of the call's deadline, so that a
    refusal still reaches the caller in time and an admitted item has time to run.
    """
    remaining = context.time_remaining()
    wait = UNARY_WAIT_S if remaining is None else min(UNARY_WAIT_S, remaining / 2)
    return asyncio.get_running_loop().time() + max(0.0, wait)
