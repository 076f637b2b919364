"""The vectors of Classify's labels, kept because the same labels come back on every call.

A small least-recently-used map per model, used only on the event loop (no lock).
Keys are a digest of the prompt as embedded (the label put into the template) and
whether it may be truncated, so that an entry costs the same whatever the prompt's
length (a prompt may be --max-text-bytes long); values are the normalised vector and
whether it was truncated.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass

from clipvision.server.runtime.image_encoder import FloatArray


@dataclass(frozen=True)
class LabelVector:
    """One prompt's unit-length text vector."""

    vector: FloatArray
    truncated: bool


class LabelCache:
    """At most ``size`` prompt vectors; the least recently used goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict[tuple[bytes, bool], LabelVector] = (
            collections.OrderedDict()
        )
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt: str, truncate: bool) -> LabelVector | None:
        """The cached vector of ``prompt``, or None (counted as a miss)."""
        key = _key(prompt, truncate)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, prompt: str, truncate: bool, entry: LabelVector) -> None:
        """Keep ``entry``, dropping the least recently used beyond the size."""
        if self.size <= 0:
            return
        entry.vector.setflags(write=False)  # shared between calls: nobody may change it
        key = _key(prompt, truncate)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def _key(prompt: str, truncate: bool) -> tuple[bytes, bool]:
    """A fixed-size key: 32 bytes of BLAKE2b of the prompt, whatever its length."""
    digest = hashlib.blake2b(prompt.encode("utf-8", errors="surrogatepass"), digest_size=32)
    return digest.digest(), truncate
