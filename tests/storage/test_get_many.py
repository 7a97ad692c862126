"""Store.get_many and layout.get_json_many: the concurrent reads behind a resume, `deepvis status`
and the tree merge (thousands of completion records: one S3 GET after another would take minutes).
In order, missing keys as None, at most N GETs running, errors raised, nothing left running."""
from __future__ import annotations

import threading
import time

import pytest

from deepvis.storage import layout
from deepvis.storage.base import Store
from deepvis.storage.errors import StoreError
from deepvis.storage.store import LocalStore


class SlowStore(LocalStore):
    """A real local store whose GETs take `delay` seconds each, counted: how many ran, at most how
    many at once; the keys in `fail` fail as an unreachable server would."""

    def __init__(self, root, delay: float = 0.02, fail: set[str] = frozenset()):
        super().__init__(root)
        self.delay, self.fail = delay, set(fail)
        self.running = self.peak = self.calls = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.delay)
            if key in self.fail:
                raise StoreError(f"get of {key} failed")
            return super().get(key)
        finally:
            with self.lock:
                self.running -= 1

    def get_many(self, keys, max_inflight: int = 16):
        return Store.get_many(self, keys, max_inflight)   # LocalStore's cap of 4 lifted: N is tested


def _fill(store, n: int) -> list[str]:
    keys = [f"r/{i:04d}.json" for i in range(n)]
    for i, k in enumerate(keys):
        if i % 7:                                   # every 7th is missing
            LocalStore.put(store, k, str(i).encode())
    return keys


@pytest.mark.parametrize("inflight", [1, 4, 16])
def test_in_order_missing_as_none_at_most_n_running(tmp_path, inflight):
    store = SlowStore(tmp_path)
    keys = _fill(store, 60)
    got = list(store.get_many(keys, inflight))
    assert [k for k, _ in got] == keys
    assert got == [(k, None if i % 7 == 0 else str(i).encode()) for i, k in enumerate(keys)]
    assert store.peak <= inflight and store.running == 0
    if inflight > 1:
        assert store.peak > 1, "the GETs never overlapped"


def test_concurrent_reads_take_a_fraction_of_serial(tmp_path):
    store = SlowStore(tmp_path, delay=0.02)
    keys = _fill(store, 80)
    t = time.perf_counter()
    serial = list(store.get_many(keys, 1))
    t_serial = time.perf_counter() - t
    t = time.perf_counter()
    assert list(store.get_many(keys, 16)) == serial
    assert time.perf_counter() - t < t_serial / 3      # 80 x 20 ms of waiting, 16 at a time


def test_an_error_is_raised_and_nothing_is_left_running(tmp_path):
    store = SlowStore(tmp_path, fail={"r/0010.json"})
    keys = _fill(store, 60)
    seen = []
    with pytest.raises(StoreError, match="r/0010.json"):
        for k, _ in store.get_many(keys, 8):
            seen.append(k)
    assert seen == keys[:10]                      # everything before the failed key, in order
    assert store.running == 0 and store.calls < 60  # the rest was dropped, not read


def test_stopping_early_reads_at_most_a_window_more(tmp_path):
    store = SlowStore(tmp_path)
    keys = _fill(store, 200)
    gen = store.get_many(keys, 8)
    first = [next(gen) for _ in range(3)]
    gen.close()
    assert [k for k, _ in first] == keys[:3]
    assert store.running == 0 and store.calls <= 3 + 8 + 1


def test_local_store_caps_threads(tmp_path):
    store = LocalStore(tmp_path)
    keys = _fill(store, 10)
    assert list(store.get_many(keys, 64)) == [(k, store.get_or_none(k)) for k in keys]


def test_get_json_many_reads_damaged_as_absent(tmp_path):
    store = LocalStore(tmp_path)
    layout.put_json(store, "j/a.json", {"x": 1})
    store.put("j/b.json", b"{not json")
    assert list(layout.get_json_many(store, ["j/a.json", "j/b.json", "j/none.json"])) == \
        [("j/a.json", {"x": 1}), ("j/b.json", None), ("j/none.json", None)]


def test_s3_get_many(s3_store):
    """On SeaweedFS: the same bytes as one GET after another, a missing key as None."""
    payloads = {f"g/{i}.json": bytes([i % 251]) * (500 + i) for i in range(48)}
    with s3_store.writer(16) as w:
        for k, v in payloads.items():
            w.put(k, v)
    keys = list(payloads) + ["g/missing.json"]
    assert list(s3_store.get_many(keys, 16)) == [(k, payloads.get(k)) for k in keys]
