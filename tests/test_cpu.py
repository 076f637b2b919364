"""The CPUs the process may use: cgroup v2 and v1 quotas, nested cgroups, affinity."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipvision.server.config.cpu import affinity_count, cgroup_cpu_quota, cpu_budget


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def test_a_container_quota_caps_the_count_below_the_affinity(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "150000 100000\n")  # what docker --cpus 1.5 writes (v2)
    budget = cpu_budget(root, proc_cgroup(tmp_path, "0::/\n"))
    assert budget.quota == 1.5
    assert budget.count == 1  # rounded down: a second thread would be throttled
    assert "cgroup CPU quota 1.5" in budget.describe()


def test_the_tightest_quota_on_the_way_up_wins(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "max 100000\n")
    write(root / "kubepods" / "cpu.max", "max 100000\n")
    write(root / "kubepods" / "pod1" / "cpu.max", "300000 100000\n")
    write(root / "kubepods" / "pod1" / "box" / "cpu.max", "max 100000\n")
    own = proc_cgroup(tmp_path, "0::/kubepods/pod1/box\n")
    assert cgroup_cpu_quota(root, own) == 3.0


def test_no_limit_anywhere_leaves_the_affinity(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "max 100000\n")
    budget = cpu_budget(root, proc_cgroup(tmp_path, "0::/\n"))
    assert budget.quota is None
    assert budget.count == affinity_count()


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_quota_and_period(tmp_path: Path, mount: str) -> None:
    root = tmp_path / "cgroup"
    write(root / mount / "cpu.cfs_quota_us", "250000\n")
    write(root / mount / "cpu.cfs_period_us", "100000\n")
    # A namespaced container: its own path does not exist below the mount, the root is it.
    own = proc_cgroup(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_quota(root, own) == 2.5


def test_cgroup_v1_without_a_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, proc_cgroup(tmp_path, "4:cpu:/\n")) is None


def test_no_cgroup_filesystem_at_all(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path / "absent", tmp_path / "absent-proc") is None
    assert cpu_budget(tmp_path / "absent", tmp_path / "absent-proc").count == affinity_count()


def test_a_tiny_quota_still_leaves_one_cpu(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "20000 100000\n")  # 0.2 CPUs
    assert cpu_budget(root, proc_cgroup(tmp_path, "0::/\n")).count == 1
