"""The Store contract, on both backends (local directory and S3), plus LocalStore specifics."""
from __future__ import annotations

import io
import os
import pickle
import threading
import uuid

import pytest

from deepvis.storage.errors import StoreError
from deepvis.storage.base import content_type
from deepvis.storage.store import LocalStore, Store, open_store

KEYS = ["manifest.json", "index/topk.parquet", "index/units.parquet",
        "units/features.3/0/top-0.jpg", "units/features.3/0/yosinski-3.png",
        "units/features.3/12/bottom-1.jpg", "units/features.30/0/top-0.jpg",
        "units/classifier.1/999/top-4.jpg", "viewer/index.html"]
BAD_KEYS = ["", "/etc/passwd", "../outside", "a/../../outside", "units/../../x", "a//b", "./a", "a/./b",
            "a/", ".."]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "atlas")
    s3 = request.getfixturevalue("s3_env")
    from deepvis.storage.s3 import S3Store
    return S3Store(s3.bucket, f"contract/{uuid.uuid4().hex[:12]}", endpoint_url=s3.endpoint_url)


# -- contract: both backends --------------------------------------------------------------------------
def test_round_trip_and_overwrite(store):
    for k in KEYS:
        store.put(k, k.encode() * 3)
    for k in KEYS:
        assert store.exists(k)
        assert store.get(k) == k.encode() * 3
    store.put("manifest.json", b"{}")
    assert store.get("manifest.json") == b"{}"
    store.put("index/empty.parquet", b"")
    assert store.get("index/empty.parquet") == b""
    assert store.get_or_none("nope.json") is None


def test_missing_keys(store):
    assert not store.exists("units/x/0/top-0.jpg")
    with pytest.raises(KeyError) as ei:
        store.get("units/x/0/top-0.jpg")
    assert ei.value.args == ("units/x/0/top-0.jpg",)
    with pytest.raises(KeyError):
        store.open("units/x/0/top-0.jpg")
    store.delete("units/x/0/top-0.jpg")  # no error
    # a "directory" is not a key
    store.put("units/a/0/top-0.jpg", b"x")
    assert not store.exists("units/a/0")
    with pytest.raises(KeyError):
        store.get("units/a")


def test_list_with_prefixes(store):
    for k in KEYS:
        store.put(k, b"x")
    assert store.list() == sorted(KEYS)
    assert store.list("index/") == ["index/topk.parquet", "index/units.parquet"]
    assert store.list("units/features.3/") == ["units/features.3/0/top-0.jpg",
                                              "units/features.3/0/yosinski-3.png",
                                              "units/features.3/12/bottom-1.jpg"]
    assert store.list("units/features.3/0/top") == ["units/features.3/0/top-0.jpg"]
    assert store.list("index") == ["index/topk.parquet", "index/units.parquet"]
    assert store.list("nothing/") == []
    assert store.list("zzz") == []
    store.delete("index/topk.parquet")
    assert store.list("index/") == ["index/units.parquet"]


def test_list_prefix_ending_mid_name_is_a_string_prefix(store):
    for k in KEYS:
        store.put(k, b"x")
    got = store.list("units/features.3")
    expected = sorted(k for k in KEYS if k.startswith("units/features.3"))
    assert any(k.startswith("units/features.30/") for k in expected)
    assert got == expected


def test_list_prefix_cannot_escape(store, tmp_path):
    store.put("manifest.json", b"{}")
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    with pytest.raises(ValueError):
        store.list("../")


def test_keys_with_dots_verbatim(store):
    key = "units/features.3/0/top-0.jpg"
    store.put(key, b"\xff\xd8jpeg")
    assert store.get(key) == b"\xff\xd8jpeg"
    assert store.list("units/") == [key]
    assert store.exists("units/features.3/0/top-0.jpg")
    assert not store.exists("units/features/3/0/top-0.jpg")


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_path_traversal_and_bad_keys_rejected(store, bad):
    with pytest.raises(ValueError):
        store.put(bad, b"x")
    with pytest.raises(ValueError):
        store.get(bad)
    with pytest.raises(ValueError):
        store.exists(bad)
    with pytest.raises(ValueError):
        store.delete(bad)


