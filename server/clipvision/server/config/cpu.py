"""How many CPUs the process may really use: its affinity mask and its cgroup's CPU quota.

``os.cpu_count()`` tells the host's cores; a container limited to two CPUs on a
64-core host that sizes its thread pools by it runs 64 threads on two CPUs' worth
of time, and the kernel throttles it. The quota is read from cgroup v2
(``cpu.max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), for the
process's own cgroup and its ancestors (the tightest wins).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# Where cgroup v1 mounts its cpu controller, by distribution.
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs the process may use and where that figure came from."""

    count: int
    """Whole CPUs: the affinity mask, capped by the cgroup quota (rounded down, at least 1)."""
    affinity: int
    quota: float | None
    """The cgroup quota in CPUs (quota / period), or None where no cgroup limits CPU."""

    def describe(self) -> str:
        """One phrase for the log: the count and what set it."""
        if self.quota is not None and self.quota < self.affinity:
            return f"{self.count} (cgroup CPU quota {self.quota:g} of {self.affinity} CPUs)"
        return f"{self.count} (CPU affinity; no tighter cgroup quota)"


def affinity_count() -> int:
    """CPUs in the process's affinity mask (``taskset``, cpusets), else the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) over the process's cgroup and its ancestors, or None.

    cgroup v2 wins where it has a cpu controller; otherwise v1's cpu controller is read.
    A cgroup namespace (a container) shows its own cgroup at the root, so the root is
    always among the places looked at.
    """
    own = _own_cgroups(proc_cgroup)
    v2 = _tightest(_v2_quota(directory) for directory in _chain(root, own.get("")))
    if v2 is not None or (root / "cpu.max").exists():
        return v2
    for mount in _V1_CPU_MOUNTS:
        base = root / mount
        if base.is_dir():
            path = own.get("cpu") or own.get("cpuacct")
            return _tightest(_v1_quota(directory) for directory in _chain(base, path))
    return None


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> CpuBudget:
    """The CPUs this process may use: affinity capped by the cgroup quota."""
    affinity = affinity_count()
    quota = cgroup_cpu_quota(root, proc_cgroup)
    count = affinity if quota is None else max(1, min(affinity, math.floor(quota)))
    return CpuBudget(count=count, affinity=affinity, quota=quota)


def available_cpus() -> int:
    """Whole CPUs this process may use (see ``cpu_budget``)."""
    return cpu_budget().count


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """The process's cgroup path per v1 controller, and v2's under the key ``""``."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _chain(base: Path, path: str | None) -> list[Path]:
    """``base`` joined with the cgroup path and each of its ancestors, down to ``base``."""
    directories = [base]
    if path:
        current = base
        for part in Path(path.lstrip("/")).parts:
            current = current / part
            if not current.is_dir():
                break  # a namespaced view: the process's cgroup is the root itself
            directories.append(current)
    return directories


def _tightest(quotas: Iterable[float | None]) -> float | None:
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
    except OSError:
        return None
    if quota == "max" or not quota.isdigit():
        return None
    return int(quota) / int(period or "100000")


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:  # -1: no limit
        return None
    return quota / period
