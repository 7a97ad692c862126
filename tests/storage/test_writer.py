"""Store.writer: bounded concurrent puts, every object there when the block ends, errors re-raised
(and a shard's completion record never written after a failed put)."""
from __future__ import annotations

import threading
import time

import pytest

from deepvis.storage.base import Writer
from deepvis.storage.errors import StoreError
from deepvis.storage.store import LocalStore


class CountingStore(LocalStore):
    """A real local store that records how many puts run at once, and fails the keys it is told to."""

    def __init__(self, root, fail: set[str] = frozenset(), delay: float = 0.01):
        super().__init__(root)
        self.fail, self.delay = set(fail), delay
        self.running = self.peak = 0
        self.lock = threading.Lock()

    def put(self, key, data):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.delay)
            if key in self.fail:
                raise StoreError(f"put of {key} failed")
            super().put(key, data)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("inflight", [1, 4, 16])
def test_every_object_written_with_at_most_n_in_flight(tmp_path, inflight):
    store = CountingStore(tmp_path)
    with Writer(store, inflight) as w:
        for i in range(40):
            w.put(f"a/{i}.bin", bytes([i]) * 100)
    assert sorted(store.list("a/")) == sorted(f"a/{i}.bin" for i in range(40))
    assert all(store.get(f"a/{i}.bin") == bytes([i]) * 100 for i in range(40))
    assert w.written == 40
    assert store.peak <= inflight
    if inflight > 1:
        assert store.peak > 1, "the puts never overlapped"


def test_failed_put_is_reraised_at_the_end_of_the_block(tmp_path):
    store = CountingStore(tmp_path, fail={"a/3.bin"})
    with pytest.raises(StoreError, match="a/3.bin"):
        with Writer(store, 4) as w:
            for i in range(6):
                w.put(f"a/{i}.bin", b"x")
    assert store.running == 0   # nothing still uploading after the block


def test_error_inside_the_block_wins_and_uploads_finish(tmp_path):
    store = CountingStore(tmp_path, delay=0.05)
    with pytest.raises(RuntimeError, match="compute failed"):
        with Writer(store, 4) as w:
            w.put("a/0.bin", b"x")
            raise RuntimeError("compute failed")
    assert store.running == 0 and store.exists("a/0.bin")


def test_local_store_caps_threads(tmp_path):
    assert LocalStore(tmp_path).writer(64).max_inflight == 4
    assert LocalStore(tmp_path).writer(1).max_inflight == 1


def test_worker_writes_no_record_when_a_put_fails(tmp_path, lite0):
    """ShardWorker.run: a shard whose object upload fails raises and leaves no completion record;
    the same shard on a working store leaves its objects and then its record."""
    from deepvis.cluster.worker import ShardWorker
    from deepvis.storage import layout

    shard = {"type": "opt", "id": "opt/_fc/0-1", "hash": "h", "layer": "_fc", "units": [0, 1],
             "presets": ["yosinski-3"], "steps": 2, "size": 32}
    bad = CountingStore(tmp_path / "bad", fail={layout.unit_key("_fc", 1, layout.preset_image("yosinski-3", 0))})
    w = ShardWorker("efficientnet_lite0", None, bad, "cpu", 1)
    with pytest.raises(StoreError):
        w.run(shard)
    assert not bad.exists(layout.record_key(shard["id"]))
    good = CountingStore(tmp_path / "good")
    w.store = good
    w.run(shard)
    rec = layout.get_json(good, layout.record_key(shard["id"]))
    assert rec["hash"] == "h" and rec["pid"] > 0
    assert all(good.exists(layout.unit_key("_fc", u, "yosinski-3.png")) for u in (0, 1))


def test_s3_writer_concurrent_puts(s3_store):
    """The S3 store's uploads share one thread-safe client; every object arrives intact."""
    payloads = {f"w/{i}.jpg": bytes([i % 251]) * (1000 + i) for i in range(64)}
    with s3_store.writer(16) as w:
        for k, v in payloads.items():
            w.put(k, v)
    assert sorted(s3_store.list("w/")) == sorted(payloads)
    assert all(s3_store.get(k) == v for k, v in payloads.items())


@pytest.mark.parametrize("inflight", [1, 4])
def test_a_callable_is_encoded_in_the_upload_thread(tmp_path, inflight):
    """put(key, callable): the bytes are made where the upload runs (an upload thread when more than
    one is in flight, so an actor's compute goes on), stored as given; an encoder's error is the
    block's error, as a failed upload's."""
    store, where = CountingStore(tmp_path, delay=0), []

    def encode(i):
        where.append(threading.current_thread().name)
        return bytes([i]) * 10
    with Writer(store, inflight) as w:
        for i in range(8):
            w.put(f"e/{i}.bin", lambda i=i: encode(i))
    assert all(store.get(f"e/{i}.bin") == bytes([i]) * 10 for i in range(8)) and w.written == 8
    caller = threading.current_thread().name
    assert all(n == caller for n in where) if inflight == 1 else all(n.startswith("store-put") for n in where)

    def broken():
        raise ValueError("cannot encode")
    with pytest.raises(ValueError, match="cannot encode"):
        with Writer(store, inflight) as w:
            w.put("e/bad.bin", broken)
            w.put("e/after.bin", b"x")
    assert not store.exists("e/bad.bin")
