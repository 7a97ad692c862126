"""S3Store against a real S3 server (SeaweedFS weed mini, see conftest.py)."""
from __future__ import annotations

import http.client
import io
import multiprocessing
import os
import pickle
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepvis.storage.errors import StoreError
from deepvis.storage.s3 import S3ReadFile, S3Store, parse_s3_uri
from deepvis.storage.base import content_type
from deepvis.storage.store import open_store
from tests.s3server import free_ports


def _one_line_no_traceback(e: StoreError, *secrets: str):
    msg = str(e)
    assert "\n" not in msg and msg
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)  # no chained traceback
    for s in secrets:
        assert s not in msg


# -- round trips ------------------------------------------------------------------------------------
def test_round_trip(s3_store):
    st = s3_store
    assert st.uri.startswith(f"s3://{st.bucket}/t/") and "@" not in st.uri
    assert not st.exists("a.json")
    st.put("a.json", b'{"x": 1}')
    assert st.exists("a.json")
    assert st.get("a.json") == b'{"x": 1}'
    st.put("a.json", b'{"x": 2}')  # overwrite
    assert st.get("a.json") == b'{"x": 2}'
    st.put("empty.txt", b"")
    assert st.get("empty.txt") == b""
    st.delete("a.json")
    assert not st.exists("a.json")
    st.delete("a.json")  # idempotent
    with pytest.raises(KeyError):
        st.get("a.json")
    with pytest.raises(KeyError):
        st.open("a.json")
    assert st.get_or_none("a.json") is None
    assert st.local_path("empty.txt") is None


def test_list_keys_relative_sorted_paginated(s3_store):
    st = s3_store
    keys = ["manifest.json", "index/topk.parquet", "units/features.3/0/top-0.jpg",
            "units/features.3/0/yosinski-3.png", "units/features.30/1/top-0.jpg", "units/fc/10/bottom-2.jpg"]
    keys += [f"many/{i:04d}.png" for i in range(1050)]  # more than one page (1000 per page)
    with ThreadPoolExecutor(8) as pool:  # the client is thread-safe
        list(pool.map(lambda k: st.put(k, k.encode()), keys))
    assert st.list() == sorted(keys)
    assert st.list("units/features.3/") == ["units/features.3/0/top-0.jpg", "units/features.3/0/yosinski-3.png"]
    # a prefix may end mid-name (as LocalStore)
    assert st.list("units/features.3") == sorted(k for k in keys if k.startswith("units/features.3"))
    assert st.list("nothing/") == []
    assert len(st.list("many/")) == 1050
    assert st.get("units/features.3/0/top-0.jpg") == b"units/features.3/0/top-0.jpg"


def test_prefixes_are_separate(s3_env):
    base = f"sep-{uuid.uuid4().hex[:8]}"
    a = S3Store(s3_env.bucket, base + "/p1", endpoint_url=s3_env.endpoint_url)
    b = S3Store(s3_env.bucket, base + "/p1x", endpoint_url=s3_env.endpoint_url)
    root = S3Store.from_uri(f"s3://{s3_env.bucket}/", endpoint_url=s3_env.endpoint_url)
    a.put("k.txt", b"a")
    b.put("k.txt", b"b")
    assert a.list() == ["k.txt"] and b.list() == ["k.txt"]
    assert a.get("k.txt") == b"a" and b.get("k.txt") == b"b"
    assert root.uri == f"s3://{s3_env.bucket}"
    assert root.get(f"{base}/p1/k.txt") == b"a"
    assert root.list(base + "/") == [f"{base}/p1/k.txt", f"{base}/p1x/k.txt"]


def test_invalid_keys_rejected(s3_store):
    for bad in ["", "/abs", "../x", "a/../b", "a//b", "./a", "a/"]:
        with pytest.raises(ValueError):
            s3_store.put(bad, b"x")
        with pytest.raises(ValueError):
            s3_store.get(bad)


