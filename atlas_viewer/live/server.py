"""The server of `deepvis live --model M [--atlas STORE]`: the paper's live tool as a local web app.
The page (index.html, live.js, live.css beside this file) captures frames from the webcam, a local video or dropped images, posts each
to this server and shows the top-5 classes, one layer's tiled activation grid, the selected unit's
map, its gradient with respect to the frame, and, when STORE is an atlas of the same model, the
unit's optimized images and top-k crops.

Server: the standard library's ThreadingHTTPServer, like `deepvis serve` (their shared
GuardedHTTPServer: Host checked against DNS rebinding, socket timeout, bounded connections): a few
JSON routes need no framework, and it keeps the install small. Binds 127.0.0.1 by default.
Uploads: one plain Content-Length up to --max-upload-mb (no chunked bodies), decoded by
storage.images with LIMITS checked from the image's header before any pixel is decoded.

Routes
  GET  /                       the page (and /live/<file> its script and style)
  GET  /api/model              model name, layers (name, kind, shape), atlas facts, limits
  POST /api/frame?layer=L[&unit=U][&client=ID]   body: an image -> JSON (top-5, grid, unit map)
  POST /api/gradient?layer=L&unit=U              body: an image -> PNG (signed gradient, 128 = 0)
  GET  /api/unit?layer=L&unit=U  the atlas entry of a unit: optimized images, top/bottom crops (each
                               an object URL, and crop_box when the crop is a box cut from it)
  GET  /atlas/<key>            an object of the atlas (units/, crops/, inputs/, viewer/ only)
Latest frame wins: each client (ID) has one slot; a frame still waiting for the model when a newer
one from the same client arrives is answered 409 and never computed, so lag cannot build up."""
from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from deepvis.atlas_viewer.server import GuardedHandler, GuardedHTTPServer
from deepvis.storage.images import BadImage, ImageLimits, ImageTooLarge, decode

PAGE_DIR = Path(__file__).resolve().parent
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "live.js": "text/javascript; charset=utf-8",
              "live.css": "text/css; charset=utf-8"}


# what an uploaded frame may declare in its header (checked before decoding): a webcam frame or a
# photo fits; a 400000x100 PNG of 39 KB (1.5 GB once resized) or a 40 Mpx bomb does not
LIMITS = ImageLimits(max_pixels=40_000_000, max_side=16_384, max_aspect=100.0)
MAX_PIXELS = LIMITS.max_pixels


DRAIN_LIMIT = 256 << 20       # a too-large body up to this size is read and dropped, so the client


#                               gets the 413; beyond it the connection is closed instead
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
       "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")


# ---------------------------------------------------------------- state shared by the handlers
class LatestGate:
    """Per-client 'latest frame wins': ticket() on arrival, stale() once the model is free."""

    def __init__(self, max_clients: int = 256):
        self._mu = threading.Lock()
        self._n = 0
        self._latest: dict[str, int] = {}
        self._max = max_clients

    def ticket(self, client: str) -> int:
        with self._mu:
            self._n += 1
            self._latest.pop(client, None)
            self._latest[client] = self._n
            while len(self._latest) > self._max:          # forget the longest-idle client
                self._latest.pop(next(iter(self._latest)))
            return self._n

    def stale(self, client: str, ticket: int) -> bool:
        with self._mu:
            return self._latest.get(client, ticket) != ticket


class AtlasLink:
    """The optional atlas: which (layer, unit) it holds, and each unit's entry."""

    def __init__(self, store, model_name: str, weights: str | None):
        from deepvis.storage import layout
        from deepvis.storage.atlas import Atlas

        self.store = store
        self.atlas = Atlas(store, layout.read_manifest(store))
        m = self.atlas.manifest.get("model") or {}
        self.model = m.get("name")
        self.matches = self.model == model_name and (m.get("weights") or None) == (weights or None)
        self.reason = None if self.matches else (
            f"the atlas is of {self.model!r} (weights {m.get('weights')!r}), not of {model_name!r} "
            f"(weights {weights!r}); its units are not shown")
        self.presets = [p["name"] for p in self.atlas.manifest.get("presets") or []]
        self.layers = {l["name"]: set(l.get("selected") or range(l["units"]))
                       for l in self.atlas.manifest.get("layers") or []}
        self.has_topk = store.exists(layout.TOPK)
        # the side of schema 3's input images, which the crop boxes are in (the page scales by it)
        pre = m.get("preprocessing") or {}
        self.input_size = pre.get("crop") or m.get("input_size")
        self._lock = threading.Lock()

    def facts(self) -> dict:
        return {"uri": self.store.uri, "model": self.model, "matches": self.matches, "reason": self.reason,
                "presets": self.presets, "layers": {k: len(v) for k, v in self.layers.items()},
                "viewer": self.store.exists("viewer/index.html")}

    def entry(self, layer: str, unit: int) -> dict:
        from deepvis.storage import layout

        out = {"layer": layer, "unit": unit, "in_atlas": False, "presets": [], "top": [], "bottom": [],
               "reason": self.reason}
        if not self.matches:
            return out
        if unit not in self.layers.get(layer, ()):
            out["reason"] = f"{layer}:{unit} is not in the atlas"
            return out
        out["in_atlas"] = True
        out["reason"] = None
        for p in self.presets:
            key = layout.unit_key(layer, unit, f"{p}.png")
            if self.store.exists(key):
                out["presets"].append({"name": p, "url": f"/atlas/{key}"})
        if self.has_topk:
            with self._lock:   # pyarrow reads are single-threaded here (see storage.layout)
                for kind in ("top", "bottom"):
                    out[kind] = [_crop_entry(r) for r in self.atlas.top_images(layer, unit, 9, kind)]
            out["input_size"] = self.input_size
        if self.store.exists("viewer/index.html"):
            out["viewer"] = f"/atlas/viewer/index.html#/layer/{_q(layer)}/unit/{unit}"
        return out


