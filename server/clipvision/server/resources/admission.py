"""Fair admission: shared limits (images per model, the memory budget) divided between callers.

A caller is one authenticated identity, or else one connection. Both limits are a
`FairPool`: when it is full, what is given back goes to the waiting caller that
holds the least, and nobody passes that caller, so a caller that floods the server
ends up holding no more than its share (limit / callers) while others wait, and a
large request is not starved by small ones. The `MemoryBudget` counts bytes: an
image's encoded size and its crop from admission to its answer, and its decode
working set (priced from the header) while it is decoded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from clipvision.server.errors import InvalidImageError, OverloadedError, Reason

logger = logging.getLogger(__name__)

# Unary calls wait at most this long for room that another caller gives back (their
# deadline permitting); streams wait as long as it takes, which is their backpressure.
UNARY_WAIT_S = 1.0
# The RetryInfo delay of a refusal for memory: about what one large decode takes.
BUDGET_RETRY_AFTER_S = 1.0


class _Waiter:
    __slots__ = ("amount", "future")

    def __init__(self, amount: int, future: asyncio.Future[None]) -> None:
        self.amount = amount
        self.future = future


class FairPool:
    """``limit`` units shared between callers, granted least-holding caller first.

    Each caller's waiters are served in their own order; between callers, what is
    given back goes to the waiting caller holding the least, and nobody passes it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._held: dict[str, int] = {}
        # Insertion order breaks ties: the caller that has waited longest among equals.
        self._waiting: dict[str, collections.deque[_Waiter]] = {}

    def held(self, caller: str) -> int:
        """What ``caller`` holds now."""
        return self._held.get(caller, 0)

    @property
    def callers(self) -> int:
        """Callers holding or waiting for part of the pool."""
        return len(self._held.keys() | self._waiting.keys())

    @property
    def waiting(self) -> bool:
        """Whether anyone waits."""
        return bool(self._waiting)

    def largest_share(self) -> float:
        """The fraction of what is used that the largest holder holds (0 when idle)."""
        return max(self._held.values()) / self.used if self.used > 0 and self._held else 0.0

    def try_take(self, caller: str, amount: int) -> bool:
        """Take ``amount`` for ``caller`` if it is free now and nobody waits."""
        if self._waiting or self.used + amount > self.limit:
            return False
        self._grant(caller, amount)
        return True

    async def take(self, caller: str, amount: int) -> None:
        """Wait for ``amount`` in fair order, then take it for ``caller``."""
        if self.try_take(caller, amount):
            return
        waiter = _Waiter(amount, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(caller, collections.deque()).append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.give(caller, amount)  # granted just as we were cancelled
            else:
                self._forget(caller, waiter)
                self._wake()  # it may have been the one everybody else waited behind
            raise

    async def take_within(self, caller: str, amount: int, wait_s: float) -> bool:
        """Take ``amount``, waiting at most ``wait_s`` in fair order; False if it timed out."""
        if self.try_take(caller, amount):
            return True
        if wait_s <= 0:
            return False
        try:
            await asyncio.wait_for(self.take(caller, amount), wait_s)
        except TimeoutError:
            return False
        return True

    def starved(self, caller: str, amount: int) -> bool:
        """Whether ``caller`` is under its share (``amount`` included) while another is over."""
        active = len(self._held.keys() | self._waiting.keys() | {caller})
        share = self.limit / active
        if self.held(caller) + amount > share:
            return False
        return any(held > share for other, held in self._held.items() if other != caller)

    def give(self, caller: str, amount: int) -> None:
        """Give back ``amount`` that ``caller`` took, and grant what it lets through."""
        self.used -= amount
        left = self._held.get(caller, 0) - amount
        if left > 0:
            self._held[caller] = left
        else:
            self._held.pop(caller, None)
        self._wake()

    def resize(self, limit: int) -> None:
        """Change the limit; what is held stays held, waiters are granted if it grew."""
        self.limit = limit
        self._wake()

    def _grant(self, caller: str, amount: int) -> None:
        self.used += amount
        self._held[caller] = self._held.get(caller, 0) + amount

    def _forget(self, caller: str, waiter: _Waiter) -> None:
        queue = self._waiting.get(caller)
        if queue is not None and waiter in queue:  # else _wake has dropped it already
            queue.remove(waiter)
            if not queue:
                del self._waiting[caller]

    def _wake(self) -> None:
        while self._waiting:
            # min() keeps the first of equals, which is the longest-waiting caller.
            caller = min(self._waiting, key=self.held)
            queue = self._waiting[caller]
            waiter = queue[0]
            if waiter.future.done():  # cancelled; its task removes it when it runs
                queue.popleft()
            elif self.used + waiter.amount <= self.limit:
                queue.popleft()
                self._grant(caller, waiter.amount)
                waiter.future.set_result(None)
            else:
                return  # nobody passes the least-holding waiter, so it is never starved
            if not queue:
                del self._waiting[caller]


class BudgetObserver(Protocol):
    """Receives what the memory budget does, for metrics (never per caller)."""

    def on_budget(self, total: int) -> None:
        """The budget is now ``total`` bytes."""

    def on_budget_use(
        self, resident: int, decoding: int, callers: int, largest_share: float
    ) -> None:
        """Bytes admitted (held to the answer, and held while decoding) and how they are shared."""

    def on_admission_wait(self, resource: str) -> None:
        """An image waited for ``resource`` (``queue`` or ``memory``)."""

    def on_admission_refused(self, reason: str) -> None:
        """A call or an image was refused for capacity, with this reason."""


@dataclass(frozen=True)
class ItemCost:
    """The bytes one image holds: some until it is answered, more while it is decoded."""

    resident: int
    """Its encoded bytes (twice: message and copy) and its cropped pixels, until answered."""
    decode: int
    """Its decode working set, held while it is decoded (estimated from its header)."""

    @property
    def total(self) -> int:
        """What it holds at its peak."""
        return self.resident + self.decode


class Ticket:
    """One admitted image's share of the budget; gives its parts back once each."""

    def __init__(self, budget: MemoryBudget, caller: str, cost: ItemCost) -> None:
        self._budget = budget
        self._caller = caller
        self._resident = cost.resident
        self._decode = cost.decode
        self._decoding = False

    @property
    def decode(self) -> int:
        """The bytes of the decode part still held."""
        return self._decode

    def start_decode(self) -> Callable[[], None]:
        """Mark the decode as running; the callable returned gives its part back when it ends.

        From here on ``release`` leaves the decode part alone: a worker may outlive its
        caller, and its memory is held until the worker is done.
        """
        self._decoding = True
        return self._decoded

    def release(self) -> None:
        """Give back what is still held, the decode part unless a worker still runs."""
        if self._resident:
            self._budget.give(self._caller, self._resident, stage="resident")
            self._resident = 0
        if not self._decoding:
            self._decoded()

    def _decoded(self) -> None:
        if self._decode:
            self._budget.give(self._caller, self._decode, stage="decode")
            self._decode = 0


class MemoryBudget:
    """The server's budget of bytes for images in flight, shared fairly between callers."""

    def __init__(self, total: int, observer: BudgetObserver | None = None) -> None:
        self.pool = FairPool(total)
        self._observer = observer
        self._stages = {"resident": 0, "decode": 0}
        if observer is not None:
            observer.on_budget(total)
            self._report()

    @property
    def total(self) -> int:
        """The budget in bytes."""
        return self.pool.limit

    @property
    def used(self) -> int:
        """Bytes admitted now."""
        return self.pool.used

    def resize(self, total: int) -> None:
        """Set the budget to ``total`` bytes (once the models are resident, say)."""
        self.pool.resize(total)
        if self._observer is not None:
            self._observer.on_budget(total)

    def check(self, cost: ItemCost, width: int, height: int) -> None:
        """Refuse an image that alone needs more than the whole budget, which nothing frees."""
        if cost.total > self.total:
            self.refused(Reason.IMAGE_OVER_MEMORY_BUDGET)
            raise InvalidImageError(
                Reason.IMAGE_OVER_MEMORY_BUDGET,
                f"The {width}x{height} image needs about {_mib(cost.total)} MiB to decode, "
                f"more than this server's whole memory budget of {_mib(self.total)} MiB; "
                "downscale it before sending.",
            )

    async def admit(self, caller: str, cost: ItemCost, wait_s: float | None) -> Ticket:
        """Take ``cost`` for ``caller``: waiting as long as it takes (None) or ``wait_s`` at most.

        Raises OverloadedError (MEMORY_BUDGET_FULL) when a bounded wait ends unserved.
        """
        amount = cost.total
        if not self.pool.try_take(caller, amount):
            if self._observer is not None:
                self._observer.on_admission_wait("memory")
            if wait_s is None:
                await self.pool.take(caller, amount)
            elif not await self.pool.take_within(caller, amount, wait_s):
                self.refused(Reason.MEMORY_BUDGET_FULL)
                free = max(0, self.total - self.used)
                raise OverloadedError(
                    Reason.MEMORY_BUDGET_FULL,
                    f"The image needs about {_mib(amount)} MiB of this server's memory budget "
                    f"and {_mib(free)} of {_mib(self.total)} MiB are free; retry after "
                    f"{BUDGET_RETRY_AFTER_S:.1f} s or on another replica.",
                    retry_after_s=BUDGET_RETRY_AFTER_S,
                )
        self._stages["resident"] += cost.resident
        self._stages["decode"] += cost.decode
        self._report()
        return Ticket(self, caller, cost)

    def give(self, caller: str, amount: int, *, stage: str) -> None:
        """Give back ``amount`` bytes of one stage (tickets call this)."""
        self._stages[stage] -= amount
        self.pool.give(caller, amount)
        self._report()

    def refused(self, reason: Reason) -> None:
        """Count one refusal for capacity."""
        if self._observer is not None:
            self._observer.on_admission_refused(reason.value)

    def _report(self) -> None:
        if self._observer is not None:
            self._observer.on_budget_use(
                self._stages["resident"],
                self._stages["decode"],
                self.pool.callers,
                self.pool.largest_share(),
            )


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f}"


def seconds_until(deadline: float) -> float:
    """Seconds from now to ``deadline`` (event loop time), never negative."""
    return max(0.0, deadline - asyncio.get_running_loop().time())


def seconds_left(deadline: float | None) -> float | None:
    """Seconds from now to ``deadline``; None (wait as long as it takes) for no deadline."""
    return None if deadline is None else seconds_until(deadline)
