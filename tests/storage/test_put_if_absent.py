"""Store.put_if_absent: of writers racing for one key, exactly one wins, on a local directory (hard
link) and on a real S3 server (SeaweedFS, `If-None-Match: *`). The build lease relies on it."""
from __future__ import annotations

import threading

import pytest

from deepvis.storage.store import LocalStore


def race(store, key: str, n: int = 8) -> list[bool]:
    start = threading.Barrier(n)
    results = [None] * n

    def write(i):
        start.wait()
        results[i] = store.put_if_absent(key, f"writer {i}".encode())

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_exactly_one_writer_wins(backend, tmp_path, request):
    store = LocalStore(tmp_path / "atlas") if backend == "local" else request.getfixturevalue("s3_store")
    for attempt in range(3):      # a few rounds: a lucky interleaving must not hide a lost race
        key = f"_build/lease-{attempt}.json"
        results = race(store, key)
        assert results.count(True) == 1, results
        winner = results.index(True)
        assert store.get(key) == f"writer {winner}".encode()    # the winner's bytes, whole
        assert store.put_if_absent(key, b"late") is False and store.get(key) == f"writer {winner}".encode()
    if backend == "local":       # no temp files left behind
        assert sorted(p.name for p in (tmp_path / "atlas" / "_build").iterdir()) == [
            f"lease-{i}.json" for i in range(3)]


def test_s3_put_if_absent_after_delete(s3_store):
    assert s3_store.put_if_absent("k.json", b"1") is True
    s3_store.delete("k.json")
    assert s3_store.put_if_absent("k.json", b"2") is True and s3_store.get("k.json") == b"2"


def test_build_lease_on_s3(s3_store):
    """The build lease on a real S3 server: held, refused to a second build naming the holder, released."""
    from deepvis.cluster.lease import LEASE_KEY, BuildLease, read_lease
    from deepvis.tasks.errors import UserError

    with BuildLease(s3_store) as held:
        assert read_lease(s3_store).token == held.lease.token
        with pytest.raises(UserError, match=rf"another build holds {s3_store.uri}: {held.lease.holder} "):
            BuildLease(s3_store).acquire()
    assert not s3_store.exists(LEASE_KEY)
