"""What every protocol tells the pipelines about a call: who it counts against, how long it has.

gRPC fills it from the call's context (api.call_context), HTTP from the connection and
its timeout header (http.exchange); the pipelines and the data planes read only this.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from clipvision.server.ops.calls import HeldBytes, take_read_hold
from clipvision.server.resources.admission import UNARY_WAIT_S


@dataclass(frozen=True)
class CallScope:
    """One call: the caller its items count against for fair shares, and its deadline.

    ``time_remaining`` gives the seconds left before the caller's deadline, or None
    without one (as ``grpc.aio.ServicerContext.time_remaining`` does).
    """

    caller: str
    time_remaining: Callable[[], float | None]

    def budget_deadline(self) -> float | None:
        """The loop time until which the call's items may wait for the memory budget: as long
        as its deadline allows, less a margin so that a refusal (MEMORY_BUDGET_FULL, with
        RetryInfo) still reaches the caller in time; None without a deadline.

        A caller holding nothing is first in line for what frees up (admission.FairPool), so
        with a deadline of a few decode times it is answered, never refused, under attack.
        """
        remaining = self.time_remaining()
        if remaining is None:
            return None
        margin = max(0.05, remaining / 10)
        return asyncio.get_running_loop().time() + max(0.0, remaining - margin)

    def patience(self) -> float:
        """The loop time until which a unary call may wait for room another caller gives back.

        At most UNARY_WAIT_S, and half of what is left of the call's deadline, so that a
        refusal still reaches the caller in time and an admitted item has time to run.
        """
        remaining = self.time_remaining()
        wait = UNARY_WAIT_S if remaining is None else min(UNARY_WAIT_S, remaining / 2)
        return asyncio.get_running_loop().time() + max(0.0, wait)


@contextlib.contextmanager
def message_hold() -> Iterator[HeldBytes | None]:
    """The memory budget the call's request message holds (its protocol reserved it before
    the read), taken over for the handler: its items give their shares back as they are
    admitted, and what is left goes back when the handler is done."""
    hold = take_read_hold()
    try:
        yield hold
    finally:
        if hold is not None:
            hold.release()
