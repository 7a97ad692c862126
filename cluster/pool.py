"""Feed shards to a pool of actors, unordered, surviving actor death.

The pool is made once per build, sized to the cluster, and serves every phase. Its actors are
requested all at once and never waited for together: work starts on the first one ready, the others
join as Ray places them. Actors still unplaced after `place_timeout` seconds are reported (the build
goes on with the placed ones; they still join if a node comes); when none is ready by then, the
build stops with one line (UserError) instead of waiting forever.

Each actor has `per_actor` shards in flight (2: the next one computes while the last one uploads, see
worker.ShardWorker.run); shards go first to the least busy actor. When an actor dies (process
killed, node lost) every shard it held goes back to the queue and a fresh actor is requested in its
place; when a shard raises, it is retried. A shard that fails `max_attempts` times is given up and
reported by id, never silently dropped."""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from deepvis.tasks.errors import UserError

try:  # newer Ray: a restarting/unreachable actor
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError


def _short(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def describe_resources(res: dict) -> str:
    """{'num_gpus': 1, 'num_cpus': 4} or {'GPU': 1.0, 'CPU': 4.0} -> '1 GPU, 4 CPUs' (custom
    resources too)."""
    names = {"num_gpus": "GPU", "num_cpus": "CPU", "GPU": "GPU", "CPU": "CPU"}
    parts = []
    for k, v in sorted(res.items(), key=lambda kv: (kv[0] not in names, names.get(kv[0], kv[0]))):
        if k in ("resources",) and isinstance(v, dict):
            parts += [describe_resources(v)] if v else []
            continue
        if not isinstance(v, (int, float)) or k.startswith(("memory", "object_store", "node:")):
            continue
        name = names.get(k, k)
        n = f"{v:g}"
        parts.append(f"{n} {name}" + ("s" if name in ("CPU", "GPU") and v != 1 else ""))
    return ", ".join(parts) or "nothing"


@dataclass
class _Run:
    """One `run` call's bookkeeping."""
    queue: deque
    attempts: Counter = field(default_factory=Counter)
    failed: dict = field(default_factory=dict)
    inflight: dict = field(default_factory=dict)   # run() ref -> (actor, shard)


CLOSE_TIMEOUT = 20.0   # seconds the actors get to close their decode processes at shutdown


class ShardPool:
    def __init__(self, make_actor: Callable[[], "ray.actor.ActorHandle"], n_actors: int, max_attempts: int = 3,
                 on_actor: Callable[[object, dict], None] | None = None,
                 fatal: tuple[type[BaseException], ...] = (), per_actor: int = 2,
                 place_timeout: float = 300.0, ask: dict | None = None, log: Callable[[str], None] = print):
        self.make_actor = make_actor
        self.fatal = fatal  # errors that doom every shard (the store is unreachable): stop at once
        self.max_attempts = max_attempts
        self.on_actor = on_actor
        self.per_actor = max(1, per_actor)
        self.place_timeout = place_timeout
        self.ask = ask or {}          # one actor's resource request, for the "could not be placed" line
        self.log = log
        self.asked = n_actors
        self.actors: list = []
        self.restarts = 0
        self.failed_starts = 0
        self.reported: set = set()    # pending actors already reported as not placed
        self.waiting_s = 0.0          # time run() spent with no actor ready (the "actors" phase)
        self.starting: dict = {}      # info() ref -> (actor, requested at)
        self.load: Counter = Counter()  # actor -> shards in flight
        self._launch(n_actors)

    def run(self, shards: list[dict], on_done: Callable[[dict, dict], None]) -> dict[str, str]:
        """Run every shard; call on_done(shard, summary) as each finishes. Returns {shard id: error}
        for the shards that failed max_attempts times."""
        r = _Run(deque(shards))
        while r.queue or r.inflight:
            self._dispatch(r)
            if not r.inflight and not self.starting:
                self._launch(1)                      # every actor is gone: ask for one
            t = time.monotonic()
            ready, _ = ray.wait(list(r.inflight) + list(self.starting), num_returns=1,
                                timeout=self._wait_timeout())
            if not self.actors:
                self.waiting_s += time.monotonic() - t
            if not ready:
                self._check_placement()
                continue
            ref = ready[0]
            if ref in self.starting:
                self._started(ref)
            else:
                self._finished(ref, r, on_done)
        return r.failed

    def _dispatch(self, r: _Run) -> None:
        """Least busy actor first, so that every actor has one shard before any has two."""
        while r.queue and self.actors:
            actor = min(self.actors, key=lambda a: self.load[a])
            if self.load[actor] >= self.per_actor:
                return
            shard = r.queue.popleft()
            self.load[actor] += 1
            r.inflight[actor.run.remote(shard)] = (actor, shard)

    def _finished(self, ref, r: _Run, on_done) -> None:
        actor, shard = r.inflight.pop(ref)
        self.load[actor] -= 1
        try:
            summary = ray.get(ref)
        except (RayActorError, ActorUnavailableError) as e:
            # the actor is gone (its process or its node): redo its shards, ask for a new one (once:
            # its other shard in flight fails the same way)
            if actor in self.actors:
                self._retire(actor)
                self.restarts += 1
                self._launch(1)
            self._retry(shard, e, r)
            return
        except RayTaskError as e:
            if self.fatal and isinstance(getattr(e, "cause", None), self.fatal):
                raise e.cause from None
            self._retry(shard, e, r)
            return
        on_done(shard, summary)

    def _started(self, ref) -> None:
        actor, _ = self.starting.pop(ref)
        self.reported.discard(ref)
        try:
            info = ray.get(ref)
        except (RayActorError, ActorUnavailableError, RayTaskError) as e:
            self.failed_starts += 1
            if self.failed_starts > self.max_attempts * max(1, len(self.actors) + 1):
                raise RuntimeError(f"actors keep failing to start: {_short(e)}") from None
            return
        self.actors.append(actor)
        if self.on_actor:
            self.on_actor(actor, info)

    def _wait_timeout(self) -> float | None:
        """Until the next pending actor is overdue (None: nothing left to watch)."""
        due = [t + self.place_timeout for ref, (_, t) in self.starting.items() if ref not in self.reported]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _check_placement(self) -> None:
        now = time.monotonic()
        overdue = {ref for ref, (_, t) in self.starting.items() if now - t >= self.place_timeout}
        if overdue <= self.reported:
            return
        self.reported |= overdue
        have = describe_resources(ray.cluster_resources())
        line = (f"{len(overdue)} of {self.asked} actors could not be placed within {self.place_timeout:g} s "
                f"(asked: {describe_resources(self.ask)} each; the cluster has {have})")
        if not self.actors and overdue == set(self.starting):
            raise UserError(f"{line}; ask for fewer (--actors), use --device cpu, add nodes, "
                            f"or wait longer (--actor-timeout)")
        self.log(f"{line}; going on with the {len(self.actors)} placed")

    def _launch(self, n: int) -> None:
        """Request n actors without waiting for them."""
        now = time.monotonic()
        for _ in range(n):
            a = self.make_actor()
            self.starting[a.info.remote()] = (a, now)

    def _retire(self, actor) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
        self.load.pop(actor, None)
        self._kill(actor)

    @staticmethod
    def _kill(actor) -> None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it is already dead
            pass

    def _retry(self, shard, err, r: _Run) -> None:
        r.attempts[shard["id"]] += 1
        if r.attempts[shard["id"]] >= self.max_attempts:
            r.failed[shard["id"]] = _short(err)
        else:
            r.queue.append(shard)

    def shutdown(self) -> None:
        # let the actors close what they started first (a ShardWorker's decode processes): killed
        # with them still running, they die in the wrong order and the actor's stderr says
        # "resource_tracker: process died unexpectedly ... might leak"; a hung actor is killed anyway
        closing = [a.close.remote() for a in self.actors if hasattr(a, "close")]
        if closing:
            try:
                ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT)
            except Exception:  # noqa: BLE001 - a dead actor's call: it is killed below regardless
                pass
        for a in list(self.actors):
            self._retire(a)
        for a, _ in self.starting.values():   # never placed: free the request
            self._kill(a)
        self.starting.clear()
