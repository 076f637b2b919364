"""How much memory the process may use: the container's limit, the resident size, and the
default memory budget derived from them."""

from __future__ import annotations

import logging
import os
import resource
import sys
from pathlib import Path

from clipvision.server.config.limits import BUDGET_FRACTION, MIN_BUDGET

logger = logging.getLogger(__name__)

# cgroup v1 reports "no limit" as a huge number rounded to pages; anything above this is none.
_UNLIMITED = 1 << 60
_CGROUP_V2 = Path("/sys/fs/cgroup/memory.max")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")


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
