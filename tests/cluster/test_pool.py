"""cluster.pool.ShardPool on a real local Ray cluster, with a light actor (no model): every phase runs
on every actor, actors that cannot be placed are reported (none placed: one-line error), a killed
actor's shards in flight are all redone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepvis.cluster.pool import ShardPool, describe_resources
from deepvis.tasks.errors import UserError


class Echo:
    """Runs a shard by sleeping; a shard with "barrier" waits (at most 60 s) until that many distinct
    processes have started a barrier shard, so the test does not depend on how fast actors start."""

    def __init__(self, barrier_dir: str):
        self.dir = Path(barrier_dir)

    def info(self) -> dict:
        return {"pid": os.getpid()}

    def run(self, shard: dict) -> dict:
        if shard.get("barrier"):
            (self.dir / str(os.getpid())).touch()
            deadline = time.time() + 60
            while len(list(self.dir.iterdir())) < shard["barrier"] and time.time() < deadline:
                time.sleep(0.05)
        time.sleep(shard.get("sleep", 0))
        return {"pid": os.getpid(), "id": shard["id"]}


class Closing(Echo):
    """An Echo whose close() leaves a mark (ShardWorker.close stops its decode processes)."""

    def close(self) -> bool:
        (self.dir.parent / f"closed-{os.getpid()}").touch()
        return True


def maker(ray, tmp_path, **opts):
    remote = ray.remote(Echo).options(num_cpus=0.25, max_concurrency=2, max_restarts=0, **opts)
    return lambda: remote.remote(str(tmp_path))


def run(pool, shards) -> tuple[dict, dict]:
    done = {}
    failed = pool.run(shards, lambda s, summary: done.__setitem__(s["id"], summary))
    return done, failed


def test_later_phase_runs_on_every_actor(ray_cluster, tmp_path):
    """The pool is sized to the cluster, not to the first phase (1 shard): the next phase's shards
    run on both actors."""
    pool = ShardPool(maker(ray_cluster, tmp_path), 2)
    try:
        done, _ = run(pool, [{"id": "opt/0"}])
        assert list(done) == ["opt/0"]
        done, failed = run(pool, [{"id": f"data/{i}", "barrier": 2} for i in range(4)])
        assert failed == {} and len(done) == 4
        assert len({d["pid"] for d in done.values()}) == 2, done
    finally:
        pool.shutdown()


def test_actors_that_cannot_be_placed_are_reported(ray_cluster, tmp_path):
    """One of two actors asks for a resource no node has: reported after the timeout, the work goes
    on on the other one."""
    good, bad = maker(ray_cluster, tmp_path), maker(ray_cluster, tmp_path, resources={"no_such_thing": 1})
    ready = good()
    ray_cluster.get(ready.info.remote())   # started before the pool: the timeout cannot catch it
    made = []
    lines = []

    def make():
        made.append(1)
        return ready if len(made) == 1 else bad()
    pool = ShardPool(make, 2, place_timeout=2.0, ask={"num_cpus": 0.25, "resources": {"no_such_thing": 1}},
                     log=lines.append)
    try:
        done, failed = run(pool, [{"id": f"s/{i}", "sleep": 1.0} for i in range(8)])   # 4 s of work
        assert failed == {} and len(done) == 8
        assert len(lines) == 1 and lines[0].startswith("1 of 2 actors could not be placed within 2 s"), lines
        assert "asked: 0.25 CPUs, 1 no_such_thing each" in lines[0] and "going on with the 1 placed" in lines[0]
    finally:
        pool.shutdown()


def test_no_actor_placed_is_a_user_error(ray_cluster, tmp_path):
    pool = ShardPool(maker(ray_cluster, tmp_path, resources={"no_such_thing": 1}), 1, place_timeout=1.0,
                     ask={"num_gpus": 1, "num_cpus": 4})
    try:
        t = time.time()
        with pytest.raises(UserError, match=r"1 of 1 actors could not be placed within 1 s \(asked: 4 CPUs, "
                                            r"1 GPU each; the cluster has 2 CPUs.*--actor-timeout"):
            run(pool, [{"id": "s/0"}])
        assert time.time() - t < 30
    finally:
        pool.shutdown()


def test_killed_actor_all_its_shards_in_flight_are_redone(ray_cluster, tmp_path):
    pids = []
    pool = ShardPool(maker(ray_cluster, tmp_path), 2, on_actor=lambda a, info: pids.append(info["pid"]))
    done = {}
    killed = []

    def on_done(shard, summary):
        done[shard["id"]] = summary
        if not killed:   # kill the process that did not run this one, with its 2 shards in flight
            victim = next(p for p in pids if p != summary["pid"]) if len(pids) > 1 else summary["pid"]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
    try:
        failed = pool.run([{"id": f"s/{i}", "sleep": 0.4} for i in range(10)], on_done)
        assert failed == {} and sorted(done) == sorted(f"s/{i}" for i in range(10))
        assert pool.restarts == 1       # its replacement may join, or the survivor drains the queue
    finally:
        pool.shutdown()


def test_describe_resources():
    assert describe_resources({"num_gpus": 1, "num_cpus": 4}) == "4 CPUs, 1 GPU"
    assert describe_resources({"CPU": 2.0, "memory": 1e9, "node:127.0.0.1": 1.0}) == "2 CPUs"


def test_build_that_can_never_place_an_actor_ends_with_one_line(tmp_path):
    """`--device cuda` on this CPU-only machine: the GPU actor is never placed."""
    out = tmp_path / "atlas"
    r = subprocess.run([sys.executable, "-m", "deepvis.cli", "build", "--layers", "_fc", "--units", "0:2",
                        "--presets", "yosinski-3", "--steps", "2", "--size", "32", "--device", "cuda",
                        "--actors", "1", "--actor-timeout", "3", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "1 of 1 actors could not be placed within 3 s (asked: 1 CPU, 1 GPU each; the cluster has" in lines[0]


def test_shutdown_lets_every_actor_close_before_it_is_killed(ray_cluster, tmp_path):
    """ShardPool.shutdown calls each actor's close() and waits for it, then kills the actors: what
    an actor started (decode processes) ends in order, not killed under it."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    remote = ray_cluster.remote(Closing).options(num_cpus=0.25, max_concurrency=2, max_restarts=0)
    pool = ShardPool(lambda: remote.remote(str(barrier)), 2)
    done, failed = run(pool, [{"id": f"data/{i}", "barrier": 2} for i in range(4)])
    pids = {d["pid"] for d in done.values()}
    assert failed == {} and len(pids) == 2
    pool.shutdown()
    assert {int(p.name.split("-")[1]) for p in tmp_path.glob("closed-*")} == pids
    assert pool.actors == []
