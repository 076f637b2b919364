"""Bounded pools of call slots, per server and per connection, that make room by evicting the idle.

A slot that has been idle for a while (a stream that neither sends nor
receives, a call still waiting for its request message) is what an attacker
holds to lock others out for the price of a few bytes. When a pool is full, the
holder idle the longest (past a minimum) is evicted to make room; a busy holder
never is. A connection that reaches its own cap is refused without evicting
anyone else's slot.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Slot:
    """One admitted call: whose it is, when it last did something, and how to end it."""

    pool: SlotPool = field(repr=False)
    connection: str
    evict: Callable[[], None] = field(repr=False)
    """Ends the call; set by whoever admitted it. Called at most once, by the pool."""
    idle: bool = True
    """Whether the call is waiting on its peer (evictable once idle long enough)."""
    last_active: float = field(default_factory=time.monotonic)
    released: bool = False

    def touch(self) -> None:
        """The call made progress (a message in or out)."""
        self.last_active = time.monotonic()

    def set_idle(self, idle: bool) -> None:
        """Mark the call as waiting on its peer (True) or working for it (False)."""
        self.idle = idle
        self.last_active = time.monotonic()

    def idle_for(self, now: float) -> float:
        """Seconds the call has been idle, or 0 while it works."""
        return now - self.last_active if self.idle else 0.0

    def release(self) -> None:
        """Give the slot back (idempotent: an evicted slot is already back)."""
        self.pool.release(self)


class SlotPool:
    """At most ``capacity`` slots in all and ``per_connection`` per connection.

    ``evict_after_s`` is how long a slot must have been idle before a newcomer
    may evict it; ``None`` means slots are never evicted to make room.
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        per_connection: int,
        evict_after_s: float | None,
    ) -> None:
        self.name = name
        self.capacity = capacity
        self.per_connection = per_connection
        self.evict_after_s = evict_after_s
        self._slots: set[Slot] = set()
        self._by_connection: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        """Slots held now."""
        return len(self._slots)

    def holders(self) -> list[Slot]:
        """The slots held now (a copy)."""
        return list(self._slots)

    def acquire(self, connection: str, evict: Callable[[], None]) -> Slot | None:
        """A slot for a call on ``connection``, evicting an idle holder if full; None if refused."""
        if self._by_connection[connection] >= self.per_connection:
            return None
        if len(self._slots) >= self.capacity and not self._evict_one():
            return None
        slot = Slot(self, connection, evict)
        self._slots.add(slot)
        self._by_connection[connection] += 1
        return slot

    def release(self, slot: Slot) -> None:
        """Return ``slot`` to the pool; releasing twice does nothing."""
        if slot.released:
            return
        slot.released = True
        self._slots.discard(slot)
        self._by_connection[slot.connection] -= 1
        if self._by_connection[slot.connection] <= 0:
            del self._by_connection[slot.connection]

    def evict_idle(self, idle_for_s: float) -> int:
        """End every slot idle for at least ``idle_for_s``; returns how many."""
        now = time.monotonic()
        stale = [slot for slot in self._slots if slot.idle and slot.idle_for(now) >= idle_for_s]
        for slot in stale:
            self._end(slot)
        return len(stale)

    def _evict_one(self) -> bool:
        if self.evict_after_s is None:
            return False
        now = time.monotonic()
        candidates = [slot for slot in self._slots if slot.idle]
        if not candidates:
            return False
        oldest = max(candidates, key=lambda slot: slot.idle_for(now))
        if oldest.idle_for(now) < self.evict_after_s:
            return False
        self._end(oldest)
        return True

    def _end(self, slot: Slot) -> None:
        self.release(slot)
        slot.evict()
