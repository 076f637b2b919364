"""Who a gRPC call counts against for fair shares, and its scope for the pipelines."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import grpc

from clipvision.server.pipelines.scope import CallScope

Context = grpc.aio.ServicerContext[object, object]

# The caller of the call running in this task, with the context it was read from: the gate
# reads it before every message (a stream's too) and the servicer once more, and reading
# it asks gRPC core for the call's auth context, which lets go of the GIL on the event loop
# (and waits to get it back from the preprocessing threads). grpc.aio runs each call in a
# task of its own; the context object is compared, so a value inherited by another call's
# task is never taken for its own.
_caller: ContextVar[tuple[Any, str] | None] = ContextVar("clipvision_caller", default=None)


def caller_of(context: Context, certificates: bool = True) -> str:
    """Who a call counts against for fair shares: its authenticated identity (mutual TLS),
    else its connection (``peer()`` names the client's address and port, one per connection).

    ``certificates=False`` (the server asks no client for a certificate) skips asking gRPC
    core for identities there cannot be.
    """
    known = _caller.get()
    if known is not None and known[0] is context:
        return known[1]
    identities = context.peer_identities() if certificates else None
    if identities:
        caller = "identity:" + b",".join(identities).decode(errors="replace")
    else:
        caller = "peer:" + context.peer()
    _caller.set((context, caller))
    return caller


def scope_of(context: Context) -> CallScope:
    """The call as the pipelines see it: its caller and its deadline."""
    return CallScope(caller_of(context), context.time_remaining)
