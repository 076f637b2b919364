"""The operator's limits and their defaults: image sizes, what may be read by URI, the memory
budget's share, and sizes written as operators write them (``4GiB``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20

# The default budget is this fraction of what the limit leaves once the models are resident:
# the rest is headroom for torch's activations at the largest batch, the message each stream
# has read but not yet admitted, gRPC's buffers, the interpreter and the allocator's
# fragmentation (measured with bench/memory.py: 0.5 let 16 streams of 20 MB images peak at
# 4.0 GiB of a 4 GiB limit).
BUDGET_FRACTION = 0.3
MIN_BUDGET = 64 * MIB


@dataclass(frozen=True)
class ImageLimits:
    """Operator limits checked before and during decode."""

    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_image_side: int = 1
    allowed_formats: frozenset[str] = frozenset(
        {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
    )


# Framing beside one image in a request: the other fields, the data: URI's header.
REQUEST_FRAMING_BYTES = 64 * 1024


def largest_request_bytes(limits: ImageLimits) -> int:
    """The default --max-message-bytes: the largest legal image sent as a data: URI (base64,
    4 bytes for 3) with its framing. A message must be read before its size is known, so the
    memory budget reserves this much for every read (resources.admission)."""
    return 4 * -(-limits.max_image_bytes // 3) + REQUEST_FRAMING_BYTES


@dataclass(frozen=True)
class FetchPolicy:
    """What the operator allows the server to read by URI; nothing by default."""

    file_roots: tuple[Path, ...] = ()
    fetch_domains: tuple[str, ...] = ()
    allow_http: bool = False
    allow_private_addresses: bool = False
    timeout_s: float = 10.0
    max_redirects: int = 3
    max_concurrent_fetches: int = 16

    @property
    def fetching(self) -> bool:
        """True when http(s) URIs may be fetched at all."""
        return bool(self.fetch_domains)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def byte_size(text: str) -> int:
    """Parse a size such as ``4GiB``, ``512MiB``, ``1.5G`` or ``1000000`` into bytes (K, M, G
    and T are powers of 1000, Ki, Mi, Gi and Ti powers of 1024, as in Kubernetes)."""
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"{text!r} is not a size; write e.g. 4GiB, 512MiB or 1000000")
    value = int(float(match.group(1)) * unit)
    if value < 1:
        raise ValueError(f"{text!r} is not a size of at least one byte")
    return value
