"""`deepvis live`'s server over real HTTP: frames, gradients, atlas entries, bad input, dropped
clients and 'latest frame wins'."""
from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from deepvis.storage import layout
from deepvis.storage.store import LocalStore
from tests.atlas_viewer.conftest import send_raw

LAYER = "_blocks.3"


def _jpeg(arr, quality=95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coffee_jpeg():
    from skimage import data
    return _jpeg(data.coffee())


def _tiny_atlas(root, presets=("yosinski-3",), schema=1):
    """An atlas of efficientnet_lite0 written as FORMAT.md lays it out: units 0..2 of _blocks.3. Schema
    1's crop layout by default (per-unit crops; atlases built before schema 2 must keep working here);
    schema 3: one 224 px input image per dataset image, each crop a box of it (unit 2's bottom rank 1
    has no input: its image was unreadable in the build)."""
    store = LocalStore(root)
    rng = np.random.default_rng(1)
    tschema = layout.TOPK_SCHEMA if schema == 3 else layout.TOPK_SCHEMA_V1
    cols = {f.name: [] for f in tschema}
    for u in range(3):
        for p in presets:
            store.put(layout.unit_key(LAYER, u, f"{p}.png"), _png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)))
        for kind in ("top", "bottom"):
            for r in range(2):
                image, box = f"n01/<b>{u}-{r}</b>.JPEG", (0, 0, 10, 10) if schema == 1 else (3 + u, 5 * r, 40 + u, 30 + r)
                inp = None if schema == 1 or (u, kind, r) == (2, "bottom", 1) else layout.input_key(image)
                if schema == 1:
                    store.put(layout.unit_key(LAYER, u, layout.crop_name(kind, r)), _jpeg(np.full((8, 8, 3), 40 * r, np.uint8)))
                elif inp is not None:
                    store.put(inp, _jpeg(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)))
                for c, v in (("layer", LAYER), ("unit", u), ("kind", kind), ("rank", r), ("activation", 9.0 - r),
                             ("image", image), ("y", 0), ("x", 0), ("x0", box[0]), ("y0", box[1]),
                             ("x1", box[2]), ("y1", box[3]), ("input", inp)):
                    if c in cols:
                        cols[c].append(v)
    layout.write_topk(store, cols, tschema)
    layout.put_json(store, layout.MANIFEST, {
        "schema_version": schema, "status": "complete",
        "model": {"name": "efficientnet_lite0", "source": "package", "weights": "default", "input_size": 224,
                  "preprocessing": {"resize": 256, "crop": 224}},
        "layers": [{"name": LAYER, "units": 40, "shape": [40, 28, 28], "selected": [0, 1, 2]}],
        "presets": [{"name": p} for p in presets], "k": 2})
    return store


def _host(server) -> bytes:
    return b"127.0.0.1:%d" % server.server_address[1]


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class Client:
    def __init__(self, server):
        self.host, self.port = server.server_address[:2]

    def request(self, method, path, body=None, headers=None, conn=None):
        c = conn or http.client.HTTPConnection(self.host, self.port, timeout=60)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        if conn is None:
            c.close()
        return r.status, r.getheader("Content-Type"), data

    def json(self, method, path, body=None, **kw):
        status, ctype, data = self.request(method, path, body, **kw)
        assert ctype == "application/json", (status, ctype, data[:200])
        return status, json.loads(data)


@pytest.fixture(scope="module")
def served(lite0, tmp_path_factory):
    from deepvis.atlas_viewer.live.server import make_server
    store = _tiny_atlas(tmp_path_factory.mktemp("live") / "atlas")
    server = make_server(lite0, "127.0.0.1", 0, atlas_store=store, max_bytes=5_000_000)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server, Client(server)
    server.shutdown()
    server.server_close()


def _decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_model_and_page(served, lite0):
    from deepvis.tasks.layers import enumerate_layers
    server, cl = served
    status, m = cl.json("GET", "/api/model")
    assert status == 200
    assert [l["name"] for l in m["layers"]] == [l.name for l in enumerate_layers(lite0.module, 224)]
    assert m["default_layer"] in {l["name"] for l in m["layers"]}
    assert m["atlas"]["matches"] and m["atlas"]["layers"] == {LAYER: 3}
    status, ctype, page = cl.request("GET", "/")
    assert status == 200 and ctype.startswith("text/html") and b"/live/live.js" in page
    for f in ("live.js", "live.css"):
        assert cl.request("GET", f"/live/{f}")[0] == 200
    assert cl.request("GET", "/live/../server.py")[0] == 404
    assert cl.request("GET", "/nothing")[0] == 404


