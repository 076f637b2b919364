"""The vectors of Classify's labels, kept because the same labels come back on every call.

A small least-recently-used map per model, used only on the event loop (no lock).
Keys are the prompt as embedded (the label put into the template) and whether it
may be truncated; values are the normalised vector and whether it was truncated.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from clipvision.server.encoder import FloatArray


@dataclass(frozen=True)
class LabelVector:
    """One prompt's unit-length text vector."""

    vector: FloatArray
    truncated: bool


class LabelCache:
    """At most ``size`` prompt vectors; the least recently used goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict[tuple[str, bool], LabelVector] = (
            collections.OrderedDict()
        )
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt: str, truncate: bool) -> LabelVector | None:
        """The cached vector of ``prompt``, or None (counted as a miss)."""
        entry = self._entries.get((prompt, truncate))
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end((prompt, truncate))
        self.hits += 1
        return entry

    def put(self, prompt: str, truncate: bool, entry: LabelVector) -> None:
        """Keep ``entry``, dropping the least recently used beyond the size."""
        if self.size <= 0:
            return
        entry.vector.setflags(write=False)  # shared between calls: nobody may change it
        self._entries[(prompt, truncate)] = entry
        self._entries.move_to_end((prompt, truncate))
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
