"""Who a gRPC call counts against for fair shares, and its scope for the pipelines."""

from __future__ import annotations

import grpc

from clipvision.server.pipelines.scope import CallScope

Context = grpc.aio.ServicerContext[object, object]


def caller_of(context: Context) -> str:
    """Who a call counts against for fair shares: its authenticated identity (mutual TLS),
    else its connection (``peer()`` names the client's address and port, one per connection).
    """
    identities = context.peer_identities()
    if identities:
        return "identity:" + b",".join(identities).decode(errors="replace")
    return "peer:" + context.peer()


def scope_of(context: Context) -> CallScope:
    """The call as the pipelines see it: its caller and its deadline."""
    return CallScope(caller_of(context), context.time_remaining)
