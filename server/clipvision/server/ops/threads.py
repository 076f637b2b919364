"""Names the server's own threads for the operating system, so ``top -H``, ``ps -L``,
py-spy and /proc show which pool is busy (the device thread, the preprocessing pool)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

_PR_SET_NAME = 15
_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        _libc = None


def name_this_thread(name: str) -> None:
    """Name the calling thread (at most 15 bytes reach the kernel); a no-op off Linux.

    Threads it starts later (ONNX Runtime's and OpenMP's workers, started by the
    device thread) inherit the name, so their CPU is counted with it.
    """
    threading.current_thread().name = name
    if _libc is not None:
        _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
