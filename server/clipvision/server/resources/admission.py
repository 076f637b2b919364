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
import threading
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
# The part of the memory budget that holds messages being read and read ahead of their
# admission: at least 1 / READ_SHARE of it, room for two of the largest messages where the
# budget allows (at most half of it), so that reading never waits for decoding.
READ_SHARE = 8


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
        # try_take may be called from a worker thread (an image admitted where it was
        # probed); every change of what is held happens under this lock. Waiters and
        # their futures belong to the event loop's thread alone.
        self.lock = threading.Lock()

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
        """Take ``amount`` for ``caller`` if it is free now and nobody waits (any thread)."""
        with self.lock:
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
                with self.lock:
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
        with self.lock:
            self.used -= amount
            left = self._held.get(caller, 0) - amount
            if left > 0:
                self._held[caller] = left
            else:
                self._held.pop(caller, None)
            self._wake()

    def grant_over(self, caller: str, amount: int) -> None:
        """Grant ``amount`` beyond the limit (what is already in memory and must be counted)."""
        with self.lock:
            self._grant(caller, amount)

    def resize(self, limit: int) -> None:
        """Change the limit; what is held stays held, waiters are granted if it grew."""
        with self.lock:
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
        # Called with the lock held, on the event loop's thread.
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

    def on_admission_wait(self, resource: str) -> None:
        """An image waited for ``resource`` (``queue`` or ``memory``)."""

    def on_admission_refused(self, reason: str) -> None:
        """A call or an image was refused for capacity, with this reason."""


@dataclass(frozen=True)
class BudgetUsage:
    """What the memory budget holds at one moment."""

    resident: int
    """Bytes held until answered: encoded images (and texts) and crops."""
    decoding: int
    """Bytes of decode working sets held while decoding."""
    callers: int
    """Callers holding or waiting for part of the budget."""
    largest_share: float
    """The fraction of what is held that the largest holder holds (0 when idle)."""


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


class ReadHold:
    """Read room taken for one message: reserved at its largest size before it is read, cut
    to what it holds once read, and given back as the items made from it are admitted (their
    own admission counts those bytes then) or when its call ends."""

    __slots__ = ("_amount", "_caller", "_room")

    def __init__(self, room: FairPool, caller: str, amount: int) -> None:
        self._room = room  # the read room, or the health checks' own
        self._caller = caller
        self._amount = amount

    @property
    def amount(self) -> int:
        """Bytes held now."""
        return self._amount

    def shrink(self, amount: int) -> None:
        """Hold ``amount`` bytes: less than reserved gives the rest back; more (a message over
        the read room, read because nothing else was held) is counted beyond the room."""
        if amount < self._amount:
            self.release_part(self._amount - amount)
        elif amount > self._amount:
            self._room.grant_over(self._caller, amount - self._amount)
            self._amount = amount

    def release_part(self, amount: int) -> None:
        """Give back up to ``amount`` bytes (an item's share, now counted by its admission)."""
        part = min(amount, self._amount)
        if part > 0:
            self._amount -= part
            self._room.give(self._caller, part)

    def release(self) -> None:
        """Give back everything still held (idempotent)."""
        self.release_part(self._amount)