def _crop_entry(r: dict) -> dict:
    """A top/bottom row for the page: url, the object holding the crop (null: none was written);
    crop_box [x0, y0, x1, y1], the box to cut from it (schema 3: the object is the whole input image,
    of the entry's input_size px), or null when the object is the crop itself."""
    return {"rank": r["rank"], "activation": r["activation"], "image": r["image"],
            "url": f"/atlas/{r['crop']}" if r["crop"] else None, "crop_box": r.get("crop_box")}


def _q(s: str) -> str:
    from urllib.parse import quote
    return quote(s, safe="")


class Live:
    """Everything the handlers share: the model, its lock, the gate, the atlas link."""

    def __init__(self, lm, device, layers, default_layer: str, atlas: AtlasLink | None, max_bytes: int):
        from deepvis.tasks.live import LiveModel

        self.model = LiveModel(lm, device)
        self.lm = lm
        self.layers = layers                        # [LayerInfo]
        self.names = {l.name for l in layers}
        self.default_layer = default_layer
        self.atlas = atlas
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.gate = LatestGate()
        self.frames = 0

    def model_json(self) -> dict:
        return {"model": {"name": self.lm.name, "source": self.lm.source, "weights": self.lm.weights,
                          "classes": bool(self.lm.labels)},
                "layers": [l.to_dict() for l in self.layers], "default_layer": self.default_layer,
                "atlas": self.atlas.facts() if self.atlas else None, "max_upload_bytes": self.max_bytes}


class HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


