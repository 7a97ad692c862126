"""Fuzz both servers (issue #17 'Done when'): 240 malformed requests each, from a seeded RNG (random
paths and encodings, methods, versions, header counts and sizes, Host values, Content-Lengths and
bodies, connections dropped mid-request), over real sockets to 127.0.0.1 only. After every one the
server must answer a good request; no handler may raise (a crash would show in handle_error) and no
answer may be a 5xx other than 501/505 (a method or version it does not speak) or 503 (busy).
Bounded: a fixed count, 5 s socket timeouts, and the whole run must end within 120 s."""
from __future__ import annotations

import random
import socket
import sys
import threading
import time

import pytest

from tests.atlas_viewer.conftest import MID, make_synthetic_atlas

N = 240
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PATCH", "get", "G\x00T",
           "", "X" * 300, "GET GET"]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "HTTP/1.1x", "", "FOO", "HTTP/1.1 extra", "http/1.1"]
PIECES = ["a", "units", MID, "viewer", "index.html", "dataset", "api", "frame", "model", "atlas", "..", ".",
          "", "%2e%2e", "%2f", "%5c", "%00", "%ff", "%", "%zz", "%C0%AE", "\\", "?x=1", "#f", "é", "\x7f",
          "manifest.json", "layer=_blocks.3&unit=-1", "?layer=" + "A" * 500, ";", "*", "~", "%252e"]
HOSTS = ["{ok}", "{ok}", "{ok}", "evil.example:{port}", "", "127.0.0.1", "{ok}, {ok}", "[::1]:{port}",
         "localhost:{port}", "x" * 5000, "127.0.0.1:{port}@evil", "\xff:{port}"]
LENGTHS = ["-1", "0", "abc", "99999999999999999999", "+3", "1e3", "{n}", "{n}", "{more}", "{less}"]


def _request(rng: random.Random, port: int) -> bytes:
    """One malformed (or odd) request, as raw bytes."""
    path = "/" + "/".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))
    if rng.random() < 0.05:
        path = "/" + "a" * rng.choice([70_000, 200_000])                  # 414
    if rng.random() < 0.05:
        path = rng.choice(["", "*", "http://127.0.0.1/../x", "units/x", "//" * 50])
    method = rng.choice(["GET", "HEAD", "POST"]) if rng.random() < 0.7 else rng.choice(METHODS)
    version = "HTTP/1.1" if rng.random() < 0.7 else rng.choice(VERSIONS)
    line = f"{method} {path} {version}"
    ok = f"127.0.0.1:{port}"
    headers = [f"Host: {rng.choice(HOSTS).format(ok=ok, port=port)}"]
    body = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 0, 10, 300, 3000])))
    if rng.random() < 0.5:
        n = len(body)
        headers.append("Content-Length: " + rng.choice(LENGTHS).format(n=n, more=n + 50, less=max(n - 5, 0)))
    if rng.random() < 0.1:
        headers.append("Transfer-Encoding: " + rng.choice(["chunked", "gzip", "chunked, chunked"]))
    for _ in range(rng.choice([0, 0, 3, 30, 120])):                        # > 100 headers: 431
        headers.append(f"X-{rng.randint(0, 999)}: {'v' * rng.randint(0, 50)}")
    if rng.random() < 0.05:
        headers.append("X-Big: " + "b" * 70_000)                          # a header line too long
    if rng.random() < 0.05:
        headers.append(rng.choice(["no colon here", ": empty name", "X-Nul: a\x00b", "\x01\x02: bin"]))
    data = (line + "\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    if rng.random() < 0.1:
        data = data[: rng.randint(0, len(data))]                          # dropped mid-request
    return data


def _send(addr, data: bytes) -> bytes:
    with socket.create_connection(addr, timeout=5) as s:
        out = b""
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while len(out) < (1 << 20) and (chunk := s.recv(65536)):
                out += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass                          # the server refused and closed before reading it all
        return out


def _status(answer: bytes) -> int | None:
    if not answer:
        return None
    assert answer.startswith(b"HTTP/1."), answer[:100]
    return int(answer.split(b" ", 2)[1])


def _fuzz(server, good: bytes, seed: int) -> dict:
    errors = []
    server.handle_error = lambda request, client: errors.append(sys.exc_info()[1])
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    addr = server.server_address[:2]
    rng = random.Random(seed)
    seen: dict = {}
    t0 = time.monotonic()
    try:
        for i in range(N):
            status = _status(_send(addr, _request(rng, addr[1])))
            seen[status] = seen.get(status, 0) + 1
            assert status is None or status < 500 or status in (501, 503, 505), (i, status)
            assert _status(_send(addr, good)) == 200, f"no answer to a good request after malformed #{i}"
            assert time.monotonic() - t0 < 120
    finally:
        server.shutdown()
        server.server_close()
    assert [e for e in errors if not isinstance(e, (ConnectionError, TimeoutError))] == []
    return seen


def test_fuzz_serve(tmp_path):
    from deepvis.atlas_viewer.server import make_server
    facts = make_synthetic_atlas(tmp_path / "atlas", big_units=2)
    server = make_server(facts["store"], "127.0.0.1", 0, dataset=str(facts["dataset"]))
    good = b"GET /manifest.json HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % server.server_address[1]
    seen = _fuzz(server, good, seed=17)
    print("answers by status:", seen)
    assert sum(seen.values()) == N and {400, 404, 421, 501} <= set(seen), seen     # it reached each refusal


@pytest.mark.usefixtures("lite0")
def test_fuzz_live(lite0):
    from deepvis.atlas_viewer.live.server import make_server
    server = make_server(lite0, "127.0.0.1", 0, max_bytes=100_000)
    good = b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % server.server_address[1]
    seen = _fuzz(server, good, seed=18)
    print("answers by status:", seen)
    assert sum(seen.values()) == N and {400, 404, 421, 501} <= set(seen), seen
