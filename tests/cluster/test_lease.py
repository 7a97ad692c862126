"""One build per store (the lease), interrupted builds, and `deepvis status` telling a live build
from a dead one (issue #17 items 6 and 7). Builds run as real `deepvis build` subprocesses, each on
its own local Ray cluster."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepvis.cluster.lease import LEASE_KEY, STALE_S, BuildLease, new_lease, read_lease
from deepvis.storage.store import LocalStore
from deepvis.tasks.errors import UserError

DEEPVIS = [sys.executable, "-m", "deepvis.cli"]
HOST = socket.gethostname()


def build_cmd(out: Path, units: str = "0:6", steps: int = 60) -> list[str]:
    return [*DEEPVIS, "build", "--layers", "_blocks.1", "--units", units, "--presets", "yosinski-3",
            "--steps", str(steps), "--size", "48", "--shard-units", "1", "--actors", "2", "--out", str(out),
            "--no-progress"]


def deepvis(*args, timeout=300):
    return subprocess.run([*DEEPVIS, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def wait_for(pred, proc, what: str, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            pytest.fail(f"the build ended before {what}: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def units_once(out: Path, expected: list[int]) -> None:
    """Every selected unit is in the index exactly once, and each has its optimized image."""
    rows = pq.read_table(out / "index/units.parquet").to_pylist()
    assert sorted((r["layer"], r["unit"]) for r in rows) == [("_blocks.1", u) for u in expected]
    assert all((out / f"units/_blocks.1/{u}/yosinski-3.png").is_file() for u in expected)


# ------------------------------------------------------------------ the lease itself (a real local store)
def test_second_holder_refused_naming_the_first(tmp_path):
    store = LocalStore(tmp_path)
    with BuildLease(store) as first:
        with pytest.raises(UserError) as e:
            BuildLease(store).acquire()
        assert str(e.value) == (
            f"another build holds {store.uri}: {HOST}:{os.getpid()} (user {first.lease.user}), last heartbeat "
            f"0 s ago; it is running. Wait for it to finish, use another --out, or, if that build is dead, "
            f"re-run with --force")
        assert read_lease(store).token == first.lease.token
    assert read_lease(store) is None and not (tmp_path / LEASE_KEY).exists()   # released


def test_heartbeat_refreshes_and_a_take_over_is_noticed(tmp_path):
    store = LocalStore(tmp_path)
    logs: list[str] = []
    with BuildLease(store, log=logs.append, heartbeat_s=0.05) as held:
        first = read_lease(store).heartbeat
        deadline = time.time() + 30
        while read_lease(store).heartbeat == first and time.time() < deadline:
            time.sleep(0.02)
        assert read_lease(store).heartbeat > first
        usurper = BuildLease(store, force=True, log=logs.append)
        usurper.acquire()                       # --force on a live lease: taken, with a warning
        assert logs[0].startswith("warning: --force takes over the lease of a build that looks alive")
        while not held.lost and time.time() < deadline:
            time.sleep(0.02)
        assert held.lost and read_lease(store).token == usurper.lease.token
    assert read_lease(store).token == usurper.lease.token   # the first build does not delete theirs
    usurper.release()
    assert read_lease(store) is None


OTHER = "build-host.example"   # another machine: only its heartbeat tells whether it is alive


def stale_lease(store) -> None:
    lease = new_lease()
    lease.host, lease.pid, lease.holder = OTHER, 999999, f"{OTHER}:999999"
    lease.heartbeat = lease.started = time.time() - STALE_S - 180
    store.put(LEASE_KEY, json.dumps(lease.__dict__).encode())


def test_force_takes_over_a_stale_lease(tmp_path):
    store = LocalStore(tmp_path)
    stale_lease(store)
    with pytest.raises(UserError, match=r"holds .*999999 .*it looks dead \(no heartbeat for over 2 min\)"):
        BuildLease(store).acquire()
    logs: list[str] = []
    with BuildLease(store, force=True, log=logs.append) as mine:
        assert read_lease(store).token == mine.lease.token
    assert len(logs) == 1 and re.fullmatch(rf"taking over the stale lease of {re.escape(OTHER)}:999999 \(user "
                                           rf"{mine.lease.user}\), last heartbeat 3\d\d s ago", logs[0]), logs


# ------------------------------------------------------------------ status: dead vs interrupted
def running_manifest(out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "status": "running", "model": {"name": "efficientnet_lite0"},
        "layers": [{"name": "_fc", "kind": "linear", "shape": [1000], "units": 1000, "selected": [0, 1]}],
        "presets": [{"name": "yosinski-3"}], "failed_shards": []}))


def test_status_says_dead_when_the_builds_lease_is_stale_or_gone(tmp_path):
    """What a killed driver (SIGKILL, lost machine) leaves: a 'running' manifest and a lease nobody
    refreshes, or none."""
    out = tmp_path / "atlas"
    running_manifest(out)
    r = deepvis("status", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == (
        f"atlas {out}: dead: the build stopped without finishing (no build holds its lease; a live build "
        f"beats every 30 s); re-run the same command to resume  model efficientnet_lite0")
    stale_lease(LocalStore(out))
    r = deepvis("status", out, "--json")
    doc = json.loads(r.stdout)
    assert doc["status"] == "running" and doc["state"] == "dead"
    assert re.fullmatch(
        rf"dead: the build stopped without finishing \(last heartbeat 3\d\d s ago from "
        rf"{re.escape(OTHER)}:999999; a live build beats every 30 s\); re-run the same command to resume",
        doc["state_detail"]), doc["state_detail"]
    # and a new build refuses until told the holder is dead; before any model or Ray work
    r = deepvis("build", "--layers", "_fc", "--units", "0:2", "--out", out, "--no-progress",
                "--address", "127.0.0.1:1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "it looks dead (no heartbeat for over 2 min)" in r.stderr and "re-run with --force" in r.stderr


def test_a_lease_whose_process_is_gone_here_is_taken_over(tmp_path):
    """A build on this machine whose process no longer exists (stopped by a dead store, killed -9)
    holds nothing, however fresh its last heartbeat: the next build takes its lease without --force."""
    store = LocalStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = new_lease()
    lease.pid, lease.holder = dead.pid, f"{lease.host}:{dead.pid}"
    store.put(LEASE_KEY, json.dumps(lease.__dict__).encode())
    logs: list[str] = []
    with BuildLease(store, log=logs.append) as mine:
        assert read_lease(store).token == mine.lease.token
    assert logs == [f"taking over the lease of a build that is no longer running ({HOST}:{dead.pid}: no such process)"]


# ------------------------------------------------------------------ real builds
def test_concurrent_build_refused_first_completes(tmp_path):
    """The first build's driver is paused (SIGSTOP) while the second starts, so the two overlap
    whatever the machine's speed; its actors run on, its lease stays fresh (< 2 min)."""
    out = tmp_path / "atlas"
    first = subprocess.Popen(build_cmd(out, units="0:4", steps=30), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "manifest.json").exists(), first, "the first build wrote its manifest")
        first.send_signal(signal.SIGSTOP)
        try:
            second = subprocess.run(build_cmd(out), capture_output=True, text=True, timeout=120)
            status = deepvis("status", out)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip()
        assert line.startswith(f"deepvis build: error: another build holds {out}: {HOST}:{first.pid} (user ")
        assert line.endswith("; it is running. Wait for it to finish, use another --out, or, if that build "
                             "is dead, re-run with --force") and "\n" not in line
        head = status.stdout.splitlines()[0]
        assert head.startswith(f"atlas {out}: running (lease held by {HOST}:{first.pid}, heartbeat "), head
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert "[complete]" in stdout
    units_once(out, list(range(4)))
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert not (out / LEASE_KEY).exists()


def test_sigterm_writes_interrupted_and_the_rerun_completes(tmp_path):
    out = tmp_path / "atlas"
    records = out / "_build/done"
    proc = subprocess.Popen(build_cmd(out, steps=30), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: records.exists() and len(list(records.rglob("*.json"))) >= 1, proc, "a shard finished")
        # pause the driver so that it cannot finish before the signal lands: at most the shards in
        # flight (one per actor) finish meanwhile; SIGTERM is handled when it resumes
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (stdout, err)
    assert err.strip().splitlines() == ["deepvis build: interrupted; finished work is kept, re-run to resume"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["build"]["interrupted"]
    assert not (out / LEASE_KEY).exists()            # released on the way out
    r = deepvis("status", out)
    assert r.stdout.splitlines()[0] == (f"atlas {out}: interrupted (Ctrl-C or SIGTERM); re-run the same command "
                                        f"to resume  model efficientnet_lite0")
    done = len(list(records.rglob("*.json")))
    assert 1 <= done < 6
    rerun = subprocess.run(build_cmd(out, steps=30), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{6 - done} shards computed, {done} skipped" in rerun.stdout
    units_once(out, list(range(6)))