def test_content_types(s3_store, s3_server):
    c = s3_server.client()
    for key in ["manifest.json", "index/topk.parquet", "units/features.3/0/yosinski-3.png",
                "units/features.3/0/top-0.jpg", "viewer/index.html", "viewer/app.js", "viewer/app.css",
                "viewer/icon.svg", "notes.txt", "blob.bin", "noext"]:
        s3_store.put(key, b"x")
        head = c.head_object(Bucket=s3_store.bucket, Key=f"{s3_store.prefix}/{key}")
        assert head["ContentType"] == content_type(key), key
    assert content_type("a.png") == "image/png" and content_type("a.jpg") == "image/jpeg"


def test_open_seek_read_ranges(s3_store):
    data = bytes(range(256)) * 1000  # 256000 bytes
    s3_store.put("blob.bin", data)
    with s3_store.open("blob.bin") as f:
        assert isinstance(f, S3ReadFile) and f.seekable() and f.readable()
        assert f.size == len(data)
        assert f.read(10) == data[:10]
        assert f.tell() == 10
        assert f.seek(1000) == 1000
        assert f.read(5) == data[1000:1005]
        f.seek(-3, io.SEEK_END)
        assert f.read() == data[-3:]
        assert f.read() == b""  # at EOF
        f.seek(10, io.SEEK_CUR)  # past the end
        assert f.read(4) == b""
        f.seek(100_000)
        big = f.read(150_000)
        assert big == data[100_000:250_000]
        buf = bytearray(7)
        f.seek(5)
        assert f.readinto(buf) == 7 and bytes(buf) == data[5:12]
        f.seek(0)
        assert f.read() == data
        with pytest.raises(ValueError):
            f.seek(-1)
        n = f.requests
        f.seek(200)
        f.read(3)  # inside the block just read? no: a big read is not kept; one more GET at most
        assert f.requests <= n + 1
    # small reads are served from one fetched block
    with s3_store.open("blob.bin") as f:
        for i in range(100):
            assert f.read(10) == data[i * 10:(i + 1) * 10]
        assert f.requests == 1
    # works under the standard buffered reader too
    with io.BufferedReader(s3_store.open("blob.bin"), buffer_size=4096) as f:
        f.seek(70_000)
        assert f.read(100) == data[70_000:70_100]


def test_parquet_reads_only_needed_row_group(s3_store):
    rng = np.random.default_rng(0)
    n_groups, rows = 8, 20_000
    table = pa.table({"layer": pa.array(["features.3"] * (n_groups * rows)),
                      "unit": pa.array(np.arange(n_groups * rows, dtype=np.int32)),
                      "activation": pa.array(rng.standard_normal(n_groups * rows).astype(np.float32)),
                      "x": pa.array(rng.integers(0, 1 << 30, n_groups * rows).astype(np.int64))})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=rows)
    s3_store.put("index/topk.parquet", sink.getvalue())
    size = len(sink.getvalue())

    f = s3_store.open("index/topk.parquet")
    pf = pq.ParquetFile(f)
    assert pf.metadata.num_row_groups == n_groups
    rg = pf.read_row_group(5, columns=["unit", "activation"])
    assert rg.column("unit").to_pylist() == list(range(5 * rows, 6 * rows))
    assert rg.column("activation").equals(table.column("activation").slice(5 * rows, rows))
    # footer + two column chunks of one row group: a small part of the file, in a few GETs
    assert f.bytes_fetched < size / 4, (f.bytes_fetched, size)
    assert f.requests <= 5
    # and a whole-file read still works
    assert pq.read_table(s3_store.open("index/topk.parquet")).equals(table)


