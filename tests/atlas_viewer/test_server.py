"""`deepvis serve`: the atlas over HTTP, read-only, nothing outside it reachable."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from deepvis.atlas_viewer.server import parse_path
from tests.atlas_viewer.conftest import MID, ROOT, XSS_FILE, make_synthetic_atlas, send_raw, serve


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    facts = make_synthetic_atlas(base / "atlas", big_units=4)
    (base / "secret.txt").write_text("outside the atlas")
    (facts["dataset"].parent / "atlas-dataset-secret.txt").write_text("outside the dataset")
    from deepvis.atlas_viewer.publish import publish
    publish(facts["store"])
    return facts


@pytest.fixture(scope="module")
def server(atlas):
    s = serve(atlas["store"])
    yield s
    s.stop()


def get(server, path, method="GET"):
    """Send the request target exactly as given (no client-side normalization)."""
    host, port = server.server.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
    c.endheaders()
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, dict(r.getheaders()), body


def test_root_redirects_to_viewer(server):
    for path in ("/", "/viewer", "/viewer/"):
        status, headers, _ = get(server, path)
        assert status == 302 and headers["Location"] == "/viewer/index.html"


@pytest.mark.parametrize("path,ctype", [
    ("/viewer/index.html", "text/html"), ("/viewer/app.js", "text/javascript"), ("/viewer/style.css", "text/css"),
    ("/viewer/data/model.json", "application/json"), ("/manifest.json", "application/json"),
    (f"/units/{MID}/0/yosinski-3.png", "image/png"), (f"/units/{MID}/0/top-0.jpg", "image/jpeg"),
    ("/viewer/data/sprites/conv.1/yosinski-3-0.png?v=123", "image/png"),
    ("/index/topk.parquet", "application/vnd.apache.parquet"),
])
def test_objects_with_content_types(server, atlas, path, ctype):
    status, headers, body = get(server, path)
    assert status == 200 and headers["Content-Type"] == ctype
    key = path.split("?")[0][1:]
    assert body == atlas["store"].get(key)
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Deepvis-Dataset"] == "1"
    status, headers, body = get(server, path, "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(atlas["store"].get(key))


def test_encoded_names_and_missing(server, atlas):
    """Keep: no directory listing (a folder of the atlas is 404, not an index of its files)."""
    layer = "x%3Cimg%20src%3Dx%20onerror%3Dalert(2)%3E"
    status, _, body = get(server, f"/units/{layer}/0/yosinski-3.png")
    assert status == 200 and body[:4] == b"\x89PNG"
    assert get(server, "/units/nope/0/yosinski-3.png")[0] == 404
    assert get(server, f"/units/{MID}/1/yosinski-3.png")[0] == 404      # the deliberately missing image
    assert get(server, "/units")[0] == 404                              # a directory is not an object


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/viewer/../../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt",
    "/viewer/%2e%2e/%2e%2e/secret.txt", "/..%2fsecret.txt", "/%2e%2e%2fsecret.txt", "/viewer/..%5c..%5csecret.txt",
    "//etc/passwd", "/%2fetc%2fpasswd", "/./manifest.json", "/viewer//index.html", "/manifest.json%00.png",
    "http://127.0.0.1/../secret.txt", "/dataset/../secret.txt", "/dataset/%2e%2e/atlas-dataset-secret.txt",
    "/dataset/%2Fetc%2Fpasswd", "/%ff%fe",
])
def test_no_path_traversal(server, path):
    """Keep: key and path traversal is blocked in every form tried (the absolute-form target names
    Host 127.0.0.1 without our port: 421 before the path is even looked at)."""
    status, _, body = get(server, path)
    assert status in (400, 404, 421), (path, status)
    assert b"outside" not in body and b"root:" not in body


def test_parse_path():
    assert parse_path("/a/b.json?x=1#f") == "a/b.json" and parse_path("/") == ""
    assert parse_path("/units/x%3Cy%3E/0/top-0.jpg") == "units/x<y>/0/top-0.jpg"
    for bad in ("/a/../b", "/%2e%2e/b", "a/b", "/a//b", "/a/./b", "/a\\b", "/a%00b", "/a%0ab"):
        assert parse_path(bad) is None, bad


def test_dataset_route_serves_indexed_images_only(server, atlas):
    ds = atlas["dataset"]
    image = f"odd/{XSS_FILE}"
    quoted = "odd/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E.jpg"
    status, headers, body = get(server, f"/dataset/{quoted}")
    assert status == 200 and body == (ds / image).read_bytes()
    assert headers["Content-Type"] == "image/jpeg" and "sandbox" in headers["Content-Security-Policy"]
    (ds / "unindexed.jpg").write_bytes(b"x")
    assert get(server, "/dataset/unindexed.jpg")[0] == 404                # a file the atlas does not link to
    assert get(server, "/dataset/n000/nope.JPEG")[0] == 404


def test_cli_serves_until_stopped(atlas, tmp_path):
    """`deepvis serve DIR --port 0` prints the URL of a free port and serves there (Keep: on 127.0.0.1)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "deepvis.cli", "serve", str(atlas["root"]), "--port", "0"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.time() + 60
        while "http://" not in line and time.time() < deadline:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                break
        assert "http://127.0.0.1:" in line, (line, p.stderr.read() if p.poll() is not None else "")
        url = line[line.index("http://"):].split()[0]
        host_port = url.split("/")[2]
        c = http.client.HTTPConnection(host_port, timeout=10)
        c.request("GET", "/viewer/data/model.json")
        r = c.getresponse()
        assert r.status == 200 and b'"layers"' in r.read()
        assert url.endswith("/viewer/index.html")
    finally:
        _stop(p)


