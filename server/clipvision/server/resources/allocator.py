"""Memory freed after a burst of huge images goes back to the OS: glibc trimming and tuning.

glibc keeps freed memory in its arenas, and after a large block is freed it raises
its mmap threshold (up to 32 MiB), so later 16 MiB Pillow blocks and 20 MB
messages come from the heap and stay resident after the load ends; and request
buffers caught in reference cycles stay until a full garbage collection, which
an idle server never runs. ``MemoryTrimmer`` deals with both after each burst:
the choice measured with ``bench/memory.py`` against MALLOC_ARENA_MAX=2, fixed
mmap thresholds and jemalloc.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time

logger = logging.getLogger(__name__)

MIB = 1024 * 1024

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Environment variables through which an operator tunes glibc malloc directly; a
# setting they already make is left alone.
_ENV_FOR = {
    _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    _M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
}
_NAMES = {
    _M_TRIM_THRESHOLD: "M_TRIM_THRESHOLD",
    _M_MMAP_THRESHOLD: "M_MMAP_THRESHOLD",
}


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): byte counts as size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc on Linux with mallopt and malloc_trim."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # the symbols already loaded, glibc's among them
    if not all(hasattr(libc, name) for name in ("mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.argtypes = []
        libc.mallinfo2.restype = _MallInfo2
    return libc


def _set_by_environment(param: int) -> bool:
    variable, tunable = _ENV_FOR[param]
    return variable in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def configure_allocator(
    *, mmap_threshold: int | None = None, trim_threshold: int | None = None
) -> dict[str, int]:
    """Fix glibc's mmap and/or trim threshold (None: leave it to glibc); returns what it set.

    A fixed mmap threshold also turns off glibc's dynamic one, so every block of
    at least ``mmap_threshold`` bytes is a mapping of its own, unmapped when freed;
    measured, it costs 8 to 24 % more CPU per image on CPU inference (page faults)
    and gives back no more than ``MemoryTrimmer`` does, so the server does not
    call it; it is here for ``bench/memory.py --cost`` and for operators who want
    it. A no-op where the C library is not glibc, and for a setting the operator
    already made through ``MALLOC_*`` or ``GLIBC_TUNABLES``.
    """
    libc = glibc()
    if libc is None:
        logger.info("malloc tuning skipped: the C library is not glibc")
        return {}
    wanted = {_M_MMAP_THRESHOLD: mmap_threshold, _M_TRIM_THRESHOLD: trim_threshold}
    applied: dict[str, int] = {}
    for param, value in wanted.items():
        if value is None:
            continue
        if _set_by_environment(param):
            logger.info("malloc %s left as the environment sets it", _NAMES[param])
            continue
        if libc.mallopt(param, value) != 1:
            logger.warning("mallopt(%s, %d) failed", _NAMES[param], value)
            continue
        applied[_NAMES[param]] = value
    if applied:
        logger.info(
            "malloc tuned: %s", ", ".join(f"{name}={value}" for name, value in applied.items())
        )
    return applied


def release_free_memory() -> None:
    """Collect garbage and give glibc's free heap back to the OS, once (after a model load).

    A load that exports a tower to ONNX peaks far above what it keeps; the memory
    budget is sized from the resident size right after, so that peak must be gone.
    """
    gc.collect()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


# Growth smaller than this in one interval (a log line, a metrics scrape) is not a burst.
_NOISE_BYTES = 4 * MIB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryTrimmer:
    """After a burst, collects cyclic garbage and gives freed heap back to the OS, from a thread.

    Every ``interval_s`` it reads the RSS and glibc's count of bytes allocated. Once
    either has moved by ``min_change_bytes`` since the last clean-up and neither
    grew during the last interval (the burst is over, or paused), it runs
    ``gc.collect()`` (large request buffers held in reference cycles stay until a
    full collection, which an idle server never triggers) and then
    ``malloc_trim(0)`` (glibc keeps freed pages in its arenas). At most one
    clean-up an interval, none while memory is rising. A no-op where the C
    library is not glibc 2.33 or later.
    """

    def __init__(self, interval_s: float = 1.0, min_change_bytes: int = 32 * MIB) -> None:
        self.interval_s = interval_s
        self.min_change_bytes = min_change_bytes
        self.cleanups = 0
        self._libc = glibc()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._moved = False
        self._baseline = self._last = self._reading() if self.supported else (0, 0)

    @property
    def supported(self) -> bool:
        """Whether this process's C library can report its heap and trim it."""
        return self._libc is not None and hasattr(self._libc, "mallinfo2")

    def start(self) -> None:
        """Freeze what is alive now out of the collector's reach, and start the thread (once).

        Call it once the models are loaded: a full collection over a loaded server
        (about 370,000 objects with ViT-B/32) holds the GIL for about 0.5 s; over
        only what requests created since, a few ms. Does nothing where trimming is
        not supported.
        """
        if not self.supported:
            logger.info("malloc trimming off: it needs glibc 2.33 or later")
            return
        if self._thread is not None:
            return
        gc.collect()
        gc.freeze()
        self._thread = threading.Thread(target=self._run, name="clipvision-trim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (at most one clean-up's time)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> bool:
        """One tick: clean up if memory moved since the last clean-up and has stopped growing."""
        now = self._reading()
        growing = any(
            value > last + _NOISE_BYTES for value, last in zip(now, self._last, strict=True)
        )
        self._last = now
        self._moved = self._moved or any(
            abs(value - base) >= self.min_change_bytes
            for value, base in zip(now, self._baseline, strict=True)
        )
        if growing or not self._moved:
            return False
        started = time.perf_counter()
        collected = gc.collect()
        assert self._libc is not None
        self._libc.malloc_trim(0)
        self._baseline = self._last = self._reading()
        self._moved = False
        self.cleanups += 1
        logger.debug(
            "memory clean-up after a burst: RSS %d -> %d MiB, %d objects collected, %.0f ms",
            now[0] // MIB,
            self._baseline[0] // MIB,
            collected,
            (time.perf_counter() - started) * 1000,
        )
        return True

    def _reading(self) -> tuple[int, int]:
        """(RSS, bytes allocated through malloc: heap in use plus mmapped blocks)."""
        assert self._libc is not None
        info: _MallInfo2 = self._libc.mallinfo2()
        return _rss_bytes(), int(info.uordblks) + int(info.hblkhd)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
