"""cluster.resources.allowed_cpus on fake cgroup v2 trees (real files in tmp_path) and on this machine."""
from __future__ import annotations

import os
import subprocess
import sys

from deepvis.cluster.resources import allowed_cpus, cgroup_quota, own_cgroup


def tree(tmp_path, quotas: dict[str, str], own: str = "/"):
    """A cgroup v2 tree: path -> cpu.max content; and a /proc/self/cgroup naming `own`."""
    root = tmp_path / "cgroup"
    for path, content in quotas.items():
        d = root.joinpath(*[p for p in path.strip("/").split("/") if p])
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(content + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_no_quota_is_the_affinity_mask(tmp_path):
    root, proc = tree(tmp_path, {"/": "max 100000"})
    assert allowed_cpus(set(range(6)), root, proc) == 6
    # no cgroup v2 at all (files absent)
    assert allowed_cpus({0, 3}, tmp_path / "nothing", tmp_path / "nothing") == 2


def test_quota_caps_and_rounds_up(tmp_path):
    root, proc = tree(tmp_path, {"/": "max 100000", "/docker/abc": "150000 100000"}, own="/docker/abc")
    assert cgroup_quota(root, "/docker/abc") == 1.5
    assert allowed_cpus(set(range(16)), root, proc) == 2
    assert allowed_cpus({5}, root, proc) == 1                       # affinity tighter than the quota


def test_the_tightest_ancestor_wins(tmp_path):
    root, proc = tree(tmp_path, {"/a": "300000 100000", "/a/b": "max 100000", "/a/b/c": "500000 100000"},
                      own="/a/b/c")
    assert own_cgroup(proc) == "/a/b/c"
    assert allowed_cpus(set(range(64)), root, proc) == 3


def test_tiny_quota_still_one(tmp_path):
    root, proc = tree(tmp_path, {"/": "10000 100000"})
    assert allowed_cpus(set(range(8)), root, proc) == 1


def test_this_machine_and_taskset():
    """The real call agrees with the kernel's affinity mask (no quota here, or a looser one), and a
    process pinned to one CPU by `taskset` sees exactly 1, whatever os.cpu_count() says."""
    assert 1 <= allowed_cpus() <= len(os.sched_getaffinity(0))
    code = "from deepvis.cluster.resources import allowed_cpus; print(allowed_cpus(), __import__('os').cpu_count())"
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    n, total = map(int, r.stdout.split())
    assert n == 1 and total >= 1