def test_frame_equals_direct_computation(served, lite0, coffee_jpeg):
    from deepvis.tasks.grid import layer_activations, tile_grid
    from deepvis.tasks.preprocess import preprocess
    _, cl = served
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}&unit=4&client=t", coffee_jpeg)
    assert status == 200
    acts = layer_activations(lite0.module, LAYER, preprocess(Image.open(io.BytesIO(coffee_jpeg)), lite0.preprocessing))
    assert (_decode_data_url(d["grid"]) == tile_grid(acts)).all()
    assert d["shape"] == [40, 28, 28] and (d["rows"], d["cols"], d["tile"], d["sep"]) == (6, 7, [28, 28], 1)
    assert d["top5"][0]["label"] == "espresso" and len(d["top5"]) == 5
    assert d["unit"] == 4 and d["unit_max"] == pytest.approx(float(acts[4].max()), abs=1e-5)
    assert _decode_data_url(d["unit_map"]).shape == (28, 28)
    status, ctype, png = cl.request("POST", f"/api/gradient?layer={LAYER}&unit=4", coffee_jpeg)
    assert status == 200 and ctype == "image/png"
    g = np.asarray(Image.open(io.BytesIO(png)))
    assert g.shape == (224, 224, 3) and g.min() < 128 < g.max()


def test_atlas_entry_and_objects(served):
    _, cl = served
    status, e = cl.json("GET", f"/api/unit?layer={LAYER}&unit=1")
    assert status == 200 and e["in_atlas"]
    assert [p["name"] for p in e["presets"]] == ["yosinski-3"]
    assert [t["rank"] for t in e["top"]] == [0, 1] and e["top"][0]["image"] == "n01/<b>1-0</b>.JPEG"
    assert all(t["crop_box"] is None for t in e["top"] + e["bottom"])       # schema 1: the object is the crop
    for url in [e["presets"][0]["url"]] + [t["url"] for t in e["top"] + e["bottom"]]:
        status, ctype, data = cl.request("GET", url)
        assert status == 200 and ctype.startswith("image/") and data
    status, e = cl.json("GET", f"/api/unit?layer={LAYER}&unit=7")       # a unit the atlas lacks
    assert status == 200 and not e["in_atlas"] and "not in the atlas" in e["reason"]
    assert cl.request("GET", "/atlas/manifest.json")[0] == 404         # only units/, crops/, inputs/ and viewer/
    assert cl.request("GET", "/atlas/units/../manifest.json")[0] == 400
    assert cl.request("GET", f"/atlas/units/{LAYER}/9/yosinski-3.png")[0] == 404


def test_atlas_entry_and_objects_of_a_schema3_atlas(lite0, tmp_path):
    """Schema 3: /api/unit gives each crop as its input image's URL plus the box to cut from it
    (crop_box) and the input size the box is in; /atlas/ serves inputs/ objects (and still refuses
    what is not an atlas image); a row without an input has no URL."""
    from deepvis.atlas_viewer.live.server import make_server
    store = _tiny_atlas(tmp_path / "a", schema=3)
    server = make_server(lite0, "127.0.0.1", 0, atlas_store=store)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cl = Client(server)
    try:
        status, e = cl.json("GET", f"/api/unit?layer={LAYER}&unit=2")
        assert status == 200 and e["in_atlas"] and e["input_size"] == 224
        for kind in ("top", "bottom"):
            assert [t["rank"] for t in e[kind]] == [0, 1]
            for t in e[kind]:
                assert t["crop_box"] == [5, 5 * t["rank"], 42, 30 + t["rank"]]
                if (kind, t["rank"]) == ("bottom", 1):
                    assert t["url"] is None
                    continue
                key = layout.input_key(t["image"])
                assert t["url"] == f"/atlas/{key}"
                status, ctype, data = cl.request("GET", t["url"])
                assert status == 200 and ctype == "image/jpeg" and data == store.get(key)
        status, ctype, data = cl.request("HEAD", e["top"][0]["url"])
        assert status == 200 and ctype == "image/jpeg" and data == b""
        assert cl.request("GET", "/atlas/inputs/0123456789abcdef01234567.jpg")[0] == 404
        assert cl.request("GET", "/atlas/inputs/../manifest.json")[0] == 400
        assert cl.request("GET", "/atlas/manifest.json")[0] == 404
        assert cl.request("GET", f"/atlas/{layout.TOPK}")[0] == 404
        assert cl.request("GET", "/atlas/inputsx/a.jpg")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_atlas_of_another_model_is_not_joined(lite0, tmp_path):
    from deepvis.atlas_viewer.live.server import AtlasLink
    store = _tiny_atlas(tmp_path / "a")
    link = AtlasLink(store, "torchvision:resnet18", "default")
    assert not link.matches and "efficientnet_lite0" in link.reason
    assert link.entry(LAYER, 0)["in_atlas"] is False


