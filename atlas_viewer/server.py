"""The server of `deepvis serve STORE`: browse an atlas locally. Serves a directory, or proxies any store
(s3://bucket/prefix) object by object through `store.get`, with the standard library's
ThreadingHTTPServer. Read-only; binds 127.0.0.1 unless told otherwise.

Routes: `/` -> redirect to /viewer/index.html; `/<key>` -> the atlas object <key>; `/dataset/<id>` ->
the full source image of a top/bottom-k row, when the manifest's dataset is a local directory or
list file (only ids that are in index/topk.parquet: nothing else of the disk is reachable).
Paths with '..', '.', empty segments, backslashes or NUL, however encoded, are refused (400)."""
from __future__ import annotations

import os
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from deepvis.tasks.errors import UserError


INDEX = "/viewer/index.html"


# ---------------------------------------------------------------- paths
def parse_path(raw: str) -> str | None:
    """The request target -> '/'-separated relative key, '' for the root; None when refused."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return None                                  # absolute-form URIs and the like
    path = unquote(path, errors="strict") if "%" in path else path
    if "\\" in path or "\x00" in path or any(ord(c) < 32 for c in path):
        return None
    rel = path[1:]
    if rel == "":
        return ""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return rel


class DatasetFiles:
    """The source images an atlas links to: image ids of index/topk.parquet under the dataset root.
    Loaded once, on first use."""

    def __init__(self, store, manifest: dict):
        self.store = store
        uri = ((manifest.get("dataset") or {}).get("uri")) or ""
        self.root = None
        if uri and "://" not in uri and os.path.exists(uri):
            from deepvis.storage.datasets import dataset_root
            try:
                self.root = os.path.abspath(dataset_root(uri))
            except Exception:
                self.root = None
        self._ids: set[str] | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def ids(self) -> set[str]:
        with self._lock:
            if self._ids is None:
                from deepvis.storage import layout
                ids: set[str] = set()
                if self.store.exists(layout.TOPK):
                    ids = set(layout.read_table(self.store, layout.TOPK, columns=["image"])
                              .column("image").to_pylist())
                self._ids = ids
            return self._ids

    def path(self, image_id: str) -> str | None:
        if not self.enabled or os.path.isabs(image_id) or image_id not in self.ids():
            return None
        full = os.path.abspath(os.path.join(self.root, *image_id.split("/")))
        if os.path.commonpath([full, self.root]) != self.root or not os.path.isfile(full):
            return None
        return full


# ---------------------------------------------------------------- server
class AtlasHandler(BaseHTTPRequestHandler):
    server_version = "deepvis"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body go in two writes: no 40 ms delayed-ACK stall

    # set on the subclass made by make_server
    store = None
    dataset: DatasetFiles | None = None
    verbose = False

    def do_GET(self):
        self._serve(head=False)

    def do_HEAD(self):
        self._serve(head=True)

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain; charset=utf-8",
              head: bool = False, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")
        if self.dataset is not None and self.dataset.enabled:
            self.send_header("X-Deepvis-Dataset", "1")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, head: bool):
        self._send(status, f"{status.value} {status.phrase}\n".encode(), head=head)

    def _serve(self, head: bool):
        from deepvis.storage.base import content_type

        if self.path.split("?", 1)[0].split("#", 1)[0] in ("/", "/viewer", "/viewer/"):
            return self._send(HTTPStatus.FOUND, head=head, extra={"Location": INDEX})
        try:
            key = parse_path(self.path)
        except UnicodeDecodeError:
            key = None
        if key is None:
            return self._error(HTTPStatus.BAD_REQUEST, head)
        if key == "":
            return self._send(HTTPStatus.FOUND, head=head, extra={"Location": INDEX})
        if key.startswith("dataset/"):
            return self._serve_dataset(key[len("dataset/"):], head)
        if any(p.startswith(".tmp-") for p in key.split("/")):
            return self._error(HTTPStatus.NOT_FOUND, head)
        try:
            data = self.store.get(key)
        except (KeyError, ValueError):
            return self._error(HTTPStatus.NOT_FOUND, head)
        except Exception as e:  # a store error (network, permissions): say so, keep serving
            self.log_error("store error for %r: %s", key, e)
            return self._error(HTTPStatus.BAD_GATEWAY, head)
        self._send(HTTPStatus.OK, data, content_type(key), head=head)

    def _serve_dataset(self, image_id: str, head: bool):
        from deepvis.storage.base import content_type

        path = self.dataset.path(image_id) if self.dataset is not None else None
        if path is None:
            return self._error(HTTPStatus.NOT_FOUND, head)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return self._error(HTTPStatus.NOT_FOUND, head)
        ctype = content_type(path)
        if not ctype.startswith("image/") or ctype == "image/svg+xml":
            ctype = "application/octet-stream"
        # a dataset file is data, never a page of this origin
        self._send(HTTPStatus.OK, data, ctype, head=head,
                   extra={"Content-Security-Policy": "default-src 'none'; sandbox"})


def make_server(store, host: str = "127.0.0.1", port: int = 0, dataset: bool = True,
                verbose: bool = False) -> ThreadingHTTPServer:
    """An HTTP server for the atlas in `store` (not started: call serve_forever)."""
    from deepvis.storage import layout

    manifest = layout.read_manifest(store)
    handler = type("Handler", (AtlasHandler,), {
        "store": store, "verbose": verbose,
        "dataset": DatasetFiles(store, manifest) if dataset else None})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def listen_error(host: str, port: int, e: OSError) -> UserError:
    """The one-line error of a server that cannot bind host:port (port in use, bad address)."""
    return UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port (0 picks a free one)")


def server_url(server, path: str) -> str:
    """The URL to print for a server bound to host:port (0.0.0.0 shown as 127.0.0.1, IPv6 in [])."""
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[%s]" % host if ":" in host else host)
    return f"http://{shown}:{port}{path}"


def serve_until_interrupted(server, url: str, exposes: str, open_browser: bool = False,
                            stopped=lambda: "stopped") -> None:
    """Warn when bound beyond this machine (anyone reaching the port can `exposes`), optionally open
    the browser, serve until Ctrl-C, print stopped() and close the socket."""
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {host}: anyone who can reach this machine on port {port} can {exposes}",
              flush=True)
    print("press Ctrl-C to stop", flush=True)
    if open_browser:
        import webbrowser
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(stopped(), flush=True)
    finally:
        server.server_close()