# ---------------------------------------------------------------- handler
class LiveHandler(GuardedHandler):
    server_version = "deepvis-live"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body go in two writes: no 40 ms delayed-ACK stall
    live: Live = None        # set on the subclass made by make_server
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    # ---- responses
    def _send(self, status, body: bytes, ctype: str, head: bool = False, extra: dict | None = None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True   # the client left; nothing to tell it

    def _json(self, obj, status=HTTPStatus.OK):
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def _fail(self, e: HTTPError):
        if e.close:
            self.close_connection = True
        self._send(e.status, json.dumps({"error": e.message}).encode(), "application/json",
                   extra={"Connection": "close"} if e.close else None)

    # ---- routing
    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str):
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            refused = self.host_refusal()
            if refused is not None:      # a POST's body is not read: the connection closes
                raise HTTPError(*refused, close=True)
            if method == "POST":
                if url.path == "/api/frame":
                    return self._frame(q)
                if url.path == "/api/gradient":
                    return self._gradient(q)
                self._discard_body()
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no POST route {url.path!r}")
            head = method == "HEAD"
            if url.path in ("/", "/index.html", "/live/", "/live/index.html"):
                return self._page("index.html", head)
            if url.path.startswith("/live/"):
                return self._page(url.path[len("/live/"):], head)
            if url.path == "/api/model":
                return self._json(self.live.model_json())
            if url.path == "/api/unit":
                layer, unit = self._layer_unit(q, need_unit=True)
                if self.live.atlas is None:
                    return self._json({"layer": layer, "unit": unit, "in_atlas": False,
                                       "reason": "no atlas: start with --atlas STORE"})
                return self._json(self.live.atlas.entry(layer, unit))
            if url.path.startswith("/atlas/"):
                return self._atlas_object(url.path, head)
            raise HTTPError(HTTPStatus.NOT_FOUND, f"not found: {url.path!r}")
        except HTTPError as e:
            self._fail(e)

    # ---- GET helpers
    def _page(self, name: str, head: bool):
        if name not in PAGE_FILES:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"not found: /live/{name}")
        extra = {"Content-Security-Policy": CSP} if name == "index.html" else None
        self._send(HTTPStatus.OK, (PAGE_DIR / name).read_bytes(), PAGE_FILES[name], head, extra)

    def _atlas_object(self, path: str, head: bool):
        from deepvis.atlas_viewer.server import parse_path
        from deepvis.storage.base import content_type
        from deepvis.storage.store import LinkOutsideStore

        if self.live.atlas is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, "no atlas: start with --atlas STORE")
        try:
            key = parse_path(path[len("/atlas"):])
        except UnicodeDecodeError:
            key = None
        if not key or not key.startswith(("units/", "crops/", "inputs/", "viewer/")) \
                or any(p.startswith(".tmp-") for p in key.split("/")):
            raise HTTPError(HTTPStatus.NOT_FOUND if key else HTTPStatus.BAD_REQUEST, "not an atlas object")
        try:
            data = self.live.atlas.store.get(key)
        except (KeyError, ValueError):
            raise HTTPError(HTTPStatus.NOT_FOUND, f"{key!r} is not in the atlas") from None
        except LinkOutsideStore:   # a link in the atlas to elsewhere on this machine
            raise HTTPError(HTTPStatus.FORBIDDEN, f"{key!r} is a link out of the atlas; refused") from None
        except Exception as e:
            raise HTTPError(HTTPStatus.BAD_GATEWAY, f"atlas store error: {e}") from None
        self._send(HTTPStatus.OK, data, content_type(key), head)

    def _layer_unit(self, q: dict, need_unit: bool) -> tuple[str, int | None]:
        layer = q.get("layer") or self.live.default_layer
        if layer not in self.live.names:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"unknown layer {layer!r}; GET /api/model lists the layers")
        raw = q.get("unit")
        if raw in (None, ""):
            if need_unit:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "missing ?unit=N")
            return layer, None
        try:
            unit = int(raw)
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"unit must be an integer, got {raw!r}") from None
        n = next(l.units for l in self.live.layers if l.name == layer)
        if not 0 <= unit < n:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"unit {unit} is out of range for layer {layer!r} (0..{n - 1})")
        return layer, unit

    # ---- POST helpers
    def _discard_body(self):
        try:
            n = self._length()
        except HTTPError:
            self.close_connection = True     # where the body ends is unknown: no next request
            return
        if n is None or not self._drain(n):
            self.close_connection = True

    def _length(self) -> int | None:
        """The request's Content-Length (None when absent). One plain decimal number, or 400: '-1'
        once read the body to its end, past --max-upload-mb; '+5', ' 5', '5_0' are what int()
        accepts and no HTTP peer means; two different lengths are a smuggling attempt."""
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return None
        raw = values[0].strip()
        if len(set(v.strip() for v in values)) > 1 or not raw.isascii() or not raw.isdigit():
            shown = ", ".join(values)[:60]
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {shown!r}: send the body's size in bytes, "
                                                    f"one decimal number", close=True)
        return int(raw) if len(raw) <= 18 else 10 ** 18

    def _drain(self, n: int) -> bool:
        """Read and drop n bytes; False when the client went away first."""
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                return False
            n -= len(chunk)
        return True

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") is not None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the image with a Content-Length, not chunked",
                            close=True)
        n = self._length()
        if n is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the image with a Content-Length", close=True)
        limit = self.live.max_bytes
        if n > limit:
            mb = limit / 1e6
            msg = f"the upload is {n / 1e6:.1f} MB; the limit is {mb:g} MB (start with --max-upload-mb to change it)"
            drained = n <= DRAIN_LIMIT and self._drain(n)
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, msg, close=not drained)
        if n == 0:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "empty body: POST the image's bytes")
        data = self.rfile.read(n)
        if len(data) < n:   # the client disconnected mid-frame: nobody to answer
            raise ConnectionAbortedError
        return data

    def _image(self, data: bytes):
        """The project's one decoder (storage.images), with the limits for uploads."""
        try:
            return decode(data, LIMITS)
        except ImageTooLarge as e:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"the image is refused: {e} (limits: {LIMITS.max_side:,} pixels a side, "
                            f"{LIMITS.max_pixels:,} pixels, {LIMITS.max_aspect:g}:1)") from None
        except BadImage as e:
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            f"not an image this server can decode ({e}); send a JPEG, PNG or WebP frame") from None

    def _input(self, q: dict, need_unit: bool):
        """Body + query -> (client, layer, unit, preprocessed tensor, decode ms)."""
        from deepvis.tasks.preprocess import preprocess

        data = self._body()
        layer, unit = self._layer_unit(q, need_unit)
        t0 = time.perf_counter()
        x = preprocess(self._image(data), self.live.lm.preprocessing)
        return (q.get("client") or "")[:64], layer, unit, x, (time.perf_counter() - t0) * 1e3

    def _frame(self, q: dict):
        from deepvis.tasks.errors import UserError

        try:
            client, layer, unit, x, decode_ms = self._input(q, need_unit=False)
        except ConnectionAbortedError:
            self.close_connection = True
            return
        live = self.live
        ticket = live.gate.ticket(client)
        with live.lock:
            if live.gate.stale(client, ticket):
                raise HTTPError(HTTPStatus.CONFLICT, "dropped: a newer frame from this client arrived")
            t0 = time.perf_counter()
            try:
                res = live.model.frame(x, layer, unit)
            except UserError as e:
                raise HTTPError(HTTPStatus.BAD_REQUEST, str(e)) from None
            forward_ms = (time.perf_counter() - t0) * 1e3
            live.frames += 1
        t1 = time.perf_counter()
        body = {"layer": layer, "shape": list(res.shape), "rows": res.rows, "cols": res.cols, "sep": 1,
                "tile": list(res.shape[1:]) if len(res.shape) == 3 else [1, 1],
                "range": [_finite(v) for v in res.range], "top5": res.top5, "strongest": res.unit_argmax,
                "grid": _png_url(res.grid), "unit": res.unit}
        if res.unit is not None:
            body.update(unit_map=_png_url(res.unit_map), unit_max=_finite(res.unit_max))
        body["ms"] = {"decode": round(decode_ms, 1), "model": round(forward_ms, 1),
                      "encode": round((time.perf_counter() - t1) * 1e3, 1)}
        self._json(body)

    def _gradient(self, q: dict):
        from deepvis.tasks.errors import UserError

        try:
            _client, layer, unit, x, _ = self._input(q, need_unit=True)
        except ConnectionAbortedError:
            self.close_connection = True
            return
        with self.live.lock:
            try:
                g = self.live.model.gradient(x, layer, unit)
            except UserError as e:
                raise HTTPError(HTTPStatus.BAD_REQUEST, str(e)) from None
        self._send(HTTPStatus.OK, _png(g), "image/png")