def test_bad_input_clear_errors_and_server_keeps_serving(served, coffee_jpeg):
    """Keep: `live` refuses non-images, too-large bodies and chunked uploads cleanly, and keeps serving."""
    _, cl = served
    conn = http.client.HTTPConnection(*served[0].server_address[:2], timeout=60)
    big = b"\xff\xd8" + bytes(50_000_000)                                      # 50 MB
    status, ctype, data = cl.request("POST", f"/api/frame?layer={LAYER}", big, conn=conn)
    err = json.loads(data)["error"]
    assert status == 413 and "50.0 MB" in err and "limit is 5 MB" in err and "--max-upload-mb" in err
    # the same connection still works (the body was read and dropped)
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}", coffee_jpeg, conn=conn)
    assert status == 200 and d["top5"][0]["label"] == "espresso"
    conn.close()

    status, d = cl.json("POST", f"/api/frame?layer={LAYER}", b"GIF89a but not really an image")
    assert status == 415 and "not an image" in d["error"]
    status, d = cl.json("POST", "/api/frame?layer=nope", coffee_jpeg)
    assert status == 404 and "unknown layer 'nope'" in d["error"]
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}&unit=40", coffee_jpeg)
    assert status == 400 and "out of range" in d["error"]
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}&unit=x", coffee_jpeg)
    assert status == 400 and "integer" in d["error"]
    status, d = cl.json("POST", f"/api/gradient?layer={LAYER}", coffee_jpeg)
    assert status == 400 and "unit" in d["error"]
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}", b"")
    assert status == 400 and "empty" in d["error"]
    status, d = cl.json("POST", "/api/elsewhere", b"x")
    assert status == 404
    # a frame with no Content-Length (Keep: chunked uploads are refused cleanly)
    s = socket.create_connection(served[0].server_address[:2])
    s.sendall(b"POST /api/frame HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % _host(served[0]))
    assert s.recv(200).startswith(b"HTTP/1.1 411")
    s.close()
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}", coffee_jpeg)
    assert status == 200