class MemoryBudget:
    """The server's budget of bytes for images and texts in flight, shared fairly between callers.

    Two fair pools share it. The read room (``reads``) holds every request message from
    before it is read (room for the largest message, taken before grpc receives it, cut
    to its size once read) until the items made of it are admitted, so that bytes
    received are in the budget and a stream reads ahead without waiting for each image's
    header to be parsed; the rest (``pool``) holds admitted items. Kept apart, they
    cannot deadlock: items waiting for room hold only read room, so whatever the read
    room holds, one item that passes ``check`` always fits once the admitted ones are
    answered. Health checks and watches read within a room of their own (``probe_reads``,
    one of the largest messages), so that streams holding the read room never keep a probe
    waiting, and callers without the token never take the others' room.
    """

    def __init__(
        self,
        total: int,
        observer: BudgetObserver | None = None,
        *,
        largest_read: int = 64 * 1024 * 1024,
    ) -> None:
        # A read reserves room for the largest message before it knows the message's size.
        self._largest_read = largest_read
        self.reads = FairPool(self._read_room(total))
        self.probe_reads = FairPool(self._probe_room(total))
        self.pool = FairPool(total - self.reads.limit - self.probe_reads.limit)
        self._observer = observer
        self._stages = {"resident": 0, "decode": 0}
        if observer is not None:
            observer.on_budget(total)

    @property
    def total(self) -> int:
        """The budget in bytes."""
        return self.reads.limit + self.probe_reads.limit + self.pool.limit

    @property
    def used(self) -> int:
        """Bytes admitted or held in the read rooms now."""
        return self.reads.used + self.probe_reads.used + self.pool.used

    def resize(self, total: int) -> None:
        """Set the budget to ``total`` bytes (once the models are resident, say)."""
        self.reads.resize(self._read_room(total))
        self.probe_reads.resize(self._probe_room(total))
        self.pool.resize(total - self.reads.limit - self.probe_reads.limit)
        if self._observer is not None:
            self._observer.on_budget(total)

    def check(self, cost: ItemCost, width: int, height: int) -> None:
        """Refuse an image that alone needs more than the budget admits, which nothing frees."""
        if cost.total > self.pool.limit:
            self.refused(Reason.IMAGE_OVER_MEMORY_BUDGET)
            raise InvalidImageError(
                Reason.IMAGE_OVER_MEMORY_BUDGET,
                f"The {width}x{height} image needs about {_mib(cost.total)} MiB to decode, "
                f"more than this server's memory budget of {_mib(self.total)} MiB admits for "
                f"one image ({_mib(self.pool.limit)} MiB); downscale it before sending.",
            )

    @property
    def read_size(self) -> int:
        """What one read reserves: the largest message, or all the read room if that is less."""
        return self._reserved_in(self.reads)

    def _reserved_in(self, room: FairPool) -> int:
        return min(self._largest_read, room.limit)

    def read_room(self, probe: bool = False) -> FairPool:
        """Where a message is read: a health check's in the probes' room, others in ``reads``."""
        return self.probe_reads if probe else self.reads

    def try_reserve_read(self, caller: str, probe: bool = False) -> ReadHold | None:
        """Reserve room for one message about to be read, if there is room now (nobody waits)."""
        room = self.read_room(probe)
        size = self._reserved_in(room)
        if not room.try_take(caller, size):
            return None
        return ReadHold(room, caller, size)

    async def reserve_read(
        self, caller: str, wait_s: float | None, probe: bool = False
    ) -> ReadHold:
        """Reserve room for one message about to be read, waiting in fair order: as long as it
        takes (None, a stream's backpressure) or ``wait_s`` at most, then OverloadedError
        (MEMORY_BUDGET_FULL)."""
        hold = self.try_reserve_read(caller, probe)
        if hold is not None:
            return hold
        if self._observer is not None:
            self._observer.on_admission_wait("memory")
        room = self.read_room(probe)
        size = self._reserved_in(room)
        if wait_s is None:
            await room.take(caller, size)
        elif not await room.take_within(caller, size, wait_s):
            self.refused(Reason.MEMORY_BUDGET_FULL)
            raise OverloadedError(
                Reason.MEMORY_BUDGET_FULL,
                f"The server's memory budget has no room to read another message now (it "
                f"reads at most {_mib(room.limit)} MiB of requests at once); retry after "
                f"{BUDGET_RETRY_AFTER_S:.1f} s or on another replica.",
                retry_after_s=BUDGET_RETRY_AFTER_S,
            )
        return ReadHold(room, caller, size)

    async def admit(self, caller: str, cost: ItemCost, wait_s: float | None) -> Ticket:
        """Take ``cost`` for ``caller``: waiting as long as it takes (None) or ``wait_s`` at most.

        Raises OverloadedError (MEMORY_BUDGET_FULL) when a bounded wait ends unserved.
        """
        ticket = self.try_admit(caller, cost)
        if ticket is not None:
            return ticket
        amount = cost.total
        # The budget is full for now: wait for room in fair order.
        if self._observer is not None:
            self._observer.on_admission_wait("memory")
        if wait_s is None:
            await self.pool.take(caller, amount)
        elif not await self.pool.take_within(caller, amount, wait_s):
            self.refused(Reason.MEMORY_BUDGET_FULL)
            free = max(0, self.pool.limit - self.pool.used)
            raise OverloadedError(
                Reason.MEMORY_BUDGET_FULL,
                f"The image needs about {_mib(amount)} MiB of this server's memory budget "
                f"and {_mib(free)} of {_mib(self.pool.limit)} MiB are free; retry after "
                f"{BUDGET_RETRY_AFTER_S:.1f} s or on another replica.",
                retry_after_s=BUDGET_RETRY_AFTER_S,
            )
        return self._ticket(caller, cost)

    def try_admit(self, caller: str, cost: ItemCost) -> Ticket | None:
        """Take ``cost`` for ``caller`` if it is free now and nobody waits; else None.

        Safe from a worker thread (where an image is probed and then decoded at once).
        """
        if not self.pool.try_take(caller, cost.total):
            return None
        return self._ticket(caller, cost)

    def _ticket(self, caller: str, cost: ItemCost) -> Ticket:
        with self.pool.lock:
            self._stages["resident"] += cost.resident
            self._stages["decode"] += cost.decode
        return Ticket(self, caller, cost)

    def give(self, caller: str, amount: int, *, stage: str) -> None:
        """Give back ``amount`` bytes of one stage (tickets call this)."""
        with self.pool.lock:
            self._stages[stage] -= amount
        self.pool.give(caller, amount)

    def refused(self, reason: Reason) -> None:
        """Count one refusal for capacity."""
        if self._observer is not None:
            self._observer.on_admission_refused(reason.value)

    def _read_room(self, total: int) -> int:
        """Room for two of the largest messages, within an eighth and a half of the budget."""
        return max(total // READ_SHARE, min(2 * self._largest_read, total // 2))

    def _probe_room(self, total: int) -> int:
        """The health checks' read room: one of the largest messages (a probe's is empty, but
        grpc would receive one of any size), at most an eighth of the budget."""
        return min(self._largest_read, total // READ_SHARE)

    def usage(self) -> BudgetUsage:
        """Bytes admitted now, by stage, and how they are shared (read at metrics scrape time,
        so that admitting an image costs no metric update)."""
        return BudgetUsage(
            self._stages["resident"] + self.reads.used + self.probe_reads.used,
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