def test_large_object_multipart(s3_env):
    st = S3Store(s3_env.bucket, f"big-{uuid.uuid4().hex[:8]}", endpoint_url=s3_env.endpoint_url,
                 multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    data = os.urandom(20 * 1024 * 1024 + 123)
    st.put("index/big.parquet", data)
    head = s3_env.client().head_object(Bucket=st.bucket, Key=f"{st.prefix}/index/big.parquet")
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "application/vnd.apache.parquet"
    assert head["ETag"].strip('"').endswith("-5")  # a multipart upload of 5 parts
    assert st.get("index/big.parquet") == data
    with st.open("index/big.parquet") as f:
        f.seek(17 * 1024 * 1024)
        assert f.read(1000) == data[17 * 1024 * 1024:17 * 1024 * 1024 + 1000]


# -- the default chain, open_store, pickling ---------------------------------------------------------
def test_open_store_with_env_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)  # read by boto3 itself
    st = open_store(f"s3://{s3_env.bucket}/os-{uuid.uuid4().hex[:8]}/")
    assert isinstance(st, S3Store)
    assert st.endpoint_url == s3_env.endpoint_url
    st.put("units/features.3/0/top-0.jpg", b"jpg")
    assert st.list() == ["units/features.3/0/top-0.jpg"]
    assert s3_env.secret_key not in repr(st) and s3_env.access_key not in repr(st)
    assert not st.uri.endswith("/")


def test_credentials_from_a_profile(s3_server, monkeypatch, tmp_path):
    """The standard chain: a named profile in a shared credentials file, endpoint from the env."""
    creds = tmp_path / "credentials"
    creds.write_text(f"[atlas]\naws_access_key_id = {s3_server.access_key}\n"
                     f"aws_secret_access_key = {s3_server.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "atlas")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    st = open_store(f"s3://{s3_server.bucket}/profile-{uuid.uuid4().hex[:8]}")
    st.put("a.json", bytearray(b"{}"))
    assert st.get("a.json") == b"{}"


def _child_roundtrip(blob: bytes) -> bytes:
    st = pickle.loads(blob)
    st.put("from-child.txt", b"child")
    return st.get("parent.txt")


def test_pickles_without_client_or_secrets(s3_store, s3_env):
    s3_store.put("parent.txt", b"parent")
    _ = s3_store.client  # a client exists in this process
    blob = pickle.dumps(s3_store)
    assert s3_env.secret_key.encode() not in blob and s3_env.access_key.encode() not in blob
    copy = pickle.loads(blob)
    assert copy.uri == s3_store.uri and copy._client is None
    assert copy.get("parent.txt") == b"parent"
    # a fresh process (as a Ray actor): its own client from its own credential chain (the env here)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        assert pool.apply(_child_roundtrip, (blob,)) == b"parent"
    assert s3_store.get("from-child.txt") == b"child"


# -- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "s3://Bad_Bucket!/x", "s3://ab/x", "s3://bucket/a/../b",
                                 "s3://bucket//x", "s3://127.0.0.1:9000/bucket", "s3://b" + "x" * 70,
                                 "s3://bucket/x?versionId=1", "s3://-bucket/x"])
def test_malformed_uris(uri):
    with pytest.raises(StoreError) as ei:
        S3Store.from_uri(uri)
    _one_line_no_traceback(ei.value)
    with pytest.raises(StoreError):
        open_store(uri)


def test_credentials_in_uri_never_echoed():
    with pytest.raises(StoreError) as ei:
        open_store("s3://AKIAEXAMPLE:s3cr3tValue@bucket/x")
    _one_line_no_traceback(ei.value, "s3cr3tValue", "AKIAEXAMPLE")
    assert "credentials" in str(ei.value)


def test_parse_uri():
    assert parse_s3_uri("s3://my-bucket") == ("my-bucket", "")
    assert parse_s3_uri("s3://my-bucket/") == ("my-bucket", "")
    assert parse_s3_uri("s3://my.bucket/a/b/") == ("my.bucket", "a/b")