def test_client_disconnecting_mid_frame(served, coffee_jpeg):
    server, cl = served
    for _ in range(3):
        s = socket.create_connection(server.server_address[:2])
        s.sendall(f"POST /api/frame?layer={LAYER} HTTP/1.1\r\nHost: {_host(server).decode()}\r\n"
                  f"Content-Length: {len(coffee_jpeg)}\r\n\r\n".encode() + coffee_jpeg[: len(coffee_jpeg) // 3])
        s.close()
    # and one that leaves while its answer is being computed
    s = socket.create_connection(server.server_address[:2])
    s.sendall(f"POST /api/frame?layer={LAYER} HTTP/1.1\r\nHost: {_host(server).decode()}\r\n"
              f"Content-Length: {len(coffee_jpeg)}\r\n\r\n".encode() + coffee_jpeg)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    time.sleep(0.5)
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}", coffee_jpeg)
    assert status == 200 and d["top5"][0]["label"] == "espresso"


def test_latest_frame_wins(served, coffee_jpeg):
    """While the model is busy, a client's older waiting frame is dropped (409) once a newer one
    arrives; other clients are not affected."""
    server, cl = served
    live = server.RequestHandlerClass.live
    results = {}

    def post(name, client):
        results[name] = cl.json("POST", f"/api/frame?layer={LAYER}&client={client}", coffee_jpeg)

    def wait_for_ticket(n):
        deadline = time.time() + 30
        while live.gate._n < n:
            assert time.time() < deadline
            time.sleep(0.01)

    with live.lock:                       # the model is busy
        n0 = live.gate._n
        threads = []
        for i, (name, client) in enumerate([("old", "a"), ("new", "a"), ("other", "b")]):
            t = threading.Thread(target=post, args=(name, client))
            t.start()
            threads.append(t)
            wait_for_ticket(n0 + i + 1)
    for t in threads:
        t.join(60)
    assert results["old"][0] == 409 and "newer frame" in results["old"][1]["error"]
    assert results["new"][0] == 200 and results["other"][0] == 200


def test_cli_errors(capsys, tmp_path):
    from deepvis.cli import main
    assert main(["live", "--model", "efficientnet_lite0", "--layer", "nope", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepvis live: error: ") and "'nope'" in err and "\n" not in err
    assert main(["live", "--model", "efficientnet_lite0", "--atlas", str(tmp_path / "none"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no atlas" in err and "\n" not in err
    assert main(["live", "--model", "efficientnet_lite0", "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb" in capsys.readouterr().err
    with socket.socket() as taken:     # a port in use: one line naming it, not a traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["live", "--model", "efficientnet_lite0", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and "\n" not in err


# ---------------------------------------------------------------- issue #17: hostile uploads, servers
def raw(server, data: bytes, timeout: float = 30) -> bytes:
    """Send bytes as they are, then read the whole answer (until the server closes)."""
    return send_raw(server.server_address[:2], data, timeout)


def _post(server, headers: str, body: bytes = b"") -> tuple[int, str]:
    answer = raw(server, f"POST /api/frame?layer={LAYER} HTTP/1.1\r\nHost: 127.0.0.1:{server.server_address[1]}\r\n"
                 f"{headers}Connection: close\r\n\r\n".encode() + body)
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)["error"]


@pytest.mark.parametrize("lengths", [["-1"], ["-5000000"], ["+100"], ["1_0"], ["0x10"], ["1e3"], ["ten"], ["10", "20"],
                                     ["99999999999999999999999"]])
def test_bad_content_length_is_refused(served, lengths):
    """#17.4: Content-Length -1 used to read the body to its end, past --max-upload-mb; any length that
    is not one plain decimal number is a 400 and nothing of the body is read."""
    server, cl = served
    headers = "".join(f"Content-Length: {n}\r\n" for n in lengths)
    status, err = _post(server, headers, b"\xff\xd8" + bytes(100_000))
    assert ("Content-Length" in err or "limit is 5 MB" in err) and "\n" not in err, err
    assert status == (413 if lengths == ["99999999999999999999999"] else 400), (lengths, status, err)
    assert cl.json("GET", "/api/model")[0] == 200


@pytest.mark.parametrize("w,h", [(400000, 100), (39999999, 1), (20000, 100), (8000, 8000)])
def test_image_caps_are_checked_before_decoding(served, w, h):
    """#17.4: width, height, aspect ratio and pixels are capped from the header (the pixel stream
    here is garbage: a decoder that got that far would answer 415, not 413)."""
    from tests.bombs import png
    server, cl = served
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}", png(w, h, pixels=False))
    assert status == 413 and f"{w}x{h}" in d["error"], d


def test_a_real_wide_bomb_is_refused(served):
    """#17.4: the 39 KB 400000x100 PNG of the issue (decoded: ~1.5 GB after the resize)."""
    from tests.bombs import png
    _, cl = served
    status, d = cl.json("POST", f"/api/gradient?layer={LAYER}&unit=0", png(400000, 100))
    assert status == 413 and "400000x100" in d["error"]


def test_live_checks_host(served, coffee_jpeg):
    """#17.9: DNS rebinding: a page of evil.example must not reach the model or the atlas."""
    server, cl = served
    port = server.server_address[1]
    for req in (f"GET /api/model HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n".encode(),
                f"POST /api/frame HTTP/1.1\r\nHost: evil.example:{port}\r\nContent-Length: {len(coffee_jpeg)}\r\n\r\n"
                .encode() + coffee_jpeg,
                f"GET /atlas/units/{LAYER}/0/yosinski-3.png HTTP/1.1\r\nHost: 127.0.0.1:{port + 1}\r\n\r\n".encode()):
        answer = raw(server, req)
        assert answer.startswith(b"HTTP/1.1 421 ") and b"not this server's" in answer, answer[:200]
    assert raw(server, f"GET /api/model HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
               .encode()).startswith(b"HTTP/1.1 200 ")


def test_live_times_out_and_bounds_connections(lite0):
    """#17.9 for `live`: a half request is dropped after the timeout; beyond max_connections, 503."""
    from deepvis.atlas_viewer.live.server import make_server
    server = make_server(lite0, "127.0.0.1", 0, max_connections=1, timeout=2)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        with socket.create_connection(server.server_address[:2], timeout=20) as c:
            c.sendall(b"POST /api/fra")
            deadline = time.time() + 20
            answer = b""
            while not answer.startswith(b"HTTP/1.1 503") and time.time() < deadline:
                answer = raw(server, b"GET /api/model HTTP/1.1\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert c.recv(100) == b""                       # the half request timed out: closed
        deadline = time.time() + 20
        while not answer.startswith(b"HTTP/1.1 200") and time.time() < deadline:
            answer = raw(server, b"GET /api/model HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % _host(server))
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        server.shutdown()
        server.server_close()


def test_cli_binds_before_loading_the_model(capsys):
    """#17.9: a port in use is reported at once, before the model loads (a model that cannot load
    would otherwise be the error, after the whole load)."""
    from deepvis.cli import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["live", "--model", "no_such_module_deepvis:make", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and "\n" not in err
    assert main(["live", "--model", "efficientnet_lite0", "--port", "99999"]) == 2
    assert "--port 99999" in capsys.readouterr().err


def test_keep_live_refusals_and_csp(served, coffee_jpeg):
    """Keep: `live` refuses truncated images and decompression bombs cleanly (and non-images, big
    bodies and chunked uploads: test_bad_input_clear_errors_and_server_keeps_serving); its page
    has a CSP and its script no innerHTML; 414/431/501 as for `serve`."""
    from tests.bombs import png
    server, cl = served
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}", coffee_jpeg[: len(coffee_jpeg) // 2])
    assert status == 415 and "truncated" in d["error"]
    status, d = cl.json("POST", f"/api/frame?layer={LAYER}", png(20000, 20000, pixels=False))  # PIL's bomb error
    assert status == 413 and "too large" in d["error"]
    c = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    csp = r.getheader("Content-Security-Policy")
    assert "script-src 'self'" in csp and "object-src 'none'" in csp and "unsafe-inline" not in csp
    from deepvis.atlas_viewer.live.server import PAGE_DIR
    assert "innerHTML" not in (PAGE_DIR / "live.js").read_text()
    host = b"Host: %s\r\n" % _host(server)
    for request, code in ((b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
                          (b"GET /api/model HTTP/1.1\r\n" + host + b"X-A: b\r\n" * 101 + b"\r\n", 431),
                          (b"PUT /api/frame HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n", 501)):
        assert raw(server, request).startswith(b"HTTP/1.1 %d " % code), code
    assert cl.json("GET", "/api/model")[0] == 200


def test_atlas_links_out_of_the_atlas_are_refused(served, tmp_path):
    """#17.2 for live's /atlas/ route: a link in the atlas to a file outside it is 403, and the answer
    says nothing of the file or of where the atlas is."""
    import os
    server, cl = served
    root = server.RequestHandlerClass.live.atlas.store.root
    (tmp_path / "secret.png").write_bytes(b"outside the atlas")
    link = root / "units" / LAYER / "0" / "leak.png"
    os.symlink(tmp_path / "secret.png", link)
    try:
        status, ctype, body = cl.request("GET", f"/atlas/units/{LAYER}/0/leak.png")
        assert status == 403 and b"outside the atlas" not in body and str(root).encode() not in body
        assert cl.request("GET", f"/atlas/units/{LAYER}/0/yosinski-3.png")[0] == 200
    finally:
        link.unlink()
