"""How many CPUs this process may use: the smaller of the CPUs it may run on (affinity) and its
cgroup's CPU quota, rounded down (at least 1). A container limited to 500m has 2+ CPUs in
os.cpu_count() but half of one to spend, and a second server process there would only add a
second interpreter's memory and contention."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota(cgroup: Path) -> float | None:
    """CPUs the cgroup's quota allows, or None when unlimited (v2 cpu.max, else v1's cfs files)."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available(cgroup: Path = CGROUP) -> int:
    cpus = len(os.sched_getaffinity(0))
    quota = _quota(cgroup)
    return max(1, min(cpus, math.floor(quota) if quota is not None else cpus))
