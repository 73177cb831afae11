"""A container's CPU limit from the manifests, held to as a cgroup (v1) CPU quota on this machine's
processes: what the fault tests at the pod's CPU limit run their servers and Envoys in."""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Iterator

from tests.support.deploy import ROOT, container, find, render_k8s

CPU_CONTROLLER = Path("/sys/fs/cgroup/cpu")  # cgroup v1, as on this project's machines
PERIOD_US = 100_000
_names = itertools.count()


def pod_cpu_limit(name: str) -> float:
    """The API pod's container `name`'s CPU limit in k8s/base, in cores (500m -> 0.5)."""
    pod = find(render_k8s(ROOT / "k8s" / "base"), "Deployment", "payments")["spec"]["template"]["spec"]
    limit = container(pod, name)["resources"]["limits"]["cpu"]
    return int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)


@contextlib.contextmanager
def cpu_quota(cores: float) -> Iterator[Path]:
    """A cgroup limited to `cores`; write a pid to its cgroup.procs to put every thread of that
    process under it. Its processes go back to the root group on exit."""
    group = CPU_CONTROLLER / f"payments-test-{os.getpid()}-{next(_names)}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(int(cores * PERIOD_US)))
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            (CPU_CONTROLLER / "cgroup.procs").write_text(pid)
        group.rmdir()


def throttled(group: Path) -> int:
    """How many of the group's periods the quota bit in so far."""
    stats = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stats["nr_throttled"])