def test_open_is_seekable(store):
    data = os.urandom(300_000)
    store.put("index/blob.parquet", data)
    with store.open("index/blob.parquet") as f:
        assert f.seekable()
        f.seek(0, io.SEEK_END)
        assert f.tell() == len(data)
        f.seek(123_456)
        assert f.read(1000) == data[123_456:124_456]
        f.seek(-10, io.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(0)
        assert f.read() == data


def test_parallel_puts_of_different_keys(store):
    def work(i):
        store.put(f"units/l.{i % 3}/{i}/top-0.jpg", str(i).encode())
    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list("units/")) == 24
    assert store.get("units/l.2/11/top-0.jpg") == b"11"


def test_store_pickles(store):
    store.put("manifest.json", b"{}")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.uri == store.uri
    assert copy.get("manifest.json") == b"{}"


# -- LocalStore specifics -----------------------------------------------------------------------------
def test_local_put_is_atomic(tmp_path, monkeypatch):
    st = LocalStore(tmp_path)
    st.put("index/topk.parquet", b"old")

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        st.put("index/topk.parquet", b"new-but-failed")
    monkeypatch.undo()
    # the old object is intact and no temp file is left behind
    assert st.get("index/topk.parquet") == b"old"
    assert sorted(os.listdir(tmp_path / "index")) == ["topk.parquet"]


def test_local_readers_never_see_partial_objects(tmp_path):
    st = LocalStore(tmp_path)
    a, b = b"a" * 2_000_000, b"b" * 2_000_000
    st.put("big.bin", a)
    stop = threading.Event()
    seen = set()

    def reader():
        while not stop.is_set():
            seen.add(st.get("big.bin"))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(20):
        st.put("big.bin", b if i % 2 == 0 else a)
    stop.set()
    t.join()
    assert seen <= {a, b}


def test_local_temp_files_not_listed(tmp_path):
    st = LocalStore(tmp_path)
    st.put("index/units.parquet", b"x")
    (tmp_path / "index" / ".tmp-abc.parquet").write_bytes(b"partial")
    assert st.list() == ["index/units.parquet"]


def test_local_traversal_cannot_escape(tmp_path):
    root = tmp_path / "atlas"
    st = LocalStore(root)
    for bad in BAD_KEYS:
        with pytest.raises(ValueError):
            st.put(bad, b"x")
    assert not (tmp_path / "outside").exists()
    assert list(root.iterdir()) == []


def test_local_paths_and_uri(tmp_path):
    st = LocalStore(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert st.uri == str((tmp_path / "a" / "b").resolve())
    st.put("units/features.3/0/top-0.jpg", b"x")
    assert st.local_path("units/features.3/0/top-0.jpg") == str(tmp_path / "a" / "b" / "units" / "features.3" / "0" / "top-0.jpg")


def test_local_store_on_a_file_is_an_error(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(StoreError) as ei:
        LocalStore(f)
    assert "not a directory" in str(ei.value)


def test_open_store_addresses(tmp_path):
    assert isinstance(open_store(str(tmp_path / "x")), LocalStore)
    st = open_store(f"file://{tmp_path / 'y'}")
    assert isinstance(st, LocalStore) and st.root == (tmp_path / "y").resolve()
    for bad in ["", "   ", "gs://bucket/x", "http://host/x"]:
        with pytest.raises(StoreError) as ei:
            open_store(bad)
        assert "\n" not in str(ei.value)


def test_content_types():
    assert content_type("manifest.json") == "application/json"
    assert content_type("index/topk.parquet") == "application/vnd.apache.parquet"
    assert content_type("units/features.3/0/yosinski-3.png") == "image/png"
    assert content_type("units/features.3/0/top-0.jpg") == "image/jpeg"
    assert content_type("viewer/index.html") == "text/html"
    assert content_type("viewer/app.JS") == "text/javascript"
    assert content_type("units/features.3") == "application/octet-stream"


def test_local_objects_readable_by_others(tmp_path):
    """Objects get the umask's permissions (not mkstemp's 0600): a static web server can serve them."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        store = LocalStore(tmp_path)
        store.put("viewer/index.html", b"<html>")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "viewer/index.html").st_mode)
    assert mode == 0o644
