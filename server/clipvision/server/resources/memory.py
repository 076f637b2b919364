"""How much memory the process may use: sizes as operators write them, the container's
limit, the resident size, and the default memory budget derived from them."""

from __future__ import annotations

import logging
import os
import re
import resource
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

MIB = 1 << 20

# The default budget is this fraction of what the limit leaves once the models are resident:
# the rest is headroom for torch's activations at the largest batch, the message each stream
# has read but not yet admitted, gRPC's buffers, the interpreter and the allocator's
# fragmentation (measured with bench/memory.py: 0.5 let 16 streams of 20 MB images peak at
# 4.0 GiB of a 4 GiB limit).
BUDGET_FRACTION = 0.3
MIN_BUDGET = 64 * MIB

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

# cgroup v1 reports "no limit" as a huge number rounded to pages; anything above this is none.
_UNLIMITED = 1 << 60
_CGROUP_V2 = Path("/sys/fs/cgroup/memory.max")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")


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


def container_limit(v2: Path = _CGROUP_V2, v1: Path = _CGROUP_V1) -> int | None:
    """The cgroup's memory limit in bytes (v2 ``memory.max``, else v1), or None if unlimited."""
    for path in (v2, v1):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < _UNLIMITED:
            return int(text)
        return None  # "max", or v1's huge number: this cgroup sets no limit
    return None


def physical_memory() -> int:
    """Total RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_limit() -> int:
    """The container's limit where one is set and below the RAM, else the total RAM."""
    ram = physical_memory()
    limit = container_limit()
    return min(limit, ram) if limit is not None else ram


def resident_bytes() -> int:
    """This process's resident set size now (its high-water mark where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, else KiB


def default_budget(limit: int, resident: int) -> int:
    """``BUDGET_FRACTION`` of what ``limit`` leaves beside ``resident``, at least ``MIN_BUDGET``."""
    return max(MIN_BUDGET, int((limit - resident) * BUDGET_FRACTION))
