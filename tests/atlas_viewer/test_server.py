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
from tests.atlas_viewer.conftest import MID, ROOT, XSS_FILE, make_synthetic_atlas, serve


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
    status, _, body = get(server, path)
    assert status in (400, 404), (path, status)
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
    """`deepvis serve DIR --port 0` prints the URL of a free port and serves there."""
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
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


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
