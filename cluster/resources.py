"""How many CPUs this process may really use: os.cpu_count() counts the machine's CPUs, but a
container or `taskset` allows fewer, and a local Ray cluster sized by the machine oversubscribes them
(one busy actor per counted CPU, each throttled)."""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def allowed_cpus(affinity: set[int] | None = None, cgroup_root: Path = CGROUP_ROOT,
                 proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """min(CPUs in this process's affinity mask, the cgroup v2 cpu.max quota of its cgroup and every
    parent, rounded up), at least 1. Without a quota (or cgroup v2) the affinity mask alone."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    n = len(affinity) or (os.cpu_count() or 1)
    quota = cgroup_quota(cgroup_root, own_cgroup(proc_cgroup))
    if quota is not None:
        n = min(n, math.ceil(quota))   # 1.5 CPUs of time: 2 workers use all of it
    return max(1, n)


def own_cgroup(proc_cgroup: Path) -> str:
    """This process's cgroup v2 path ("0::/a/b" in /proc/self/cgroup), "/" when unknown."""
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                return line[3:].strip() or "/"
    except OSError:
        pass
    return "/"


def cgroup_quota(root: Path, path: str) -> float | None:
    """The tightest cpu.max quota (CPUs, e.g. 1.5) from the cgroup at `path` up to the root; None
    when none is set ("max") or the files are absent (no cgroup v2)."""
    quotas = []
    parts = [p for p in path.strip("/").split("/") if p]
    for depth in range(len(parts), -1, -1):
        f = root.joinpath(*parts[:depth], "cpu.max")
        try:
            limit, period = f.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if limit != "max" and float(period) > 0:
            quotas.append(float(limit) / float(period))
    return min(quotas) if quotas else None
