"""LocalStore and symbolic links (issue #17 item 2): an atlas may hold links, but nothing outside the
store's root is read through them, whatever they point at; links that stay inside still work."""
from __future__ import annotations

import os

import pytest

from deepvis.storage.store import LinkOutsideStore, LocalStore


@pytest.fixture
def linked(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the store")
    store = LocalStore(tmp_path / "atlas")
    store.put("units/a/0/top-0.jpg", b"inside")
    root = tmp_path / "atlas"
    os.symlink(outside / "secret.txt", root / "units/a/0/top-1.jpg")           # a file link out
    os.symlink(outside, root / "units/b")                                       # a folder link out
    os.symlink("../../../../outside/secret.txt", root / "units/a/0/rel.jpg")    # relative, out
    os.symlink("top-0.jpg", root / "units/a/0/same.jpg")                        # inside: fine
    return store


@pytest.mark.parametrize("key", ["units/a/0/top-1.jpg", "units/b/secret.txt", "units/a/0/rel.jpg"])
def test_links_out_of_the_store_are_refused(linked, key):
    with pytest.raises(LinkOutsideStore) as e:
        linked.get(key)
    assert key in str(e.value) and "outside" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LinkOutsideStore):
        linked.open(key)
    assert linked.exists(key) is False          # not even whether the target exists leaks


def test_links_inside_the_store_and_plain_objects_work(linked):
    assert linked.get("units/a/0/same.jpg") == b"inside"
    assert linked.exists("units/a/0/same.jpg")
    with linked.open("units/a/0/top-0.jpg") as f:
        assert f.read() == b"inside"
    with pytest.raises(KeyError):
        linked.get("units/a/0/missing.jpg")
