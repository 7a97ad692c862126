"""Feed shards to a pool of actors, unordered, surviving actor death.

Each actor has one shard in flight. When an actor dies (process killed, node lost) its shard goes back
to the queue and a fresh actor is requested in its place; when a shard raises, it is retried. A shard
that fails `max_attempts` times is given up and reported by id, never silently dropped.

A replacement starts in the background: when its node left and no other has room for it, the
surviving actors drain the queue meanwhile (and on an autoscaling cluster the pending actor is what
asks for a new node); it joins the pool as soon as Ray places it, and is dropped when the work ends."""
from __future__ import annotations

from collections import Counter, deque
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

try:  # newer Ray: a restarting/unreachable actor
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError


def _short(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


class ShardPool:
    def __init__(self, make_actor: Callable[[], "ray.actor.ActorHandle"], n_actors: int, max_attempts: int = 3,
                 on_actor: Callable[[object, dict], None] | None = None,
                 fatal: tuple[type[BaseException], ...] = ()):
        self.make_actor = make_actor
        self.fatal = fatal  # errors that doom every shard (the store is unreachable): stop at once
        self.max_attempts = max_attempts
        self.on_actor = on_actor
        self.actors: list = []
        self.restarts = 0
        self.failed_starts = 0
        self._start(n_actors)

    def _start(self, n: int) -> list:
        launched = self._launch(n)
        infos = ray.get(list(launched))  # waits for the model to load everywhere
        for a, info in zip(launched.values(), infos):
            self._joined(a, info)
        return list(launched.values())

    def run(self, shards: list[dict], on_done: Callable[[dict, dict], None]) -> dict[str, str]:
        """Run every shard; call on_done(shard, summary) as each finishes. Returns {shard id: error}
        for the shards that failed max_attempts times."""
        queue = deque(shards)
        attempts: Counter = Counter()
        failed: dict[str, str] = {}
        inflight: dict = {}
        starting: dict = {}   # info() ref -> an actor not yet placed/loaded
        idle = list(self.actors)
        try:
            while queue or inflight:
                while idle and queue:
                    actor, shard = idle.pop(), queue.popleft()
                    inflight[actor.run.remote(shard)] = (actor, shard)
                if not inflight and not starting:
                    if not queue:
                        break
                    starting.update(self._launch(1))      # every actor is gone: ask for one
                ready, _ = ray.wait(list(inflight) + list(starting), num_returns=1)
                for ref in ready:
                    if ref in starting:
                        actor = starting.pop(ref)
                        try:
                            info = ray.get(ref)
                        except (RayActorError, ActorUnavailableError, RayTaskError) as e:
                            self.failed_starts += 1
                            if self.failed_starts > self.max_attempts * max(1, len(self.actors) + 1):
                                raise RuntimeError(f"actors keep failing to start: {_short(e)}") from None
                            continue
                        self._joined(actor, info)
                        idle.append(actor)
                        continue
                    actor, shard = inflight.pop(ref)
                    try:
                        summary = ray.get(ref)
                    except (RayActorError, ActorUnavailableError) as e:
                        # the actor is gone (its process or its node): redo its shard, ask for a new one
                        self._retire(actor)
                        self.restarts += 1
                        starting.update(self._launch(1))
                        self._retry(shard, e, attempts, queue, failed)
                        continue
                    except RayTaskError as e:
                        if self.fatal and isinstance(getattr(e, "cause", None), self.fatal):
                            raise e.cause from None
                        idle.append(actor)
                        self._retry(shard, e, attempts, queue, failed)
                        continue
                    idle.append(actor)
                    on_done(shard, summary)
        finally:
            for actor in starting.values():   # never placed: free the request
                self._kill(actor)
        return failed

    def _launch(self, n: int) -> dict:
        """Request n actors without waiting for them: {info() ref: actor}."""
        new = [self.make_actor() for _ in range(n)]
        return {a.info.remote(): a for a in new}

    def _joined(self, actor, info) -> None:
        self.actors.append(actor)
        if self.on_actor:
            self.on_actor(actor, info)

    def _retire(self, actor) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
        self._kill(actor)

    @staticmethod
    def _kill(actor) -> None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it is already dead
            pass

    def _retry(self, shard, err, attempts, queue, failed) -> None:
        attempts[shard["id"]] += 1
        if attempts[shard["id"]] >= self.max_attempts:
            failed[shard["id"]] = _short(err)
        else:
            queue.append(shard)

    def shutdown(self) -> None:
        for a in list(self.actors):
            self._retire(a)