def test_wrong_secret_key(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    t = time.monotonic()
    with pytest.raises(StoreError) as ei:
        S3Store(s3_server.bucket, "x", endpoint_url=s3_server.endpoint_url)
    assert time.monotonic() - t < 5
    _one_line_no_traceback(ei.value, "definitely-wrong-secret")
    assert "credentials" in str(ei.value)


def test_unknown_access_key(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTKNOWNHERE0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "some-secret-value")
    with pytest.raises(StoreError) as ei:
        S3Store(s3_server.bucket, "", endpoint_url=s3_server.endpoint_url)
    _one_line_no_traceback(ei.value, "some-secret-value")
    assert "credentials" in str(ei.value)


def test_no_credentials(s3_server):
    t = time.monotonic()
    with pytest.raises(StoreError) as ei:
        S3Store(s3_server.bucket, "", endpoint_url=s3_server.endpoint_url)
    assert time.monotonic() - t < 5
    _one_line_no_traceback(ei.value)
    assert "no AWS credentials" in str(ei.value) and "AWS_ACCESS_KEY_ID" in str(ei.value)


def test_missing_bucket(s3_env):
    t = time.monotonic()
    with pytest.raises(StoreError) as ei:
        S3Store.from_uri("s3://no-such-bucket-here/atlas", endpoint_url=s3_env.endpoint_url)
    assert time.monotonic() - t < 5
    _one_line_no_traceback(ei.value, s3_env.secret_key)
    assert "no-such-bucket-here" in str(ei.value) and "does not exist" in str(ei.value)
    # without the construction check: the first write says the same
    st = S3Store.from_uri("s3://no-such-bucket-here/atlas", endpoint_url=s3_env.endpoint_url, check=False)
    with pytest.raises(StoreError) as ei:
        st.put("a.json", b"{}")
    assert "no-such-bucket-here" in str(ei.value) and "does not exist" in str(ei.value)


def test_unreachable_endpoint_fails_fast(s3_env):
    (port,) = free_ports(1)  # nothing listens there
    t = time.monotonic()
    with pytest.raises(StoreError) as ei:
        S3Store(s3_env.bucket, "x", endpoint_url=f"http://127.0.0.1:{port}")
    elapsed = time.monotonic() - t
    assert elapsed < 5, elapsed
    _one_line_no_traceback(ei.value, s3_env.secret_key)
    assert "cannot reach" in str(ei.value) and f"127.0.0.1:{port}" in str(ei.value)


def test_hung_endpoint_fails_within_seconds(s3_env):
    """A server that accepts connections but never answers: the construction check times out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)  # never accept(): the kernel completes the handshake, nobody answers
    try:
        t = time.monotonic()
        with pytest.raises(StoreError) as ei:
            S3Store(s3_env.bucket, "x", endpoint_url=f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert time.monotonic() - t < 6
        _one_line_no_traceback(ei.value)
    finally:
        srv.close()


def test_invalid_endpoint_url(s3_env):
    with pytest.raises(StoreError) as ei:
        S3Store(s3_env.bucket, "x", endpoint_url="not a url")
    _one_line_no_traceback(ei.value)


def test_server_stopped_then_restarted(own_s3_server, monkeypatch):
    srv = own_s3_server
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    st = S3Store.from_uri(f"s3://{srv.bucket}/run", max_attempts=3)
    assert st.endpoint_url == srv.endpoint_url
    st.put("before.json", b"1")
    srv.stop()
    t = time.monotonic()
    with pytest.raises(StoreError) as ei:
        st.put("during.json", b"2")
    assert time.monotonic() - t < 5
    _one_line_no_traceback(ei.value, srv.secret_key)
    assert "cannot reach" in str(ei.value) and srv.endpoint_url in str(ei.value)
    with pytest.raises(StoreError):
        st.get("before.json")
    with pytest.raises(StoreError):
        st.list()
    srv.start()
    st.put("after.json", b"3")  # the same store object works again
    assert st.get("before.json") == b"1"
    assert st.list() == ["after.json", "before.json"]


# -- retries on throttling / 5xx, through a fault-injecting proxy ------------------------------------
class _ProxyHandler(BaseHTTPRequestHandler):
    """FaultProxy's request handler (a subclass per proxy sets `proxy`)."""
    protocol_version = "HTTP/1.1"
    proxy: "FaultProxy"

    def log_message(self, *a):
        pass

    def handle_one(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.proxy.take(self.command, self.path):
            self._fail()
        else:
            self._forward(body)

    def _fail(self):
        p = self.proxy
        payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{p.code}</Code>'
                   f'<Message>injected</Message></Error>').encode()
        self.send_response(p.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, body: bytes):
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.upstream_port, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() in ("transfer-encoding", "connection"):
                continue
            if k.lower() == "content-length" and self.command != "HEAD":
                continue
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one


class FaultProxy:
    """HTTP proxy in front of the S3 server: answers the next `fail_next` requests with an error
    (503 SlowDown by default), forwards the rest unchanged (Host included, so signatures hold)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.fail_next, self.status, self.code = 0, 503, "SlowDown"
        self.failed = 0
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def take(self, command: str, path: str) -> bool:
        """Record a request; True when it is to be failed."""
        with self.lock:
            self.requests.append((command, path))
            fail = self.fail_next > 0
            if fail:
                self.fail_next -= 1
                self.failed += 1
        return fail

    def inject(self, n: int, status: int = 503, code: str = "SlowDown"):
        with self.lock:
            self.fail_next, self.status, self.code, self.failed = n, status, code, 0
            self.requests.clear()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fault_proxy(s3_server):
    p = FaultProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    yield p
    p.close()


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError")])
def test_throttling_and_5xx_are_retried(s3_env, fault_proxy, status, code):
    st = S3Store(s3_env.bucket, f"retry-{uuid.uuid4().hex[:8]}", endpoint_url=fault_proxy.url, max_attempts=4)
    fault_proxy.inject(2, status, code)
    st.put("units/features.3/0/top-0.jpg", b"jpeg")
    assert fault_proxy.failed == 2
    assert len(fault_proxy.requests) == 3 and all(m == "PUT" for m, _ in fault_proxy.requests)
    fault_proxy.inject(1, status, code)
    assert st.get("units/features.3/0/top-0.jpg") == b"jpeg"
    assert fault_proxy.failed == 1 and len(fault_proxy.requests) == 2
    fault_proxy.inject(1, status, code)
    assert st.list() == ["units/features.3/0/top-0.jpg"]
    assert fault_proxy.failed == 1


def test_persistent_throttling_gives_store_error(s3_env, fault_proxy):
    st = S3Store(s3_env.bucket, "slow", endpoint_url=fault_proxy.url, max_attempts=2)
    fault_proxy.inject(100)
    with pytest.raises(StoreError) as ei:
        st.put("a.json", b"{}")
    assert fault_proxy.failed == 2
    _one_line_no_traceback(ei.value, s3_env.secret_key)
    assert "SlowDown" in str(ei.value)


def test_list_many_lists_prefixes_side_by_side(s3_store, tmp_path):
    """list_many: the keys under any of the prefixes, each once, sorted, on SeaweedFS (many pages,
    prefixes that overlap or match nothing) and on a local store (one walk), the same answer."""
    from deepvis.storage.store import LocalStore
    local = LocalStore(tmp_path)
    names = [f"in/{h}{i:03d}.jpg" for h in "0123456789abcdef" for i in range(70)] + \
            ["in/zz.txt", "in/a/b.jpg", "other/0.jpg", "in0.jpg"]
    with s3_store.writer(16) as w:
        for k in names:
            w.put(k, b"x")
            local.put(k, b"x")
    hexes = [f"in/{h}" for h in "0123456789abcdef"]
    want = sorted(k for k in names if k.startswith("in/") and k != "in/zz.txt")
    for store in (s3_store, local):
        assert store.list_many(hexes) == want
        assert store.list_many(hexes + ["in/a", "in/a/"]) == want          # overlaps counted once
        assert store.list_many(["in/q", "nothing/"]) == [] and store.list_many([]) == []
        assert store.list_many(["in/"]) == store.list("in/") == sorted(k for k in names if k.startswith("in/"))


def test_s3_dataset_listing_opens_folders(s3_store):
    """An S3 dataset is listed by folder (list_level, a second level when the root has few
    folders): the same image ids as one plain listing, and a flat prefix listed whole."""
    from deepvis.storage import datasets
    from deepvis.storage.s3 import S3Store
    keys = [f"train/n{c:02d}/img_{i}.JPEG" for c in range(20) for i in range(3)] + \
           [f"val/n{c:02d}/v_{i}.JPEG" for c in range(2) for i in range(2)] + \
           ["top.jpg", "notes.txt", "train/loose.jpg"]
    with s3_store.writer(16) as w:
        for k in keys:
            w.put(f"ds/{k}", b"x")
    ds = S3Store(s3_store.bucket, f"{s3_store.prefix}/ds", endpoint_url=s3_store.endpoint_url)
    assert ds.list_level("") == (["notes.txt", "top.jpg"], ["train/", "val/"])
    assert len(ds.list_level("train/")[1]) == 20
    assert datasets._s3_keys(ds) == ds.list("") == sorted(keys)
    assert datasets._s3_keys(ds, depth=1) == datasets._s3_keys(ds, want=2) == sorted(keys)
    flat = S3Store(s3_store.bucket, f"{s3_store.prefix}/ds/train/n00", endpoint_url=s3_store.endpoint_url)
    assert datasets._s3_keys(flat) == [f"img_{i}.JPEG" for i in range(3)]


def test_s3_dataset_listing_chooses_by_folder_size(s3_store, monkeypatch):
    """Folders are listed side by side only when the first ones hold a page's share each (1000/16
    keys); tiny folders are listed in one plain listing (fewer requests). Both give every key."""
    from deepvis.storage import datasets
    from deepvis.storage.s3 import S3Store
    keys = [f"n{c:02d}/img_{i}.JPEG" for c in range(20) for i in range(3)]
    with s3_store.writer(16) as w:
        for k in keys:
            w.put(f"dz/{k}", b"x")
    ds = S3Store(s3_store.bucket, f"{s3_store.prefix}/dz", endpoint_url=s3_store.endpoint_url)
    calls = []
    real_many, real_list = S3Store.list_many, S3Store.list
    monkeypatch.setattr(S3Store, "list_many", lambda self, p, **kw: calls.append(("many", len(p))) or real_many(self, p, **kw))
    monkeypatch.setattr(S3Store, "list", lambda self, p="": calls.append(("list", p)) or real_list(self, p))
    assert datasets._s3_keys(ds, want=4) == sorted(keys)
    assert calls == [("many", 4), ("list", "")]          # 3 keys a folder < 1000 / 4: one plain listing
    calls.clear()
    monkeypatch.setattr(datasets, "LIST_PAGE", 8)          # 3 keys a folder >= 8 / 4: side by side
    assert datasets._s3_keys(ds, want=4) == sorted(keys)
    assert calls == [("many", 4), ("many", 16)]


def test_s3_list_many_overlaps_its_listings(s3_store):
    """The prefixes' LISTs run side by side (counted on a real S3Store whose listings are slowed)."""
    import threading
    import time
    from deepvis.storage.s3 import S3Store

    class Counting(S3Store):
        running = peak = 0
        lock = threading.Lock()

        def _list(self, prefix, delimiter=None):
            with self.lock:
                Counting.running += 1
                Counting.peak = max(Counting.peak, Counting.running)
            try:
                time.sleep(0.05)
                return super()._list(prefix, delimiter)
            finally:
                with self.lock:
                    Counting.running -= 1
    s3_store.put("c/a1", b"x")
    s3_store.put("c/b1", b"x")
    store = Counting(s3_store.bucket, s3_store.prefix, endpoint_url=s3_store.endpoint_url)
    assert store.list_many([f"c/{h}" for h in "0123456789abcdef"]) == ["c/a1", "c/b1"]
    assert 1 < Counting.peak <= 16
