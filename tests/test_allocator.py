"""glibc malloc tuning and trimming: memory freed after a burst goes back to the OS.

Each scenario runs in a child Python process: malloc settings are process-wide
and the heap counters of the test process move with every other test's threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from clipvision.server.resources import allocator
from clipvision.server.resources.allocator import MIB, MemoryTrimmer, configure_allocator

pytestmark = pytest.mark.skipif(allocator.glibc() is None, reason="glibc only")

# Prints what configure_allocator set, then whether blocks of 2 MiB and 512 KiB
# became mappings of their own (mallinfo2's hblks counts them), after a 16 MiB
# block was freed, which makes glibc's dynamic threshold climb to 16 MiB.
MMAP_PROBE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from clipvision.server.resources.allocator import configure_allocator, glibc
applied = configure_allocator(mmap_threshold=1 << 20, trim_threshold=32 << 20)
libc = glibc()
big = bytearray(16 << 20)
del big
def mapped(size):
    before = libc.mallinfo2().hblks
    block = bytearray(size)
    return libc.mallinfo2().hblks > before
print(json.dumps({"applied": applied, "2MiB": mapped(2 << 20), "512KiB": mapped(512 << 10)}))
"""

# 200 MiB in 100 KiB heap blocks, every 16th kept: free() cannot give back the
# holes between the kept blocks, which is what glibc holds after a burst. With
# "trim" a MemoryTrimmer thread runs; the probe waits up to 5 s for the RSS to fall.
THREAD_PROBE = """
import json, sys, time
from clipvision.server.resources.allocator import MemoryTrimmer

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

trimmer = MemoryTrimmer(interval_s=0.05)
idle = rss()
if sys.argv[1] == "trim":
    trimmer.start()
blocks = [bytearray(100 << 10) for _ in range(2048)]
keep = blocks[::16]
peak = rss()
del blocks
deadline = time.monotonic() + 5
while rss() - idle > (40 << 20) and time.monotonic() < deadline:
    time.sleep(0.05)
after = rss()
trimmer.stop()
print(json.dumps({"idle": idle, "peak": peak, "after": after}))
"""

# The same steps one tick at a time (check() by hand), and then 100 MiB held
# only by a reference cycle, which no collection frees until one is forced.
STEPS_PROBE = """
import gc, json, time
from clipvision.server.resources.allocator import MemoryTrimmer

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 >> 20

gc.disable()
trimmer = MemoryTrimmer()
steps = [("idle", trimmer.check(), rss())]
blocks = [bytearray(100 << 10) for _ in range(2048)]
keep = blocks[::16]
steps.append(("growing", trimmer.check(), rss()))
steps.append(("held", trimmer.check(), rss()))
steps.append(("still held", trimmer.check(), rss()))
del blocks
steps.append(("freed", trimmer.check(), rss()))
cycle = {"buffer": bytearray(100 << 20)}
cycle["self"] = cycle
steps.append(("cycle growing", trimmer.check(), rss()))
del cycle
steps.append(("cycle dropped", trimmer.check(), rss()))
print(json.dumps(steps))
"""


# start() freezes what is alive (process-wide), so this runs in a child too.
STOP_PROBE = """
import gc, json, threading, time
from clipvision.server.resources.allocator import MemoryTrimmer

def running():
    return any(thread.name == "clipvision-trim" for thread in threading.enumerate())

trimmer = MemoryTrimmer(interval_s=30.0)
trimmer.start()
frozen, is_running = gc.get_freeze_count(), running()
started = time.monotonic()
trimmer.stop()
trimmer.stop()
print(json.dumps({"frozen": frozen, "running": is_running,
                  "stop_s": time.monotonic() - started, "after_stop": running()}))
"""


def run_probe(code: str, *args: str, **env: str) -> Any:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    base.pop("GLIBC_TUNABLES", None)
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**base, **env},
    )
    return json.loads(result.stdout)


def test_nothing_is_set_unless_asked() -> None:
    assert configure_allocator() == {}


def test_fixed_mmap_threshold_maps_large_blocks_even_after_a_large_free() -> None:
    probe = run_probe(MMAP_PROBE)
    assert probe["applied"] == {"M_MMAP_THRESHOLD": MIB, "M_TRIM_THRESHOLD": 32 * MIB}
    # With glibc's dynamic threshold the freed 16 MiB block would have put 2 MiB
    # blocks on the heap, where they stay resident after they are freed.
    assert probe["2MiB"] is True
    assert probe["512KiB"] is False


def test_a_threshold_the_operator_sets_in_the_environment_is_left_alone() -> None:
    probe = run_probe(MMAP_PROBE, MALLOC_MMAP_THRESHOLD_=str(4 * MIB))
    assert probe["applied"] == {"M_TRIM_THRESHOLD": 32 * MIB}
    assert probe["2MiB"] is False


def rss_figures(probe: dict[str, object]) -> tuple[int, int, int]:
    idle, peak, after = (probe[key] for key in ("idle", "peak", "after"))
    assert isinstance(idle, int)
    assert isinstance(peak, int)
    assert isinstance(after, int)
    return idle, peak, after


def test_trimmer_thread_gives_a_burst_back_once_it_is_freed() -> None:
    idle, peak, after = rss_figures(run_probe(THREAD_PROBE, "control"))
    assert peak - idle > 180 * MIB
    assert after - idle > 150 * MIB  # glibc alone keeps the holes resident

    idle, peak, after = rss_figures(run_probe(THREAD_PROBE, "trim"))
    assert peak - idle > 180 * MIB
    assert after - idle < 40 * MIB


def test_trimmer_cleans_up_once_memory_stops_growing_and_collects_cycles() -> None:
    steps = run_probe(STEPS_PROBE)
    assert isinstance(steps, list)
    names = [name for name, _, _ in steps]
    cleaned = {name: did for name, did, _ in steps}
    rss = {name: mib for name, _, mib in steps}
    assert names[0] == "idle"
    # Never while memory rises; once when it stops; not again until it moves.
    assert cleaned == {
        "idle": False,
        "growing": False,
        "held": True,
        "still held": False,
        "freed": True,
        "cycle growing": False,
        "cycle dropped": True,
    }
    assert rss["held"] - rss["idle"] > 180
    assert rss["freed"] - rss["idle"] < 40
    assert rss["cycle growing"] - rss["idle"] > 90
    assert rss["cycle dropped"] - rss["idle"] < 40


def test_trimmer_freezes_start_up_objects_and_stops_promptly() -> None:
    probe = run_probe(STOP_PROBE)
    assert probe["frozen"] > 1000  # the interpreter's own objects, at least
    assert probe["running"] is True
    assert probe["stop_s"] < 1.0
    assert probe["after_stop"] is False


def test_without_glibc_both_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_glibc(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name}")  # as on musl

    monkeypatch.setattr(os, "confstr", no_glibc)
    assert configure_allocator(mmap_threshold=MIB) == {}
    trimmer = MemoryTrimmer(interval_s=0.01)
    assert not trimmer.supported
    trimmer.start()
    trimmer.stop()
    assert trimmer.cleanups == 0
    assert not any(thread.name == "clipvision-trim" for thread in threading.enumerate())