def _finite(v):
    import math
    return None if v is None or not math.isfinite(v) else float(v)


def _png(arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)   # speed over size: it is local
    return buf.getvalue()


def _png_url(arr) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(arr)).decode("ascii")


# ---------------------------------------------------------------- setup
def default_layer(layers) -> str:
    """A middle block with a spatial map (the grid is more telling than a vector's)."""
    spatial = ([l for l in layers if len(l.shape) == 3 and l.kind == "block"]
               or [l for l in layers if len(l.shape) == 3] or list(layers))
    return spatial[len(spatial) // 2].name


def bind_server(host: str = "127.0.0.1", port: int = 0, max_connections: int = 64,
                timeout: float = 60.0) -> GuardedHTTPServer:
    """The live server's socket, bound and listening, not yet answering: `deepvis live` binds before
    it loads the model, so a port in use is reported at once. attach() gives it the model."""
    return GuardedHTTPServer((host, port), LiveHandler, max_connections, timeout)


def attach(server: GuardedHTTPServer, lm, atlas_store=None, layer: str | None = None, max_bytes: int = 20_000_000,
           device: str = "cpu", verbose: bool = False) -> GuardedHTTPServer:
    """Give a bound server its model (and atlas); bad layer -> UserError. Then call serve_forever."""
    from deepvis.tasks.errors import UserError
    from deepvis.tasks.layers import enumerate_layers

    layers = enumerate_layers(lm.module, lm.input_size, extra=[layer] if layer else None, device=device)
    if layer is not None and layer not in {l.name for l in layers}:
        raise UserError(f"layer {layer!r} has no image-shaped output; run `deepvis layers {lm.name}`")
    atlas = AtlasLink(atlas_store, lm.name, lm.weights) if atlas_store is not None else None
    live = Live(lm, device, layers, layer or default_layer(layers), atlas, max_bytes)
    server.RequestHandlerClass = type("Handler", (LiveHandler,), {"live": live, "verbose": verbose})
    return server


def make_server(lm, host: str = "127.0.0.1", port: int = 0, atlas_store=None, layer: str | None = None,
                max_bytes: int = 20_000_000, device: str = "cpu", verbose: bool = False,
                max_connections: int = 64, timeout: float = 60.0) -> GuardedHTTPServer:
    """The live server for a loaded model (not started: call serve_forever). Bad layer -> UserError."""
    server = bind_server(host, port, max_connections, timeout)
    try:
        return attach(server, lm, atlas_store, layer, max_bytes, device, verbose)
    except BaseException:
        server.server_close()
        raise
