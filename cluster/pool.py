"""Feed shards to a pool of actors, unordered, surviving actor death.

Each actor has one shard in flight. When an actor dies (process killed, node lost) its shard goes back
to the queue and a fresh actor replaces it; when a shard raises, it is retried. A shard that fails
`max_attempts` times is given up and reported by id, never silently dropped."""
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
        self._start(n_actors)

    def _start(self, n: int) -> list:
        new = [self.make_actor() for _ in range(n)]
        infos = ray.get([a.info.remote() for a in new])  # waits for the model to load everywhere
        for a, info in zip(new, infos):
            self.actors.append(a)
            if self.on_actor:
                self.on_actor(a, info)
        return new

    def run(self, shards: list[dict], on_done: Callable[[dict, dict], None]) -> dict[str, str]:
        """Run every shard; call on_done(shard, summary) as each finishes. Returns {shard id: error}
        for the shards that failed max_attempts times."""
        queue = deque(shards)
        attempts: Counter = Counter()
        failed: dict[str, str] = {}
        inflight: dict = {}
        idle = list(self.actors)
        while queue or inflight:
            while idle and queue:
                actor, shard = idle.pop(), queue.popleft()
                inflight[actor.run.remote(shard)] = (actor, shard)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                actor, shard = inflight.pop(ref)
                try:
                    summary = ray.get(ref)
                except (RayActorError, ActorUnavailableError) as e:
                    # the actor is gone: replace it, redo its shard
                    self._retire(actor)
                    self.restarts += 1
                    try:
                        idle.extend(self._start(1))
                    except (RayActorError, ActorUnavailableError):
                        pass  # could not start one now; the others carry on
                    self._retry(shard, e, attempts, queue, failed)
                    if not idle and not inflight and queue:
                        idle.extend(self._start(1))
                    continue
                except RayTaskError as e:
                    if self.fatal and isinstance(getattr(e, "cause", None), self.fatal):
                        raise e.cause from None
                    idle.append(actor)
                    self._retry(shard, e, attempts, queue, failed)
                    continue
                idle.append(actor)
                on_done(shard, summary)
        return failed

    def _retire(self, actor) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
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