def test_cli_publishes_a_viewer_when_absent_and_errors_without_atlas(tmp_path):
    from deepvis.cli import main
    facts = make_synthetic_atlas(tmp_path / "bare", big_units=2, topk=False)
    assert not (facts["root"] / "viewer").exists()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "deepvis.cli", "serve", str(facts["root"]), "--port", "0"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = p.stdout.readline()
        assert "wrote the viewer" in first, (first, p.stderr.read() if p.poll() is not None else "")
        assert "http://" in p.stdout.readline()
        assert (facts["root"] / "viewer/data/model.json").is_file()
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:   # fail, but leave no server behind
            p.kill()
            p.wait(5)
            raise
    assert main(["serve", str(tmp_path / "empty"), "--port", "0"]) == 2


def test_cli_port_in_use_is_one_line(atlas, capsys):
    from deepvis.cli import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(atlas["root"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepvis serve: error: cannot listen on 127.0.0.1:")
    assert f":{port} " in err and "pick another --port" in err and "\n" not in err


def test_cli_proxies_an_s3_atlas(atlas, tmp_path, monkeypatch):
    """`deepvis serve s3://bucket/prefix`: the viewer is published into the bucket, objects proxied."""
    from deepvis.storage.s3 import S3Store
    from tests.s3server import SeaweedNotFound, SeaweedServer
    try:
        s3 = SeaweedServer(tmp_path / "weed", bucket="atlas")
    except SeaweedNotFound as e:
        pytest.skip(str(e))
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)                        # nothing of the host's AWS setup
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3.start()
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    p = None
    try:
        store = S3Store("atlas", "runs/one", endpoint_url=s3.endpoint_url)
        for f in sorted(atlas["root"].rglob("*")):
            rel = f.relative_to(atlas["root"]).as_posix()
            if f.is_file() and not rel.startswith("viewer/"):
                store.put(rel, f.read_bytes())
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        p = subprocess.Popen([sys.executable, "-m", "deepvis.cli", "serve", "s3://atlas/runs/one", "--port", "0"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines = [p.stdout.readline(), p.stdout.readline()]
        assert "wrote the viewer" in lines[0] and "http://127.0.0.1:" in lines[1], \
            (lines, p.stderr.read() if p.poll() is not None else "")
        host_port = lines[1][lines[1].index("http://"):].split("/")[2]
        for path, status, ctype in (("/viewer/data/model.json", 200, "application/json"),
                                    ("/viewer/app.js", 200, "text/javascript"),
                                    (f"/units/{MID}/0/yosinski-3.png", 200, "image/png"),
                                    ("/viewer/data/sprites/conv.1/yosinski-3-0.png", 200, "image/png"),
                                    (f"/units/{MID}/1/yosinski-3.png", 404, None),
                                    ("/%2e%2e/one/manifest.json", 400, None)):
            c = http.client.HTTPConnection(host_port, timeout=20)
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            assert r.status == status, (path, r.status, body[:200])
            if ctype:
                assert r.getheader("Content-Type") == ctype and body == store.get(path[1:])
        assert store.exists("viewer/index.html")
    finally:
        if p is not None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        s3.stop()


# ---------------------------------------------------------------- issue #17: untrusted atlases
def _hostile_atlas(base, dataset_uri: str, image_ids: list[str]):
    """An atlas someone else made: its manifest names `dataset_uri` and its index lists `image_ids`."""
    from deepvis.storage import layout
    facts = make_synthetic_atlas(base / "atlas", big_units=2)
    store = facts["store"]
    t = layout.read_table(store, layout.TOPK).to_pydict()
    t["image"] = [image_ids[i % len(image_ids)] for i in range(len(t["image"]))]
    layout.write_topk(store, t, layout.TOPK_SCHEMA_V1)   # the synthetic atlas is a schema 1 one
    m = layout.read_manifest(store)
    m["dataset"]["uri"] = dataset_uri
    layout.put_json(store, layout.MANIFEST, m)
    return facts


def _served(store, **kw):
    import threading

    from deepvis.atlas_viewer.server import make_server
    from tests.atlas_viewer.conftest import Served
    s = make_server(store, "127.0.0.1", 0, **kw)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    return Served(s, t, None)


def test_dataset_images_are_not_served_unless_asked(tmp_path):
    """Keep/#17.1: a manifest that names '/' and an index that lists etc/passwd serve nothing by
    default: /dataset/ is off until the user names the root (--dataset DIR)."""
    facts = _hostile_atlas(tmp_path, "/", ["etc/passwd", "etc/hostname"])
    s = _served(facts["store"])
    try:
        for path in ("/dataset/etc/passwd", "/dataset/etc/hostname"):
            status, headers, body = get(s, path)
            assert status == 404 and b"root:" not in body and "X-Deepvis-Dataset" not in headers
    finally:
        s.stop()


def test_dataset_symlinks_out_of_the_named_root_are_refused(tmp_path):
    """#17.1: with --dataset DIR, an indexed id that is a link (file or folder) out of DIR is 404."""
    ds = tmp_path / "ds"
    (ds / "n0").mkdir(parents=True)
    (ds / "n0" / "ok.jpg").write_bytes(b"\xff\xd8 a jpeg")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "s.jpg").write_text("outside the dataset")
    os.symlink(secret / "s.jpg", ds / "n0" / "link.jpg")
    os.symlink(secret, ds / "dirlink")
    facts = _hostile_atlas(tmp_path, str(ds), ["n0/ok.jpg", "n0/link.jpg", "dirlink/s.jpg", "../secret/s.jpg"])
    s = _served(facts["store"], dataset=str(ds))
    try:
        status, headers, body = get(s, "/dataset/n0/ok.jpg")
        assert status == 200 and body == b"\xff\xd8 a jpeg" and headers["X-Deepvis-Dataset"] == "1"
        for path in ("/dataset/n0/link.jpg", "/dataset/dirlink/s.jpg", "/dataset/..%2fsecret/s.jpg"):
            status, _, body = get(s, path)
            assert status in (400, 404) and b"outside" not in body, path
    finally:
        s.stop()


def test_atlas_symlinks_out_of_the_atlas_are_refused(tmp_path):
    """#17.2: a link inside the atlas to a file outside it is refused (403), links inside work."""
    facts = make_synthetic_atlas(tmp_path / "atlas", big_units=2)
    (tmp_path / "secret.txt").write_text("outside the atlas")
    unit = facts["root"] / "units" / MID / "0"
    os.symlink(tmp_path / "secret.txt", unit / "leak.png")
    os.symlink(tmp_path, facts["root"] / "units" / "up")
    os.symlink("yosinski-3.png", unit / "alias.png")
    s = _served(facts["store"])
    try:
        for path in (f"/units/{MID}/0/leak.png", "/units/up/secret.txt"):
            status, _, body = get(s, path)
            assert status == 403 and b"outside" not in body, path
        status, _, body = get(s, f"/units/{MID}/0/alias.png")
        assert status == 200 and body == (unit / "yosinski-3.png").read_bytes()
    finally:
        s.stop()


def raw(server, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are, then read the whole answer (the server closes or times out)."""
    return send_raw(server.server.server_address[:2], data, timeout)


def test_host_header_is_checked(server):
    """#17.9 DNS rebinding: only this server's own names are answered."""
    port = server.server.server_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert raw(server, f"GET /manifest.json HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                   .encode()).startswith(b"HTTP/1.1 200 "), host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil:{port}",
                 f"x@127.0.0.1:{port}", f"127.0.0.1:{port}/x", "", f"127.0.0.1:{port}, evil:1"):
        answer = raw(server, f"GET /manifest.json HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 421 ") or answer.startswith(b"HTTP/1.1 400 "), (host, answer[:80])
        assert b'"layers"' not in answer
    answer = raw(server, b"GET /manifest.json HTTP/1.0\r\n\r\n")                  # no Host at all
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Host" in answer


def test_half_a_request_does_not_hold_a_thread(atlas):
    """#17.9: a client that sends half a request line is dropped after the socket timeout."""
    s = _served(atlas["store"], timeout=0.5)
    try:
        with socket.create_connection(s.server.server_address[:2], timeout=20) as c:
            c.sendall(b"GET /manifest.js")
            assert c.recv(100) == b""                     # closed by the server, nothing answered
    finally:
        s.stop()


def test_connections_are_bounded(atlas):
    """#17.9: beyond max_connections a client gets 503 at once; when they leave, service resumes."""
    s = _served(atlas["store"], max_connections=2)
    addr = s.server.server_address[:2]
    port = addr[1]
    idle = [socket.create_connection(addr, timeout=10) for _ in range(2)]
    try:
        deadline = time.time() + 20
        answer = b""
        while not answer.startswith(b"HTTP/1.1 503") and time.time() < deadline:
            answer = raw(s, f"GET /manifest.json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After" in answer
        for c in idle:
            c.close()
        while not answer.startswith(b"HTTP/1.1 200") and time.time() < deadline:
            answer = raw(s, f"GET /manifest.json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                         .encode())
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        for c in idle:
            c.close()
        s.stop()


def _cli_lines(args, n_lines: int):
    """Start `deepvis serve ARGS --port 0`, read n_lines of its output; (process, lines, host:port)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "deepvis.cli", "serve", *args, "--port", "0"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = [p.stdout.readline() for _ in range(n_lines)]
    url = next((ln for ln in lines if "http://" in ln), "")
    host_port = url[url.index("http://"):].split("/")[2] if url else None
    return p, lines, host_port


def _stop(p):
    p.send_signal(signal.SIGINT)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def test_cli_dataset_is_opt_in(atlas, tmp_path):
    """#17.1: `serve` says which directory the atlas names and serves it only with a flag."""
    image = "n000/img_000.JPEG"
    for flags, served in (([], False), (["--dataset-from-manifest"], True),
                          (["--dataset", str(atlas["dataset"])], True)):
        p, lines, host_port = _cli_lines([str(atlas["root"]), *flags], 2)
        try:
            assert host_port, (lines, p.stderr.read() if p.poll() is not None else "")
            assert str(atlas["dataset"]) in lines[1]
            assert ("not served" in lines[1]) == (not served)
            c = http.client.HTTPConnection(host_port, timeout=10)
            c.request("GET", f"/dataset/{image}")
            r = c.getresponse()
            assert (r.status, r.read() == (atlas["dataset"] / image).read_bytes()) == ((200, True) if served
                                                                                      else (404, False))
        finally:
            _stop(p)


def test_cli_dataset_errors_are_one_line(atlas, tmp_path, capsys):
    from deepvis.cli import main
    assert main(["serve", str(atlas["root"]), "--port", "0", "--dataset", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err
    bare = _hostile_atlas(tmp_path, "s3://bucket/images", ["a.jpg"])
    assert main(["serve", str(bare["root"]), "--port", "0", "--dataset-from-manifest"]) == 2
    err = capsys.readouterr().err.strip()
    assert "s3://bucket/images" in err and "--dataset DIR" in err and "\n" not in err
    assert main(["serve", str(atlas["root"]), "--port", "99999"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--port 99999" in err and "\n" not in err


def test_cli_port_in_use_writes_nothing(tmp_path, capsys):
    """#17.9 (bind first): a port in use is reported before the viewer is written into the atlas."""
    from deepvis.cli import main
    facts = make_synthetic_atlas(tmp_path / "bare", big_units=2, topk=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(facts["root"]), "--port", str(port)]) == 2
    assert "cannot listen" in capsys.readouterr().err
    assert not (facts["root"] / "viewer").exists()


def test_too_long_oversized_and_unsupported_requests_are_refused(server):
    """Keep: requests that are too long, have oversized headers, or use an unsupported method get
    414/431/501 (one plain-text line each), and the server goes on serving."""
    port = server.server.server_address[1]
    host = f"Host: 127.0.0.1:{port}\r\n"
    cases = [(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
             (f"GET /manifest.json HTTP/1.1\r\n{host}".encode() + b"X-A: b\r\n" * 101 + b"\r\n", 431),
             (f"GET /manifest.json HTTP/1.1\r\n{host}X-Big: {'b' * 70_000}\r\n\r\n".encode(), 431)]
    cases += [(f"{m} /manifest.json HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n".encode(), 501)
              for m in ("POST", "PUT", "DELETE", "OPTIONS")]
    for request, status in cases:
        answer = raw(server, request)
        assert answer.startswith(b"HTTP/1.1 %d " % status), (request[:40], answer[:100])
        assert b"text/plain" in answer and b"<html" not in answer.lower()
    assert get(server, "/manifest.json")[0] == 200


def test_servers_bind_127_0_0_1_by_default(atlas):
    """Keep: `serve` and `live` bind 127.0.0.1 unless told otherwise (the flag and the function)."""
    import inspect

    from deepvis.atlas_viewer.live import server as live_server
    from deepvis.atlas_viewer.server import make_server
    from deepvis.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["serve", str(atlas["root"])]).host == "127.0.0.1"
    assert parser.parse_args(["live", "--model", "efficientnet_lite0"]).host == "127.0.0.1"
    for fn in (make_server, live_server.make_server, live_server.bind_server):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1"
    s = make_server(atlas["store"], port=0)
    try:
        assert s.server_address[0] == "127.0.0.1"
    finally:
        s.server_close()


def test_host_allowed_rules():
    """#17.9: the names each binding answers to (checked without binding beyond 127.0.0.1)."""
    from types import SimpleNamespace

    from deepvis.atlas_viewer.server import GuardedHTTPServer
    allowed = GuardedHTTPServer.host_allowed
    lo = SimpleNamespace(server_address=("127.0.0.1", 8000))
    assert all(allowed(lo, h) for h in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LocalHost:8000"))
    assert not any(allowed(lo, h) for h in ("127.0.0.1", "127.0.0.1:80", "10.0.0.2:8000", "evil.example:8000",
                                            "localhost.:8000", "127.0.0.1:8000:1", "", None, "127.0.0.1:08000x"))
    web = SimpleNamespace(server_address=("127.0.0.1", 80))
    assert allowed(web, "localhost") and allowed(web, "127.0.0.1:80") and not allowed(web, "evil.example")
    wild = SimpleNamespace(server_address=("0.0.0.0", 8000))
    assert allowed(wild, "10.0.0.2:8000") and allowed(wild, "[fe80::1]:8000") and allowed(wild, "localhost:8000")
    assert not allowed(wild, "evil.example:8000") and not allowed(wild, "10.0.0.2:8001")
    lan = SimpleNamespace(server_address=("192.168.1.5", 8000))
    assert allowed(lan, "192.168.1.5:8000") and not allowed(lan, "10.0.0.2:8000")
