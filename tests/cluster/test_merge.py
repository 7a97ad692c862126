"""Tree merge of partial top-k states (cluster/merge.py) equals the serial merge, whatever the grouping,
and both equal a brute-force sort of every image (the independent reference)."""
from __future__ import annotations

import numpy as np
import pytest

from deepvis.cluster.merge import MERGED, merge_states, tree_merge
from deepvis.storage import layout
from deepvis.storage.store import LocalStore
from deepvis.tasks.topk import RunningTopK
from tests.tasks.test_topk import assert_same, brute, synthetic

LAYERS = (13, 5)   # units of two layers, with many tied activations


def partial_states(n_shards: int, per: int = 9, k: int = 4, seed: int = 0):
    """n_shards states of disjoint images (random sizes up to per), two layers each; and the data."""
    rng = np.random.default_rng(seed)
    data = [synthetic(n=n_shards * per, c=c, seed=seed + i) for i, c in enumerate(LAYERS)]
    ids = data[0][3]
    bounds = np.unique(np.r_[0, np.sort(rng.integers(1, len(ids), n_shards - 1)), len(ids)])
    states = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        state = {}
        for i, (values, ys, xs, _) in enumerate(data):
            r = RunningTopK(values.shape[1], k)
            r.add(values[a:b], ys[a:b], xs[a:b], ids[a:b])
            state[f"L{i}"] = r.state_dict()
        states.append(state)
    return states, data, ids


def result(state: dict) -> dict:
    return {k: RunningTopK.from_state_dict(v).result() for k, v in state.items()}


def assert_same_state(a: dict, b: dict) -> None:
    ra, rb = result(a), result(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert_same(ra[k], rb[k])
        for s in ("count", "max", "frac_positive"):
            np.testing.assert_array_equal(ra[k]["stats"][s], rb[k]["stats"][s])
        np.testing.assert_allclose(ra[k]["stats"]["mean"], rb[k]["stats"]["mean"], rtol=1e-12)


def test_serial_merge_equals_brute_force():
    states, data, ids = partial_states(12)
    merged = merge_states(states)
    for i, (values, ys, xs, _) in enumerate(data):
        assert_same(result(merged)[f"L{i}"], brute(values, ys, xs, ids, 4))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_grouping_gives_the_serial_result(seed):
    """Random trees: shuffle the states, cut them into random groups, merge groups, repeat."""
    rng = np.random.default_rng(seed)
    states, _, _ = partial_states(30, seed=seed)
    serial = merge_states(states)
    nodes = list(states)
    while len(nodes) > 1:
        rng.shuffle(nodes)
        cuts = np.unique(np.r_[0, rng.integers(1, len(nodes), max(1, len(nodes) // 3)), len(nodes)])
        if len(cuts) == len(nodes) + 1:   # every group of one: merge them all
            cuts = np.array([0, len(nodes)])
        nodes = [merge_states(nodes[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    assert_same_state(nodes[0], serial)


@pytest.mark.parametrize("n,fan_in", [(1, 8), (5, 8), (23, 3), (40, 4)])
def test_tree_of_ray_tasks_equals_serial_merge(ray_cluster, tmp_path, n, fan_in):
    store = LocalStore(tmp_path)
    states, _, _ = partial_states(n, seed=n)
    keys = [f"_build/state/data/{i:05d}.npz" for i in range(len(states))]
    for k, s in zip(keys, states):
        store.put(k, layout.pack_state(s))
    key = tree_merge(store, keys, fan_in=fan_in)
    assert_same_state(layout.unpack_state(store.get(key)), merge_states(states))
    levels = {k.split("/")[3] for k in store.list(MERGED + "/") if k.count("/") == 4}
    assert len(levels) == (0 if len(states) <= fan_in else int(np.ceil(np.log(len(states)) / np.log(fan_in))) - 1)


def test_mismatched_states_refuse():
    a, _, _ = partial_states(2)
    with pytest.raises(ValueError, match="different layers"):
        merge_states([a[0], {"L0": a[1]["L0"]}])
    with pytest.raises(ValueError, match="no state"):
        tree_merge(None, [])


def test_merge_group_reads_ahead_and_refuses_a_missing_state(tmp_path):
    """merge_group reads the next state while it folds the last one: the same result as
    merge_states of the states in memory, and a missing one is a KeyError naming its key."""
    from deepvis.cluster.merge import merge_group
    store = LocalStore(tmp_path)
    states, _, _ = partial_states(7, seed=5)
    keys = [f"_build/state/data/{i:05d}.npz" for i in range(len(states))]
    for k, s in zip(keys, states):
        store.put(k, layout.pack_state(s))
    merge_group(store, keys, "out.npz")
    assert_same_state(layout.unpack_state(store.get("out.npz")), merge_states(states))
    with pytest.raises(KeyError, match="00099"):
        merge_group(store, keys[:2] + ["_build/state/data/00099.npz"], "bad.npz")
    assert not store.exists("bad.npz")
