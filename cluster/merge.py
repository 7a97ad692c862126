"""Merge the dataset shards' partial top-k states in a tree, without the driver in the loop.

Each node of the tree is a Ray task (half a CPU) that reads a group of at most `fan_in` states from
the store, folds them one at a time (tasks.topk.RunningTopK.merge: exact and order-free, so any
grouping gives the same result) and writes the merged state back; the driver submits the whole tree
at once, as keys and object references, so a level starts where its inputs are ready. It merges
only the last group itself (at most `fan_in` states): its memory and time do not grow with the
number of shards, and a build of a few shards starts no task at all.

A state is {"L<i>": RunningTopK.state_dict()} per layer, packed by storage.layout.pack_state."""
from __future__ import annotations

from deepvis.storage import layout
from deepvis.storage.store import Store

FAN_IN = 8
MERGED = layout.STATES + "/merge"   # intermediate and final merged states (rewritten by each build)


def merge_states(states) -> dict:
    """Fold an iterable of states (one at a time: only the running result and one part are held)."""
    from deepvis.tasks.topk import RunningTopK

    acc: dict | None = None
    for state in states:
        parts = {k: RunningTopK.from_state_dict(v) for k, v in state.items()}
        if acc is None:
            acc = parts
        else:
            if acc.keys() != parts.keys():
                raise ValueError(f"states of different layers: {sorted(acc)} vs {sorted(parts)}")
            for k, part in parts.items():
                acc[k].merge(part)
    if acc is None:
        raise ValueError("no state to merge")
    return {k: r.state_dict() for k, r in acc.items()}


def merge_group(store: Store, keys: list[str], out_key: str) -> str:
    """Read the states at `keys`, merge them, write the result at out_key; returns out_key."""
    merged = merge_states(_read_states(store, keys))
    store.put(out_key, layout.pack_state(merged))
    return out_key


def _read_states(store: Store, keys: list[str]):
    """The states at keys, in order, the next one read while the last one is folded (two held at
    most: a whole-network state is ~12 MB); a missing state is a KeyError, as store.get gives."""
    for key, data in store.get_many(keys, max_inflight=2):
        if data is None:
            raise KeyError(key)
        yield layout.unpack_state(data)


def _merge_node(store: Store, out_key: str, *keys: str) -> str:
    # the keys are top-level arguments: Ray resolves object refs there (not inside a list)
    return merge_group(store, list(keys), out_key)


def _task():
    import ray

    # half a CPU: the tree's tasks share the cores (a 1-CPU task on a full 2-core node would wait)
    return ray.remote(num_cpus=0.5, max_retries=3)(_merge_node)


def tree_merge(store: Store, keys: list[str], fan_in: int = FAN_IN) -> str:
    """Merge the states at `keys` into one; returns the key holding the result (keys[0] when alone)."""
    if not keys:
        raise ValueError("no state to merge")
    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, got {fan_in}")
    level, nodes = 0, list(keys)       # a node is a key, or the object ref of a task writing one
    task = _task() if len(nodes) > fan_in else None
    while len(nodes) > fan_in:
        groups = [nodes[i:i + fan_in] for i in range(0, len(nodes), fan_in)]
        # a lone leftover passes up as it is; Ray resolves the refs before a task runs
        nodes = [g[0] if len(g) == 1 else task.remote(store, f"{MERGED}/{level}/{j:06d}.npz", *g)
                 for j, g in enumerate(groups)]
        level += 1
    if len(nodes) == 1 and isinstance(nodes[0], str):
        return nodes[0]
    refs = [n for n in nodes if not isinstance(n, str)]
    if refs:
        import ray
        done = dict(zip(refs, ray.get(refs)))
        nodes = [done.get(n, n) if not isinstance(n, str) else n for n in nodes]
    return merge_group(store, nodes, f"{MERGED}/final.npz")
