"""The server of `deepvis serve STORE`: browse an atlas locally. Serves a directory, or proxies any store
(s3://bucket/prefix) object by object through `store.get`, with the standard library's
ThreadingHTTPServer. Read-only; binds 127.0.0.1 unless told otherwise.

Routes: `/` -> redirect to /viewer/index.html; `/<key>` -> the atlas object <key>; `/dataset/<id>` ->
the full source image of a top/bottom-k row, only when the user named the dataset's directory
(`--dataset DIR`, or `--dataset-from-manifest` after seeing the path): an atlas is data someone else
may have made, and must not choose which local files are served. Only ids that are in
index/topk.parquet and resolve, links included, inside that directory are served.
Paths with '..', '.', empty segments, backslashes or NUL, however encoded, are refused (400); an
atlas object that is a link out of the atlas is refused (403, storage.store.LinkOutsideStore).
Both servers (this and `live`'s) check Host against DNS rebinding (421), time out stalled clients and
bound their connections (503): GuardedHTTPServer, GuardedHandler."""
from __future__ import annotations

import os
import socket
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


def manifest_dataset_root(manifest: dict) -> str | None:
    """The local directory that the manifest says the dataset was (None for none, S3, or gone). It is
    what the atlas claims, not a place to trust: `serve` uses it only when the user says so."""
    uri = ((manifest.get("dataset") or {}).get("uri")) or ""
    if not uri or "://" in uri or not os.path.exists(uri):
        return None
    from deepvis.storage.datasets import dataset_root
    try:
        return dataset_root(uri)
    except Exception:   # noqa: BLE001 - an unusable claim is no dataset
        return None


class DatasetFiles:
    """The source images an atlas links to: image ids of index/topk.parquet under `root`, a directory
    the user named (never one the atlas chose on its own). Ids loaded once, on first use."""

    def __init__(self, store, root: str):
        self.store = store
        self.root = os.path.realpath(root)
        self._ids: set[str] | None = None
        self._lock = threading.Lock()

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
        """The file to serve for an indexed id, every link resolved, or None: it must stay in root."""
        if os.path.isabs(image_id) or image_id not in self.ids():
            return None
        full = os.path.realpath(os.path.join(self.root, *image_id.split("/")))
        if os.path.commonpath([full, self.root]) != self.root or not os.path.isfile(full):
            return None
        return full


# ---------------------------------------------------------------- what both servers share
class GuardedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_connections` connections at a time (one thread each;
    beyond that a client gets 503 at once) and a socket timeout for each, so a client that sends
    half a request frees its thread. Used by `serve` and `live`."""
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = 64, timeout: float = 30.0):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.request_timeout = timeout
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            return self._refuse_busy(request)
        try:
            super().process_request(request, client_address)   # starts the connection's thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse_busy(self, request):
        body = b"503 Service Unavailable: too many connections; retry in a moment\n"
        try:
            request.settimeout(1)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                            b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" % len(body) + body)
            request.setblocking(False)
            while request.recv(65536):   # drop what the client sent, so the close is not a reset
                pass
        except OSError:
            pass
        finally:   # the plain close: no lingering in the accepting thread
            ThreadingHTTPServer.shutdown_request(self, request)

    def shutdown_request(self, request):
        """Close as a careful server does: stop sending, read and drop what the client still sends
        (bounded: 1 MB, 1 s), then close. Closing with unread bytes would reset the connection, and
        the client could lose the refusal it was just sent (a 400 for a bad Content-Length)."""
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(1)
            left = 1 << 20
            while left > 0 and (chunk := request.recv(65536)):
                left -= len(chunk)
        except OSError:
            pass
        self.close_request(request)

    def host_allowed(self, header: str | None) -> bool:
        """Is `header` (a request's Host) a name of this server? Against DNS rebinding, where a
        page of evil.example reaches 127.0.0.1 under its own name: only 127.0.0.1, localhost, ::1
        and the bound address pass (any IP literal when bound to all interfaces), with our port."""
        import ipaddress
        import re

        bound, port = self.server_address[:2]
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?", header or "")
        if not m or int(m.group(2) or 80) != port:
            return False
        name = m.group(1).strip("[]").lower()
        if name in ("127.0.0.1", "localhost", "::1", str(bound).lower()):
            return True
        if bound in ("0.0.0.0", "::", ""):
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return name == socket.gethostname().lower()
        return False


class GuardedHandler(BaseHTTPRequestHandler):
    """The request handler both servers share: the server's socket timeout and the Host check."""
    # a request line without a version ('GET /x') is HTTP/0.9 to the standard library, which then
    # answers with a bare body and no status line or headers (no nosniff, no CSP): speak 1.0 instead
    default_request_version = "HTTP/1.0"
    # the library's own refusals (400, 414, 431, 501, 505) as one plain-text line, not an HTML page
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def setup(self):
        self.timeout = self.server.request_timeout      # StreamRequestHandler applies it to the socket
        super().setup()

    def host_refusal(self) -> tuple[HTTPStatus, str] | None:
        """(status, one-line message) when the request's Host is missing or not this server's."""
        hosts = self.headers.get_all("Host") or []
        if not hosts:
            return HTTPStatus.BAD_REQUEST, "missing Host header"
        if len(hosts) > 1 or not self.server.host_allowed(hosts[0].strip()):
            port = self.server.server_address[1]
            return (HTTPStatus.MISDIRECTED_REQUEST,
                    f"Host {hosts[0][:100]!r} is not this server's; open http://127.0.0.1:{port}/")
        return None


# ---------------------------------------------------------------- server
class AtlasHandler(GuardedHandler):
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
        if self.dataset is not None:
            self.send_header("X-Deepvis-Dataset", "1")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, head: bool):
        self._send(status, f"{status.value} {status.phrase}\n".encode(), head=head)

    def _serve(self, head: bool):
        refused = self.host_refusal()
        if refused is not None:
            self.close_connection = True
            status, msg = refused
            return self._send(status, f"{status.value} {status.phrase}: {msg}\n".encode(), head=head,
                              extra={"Connection": "close"})
        self._serve_key(head)

    def _serve_key(self, head: bool):
        from deepvis.storage.base import content_type
        from deepvis.storage.store import LinkOutsideStore

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
        except LinkOutsideStore as e:   # a link in the atlas that points elsewhere on this machine
            self.log_error("refused: %s", e)
            return self._error(HTTPStatus.FORBIDDEN, head)
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


def make_server(store, host: str = "127.0.0.1", port: int = 0, dataset: str | None = None,
                verbose: bool = False, max_connections: int = 64, timeout: float = 30.0) -> GuardedHTTPServer:
    """An HTTP server for the atlas in `store` (bound, not started: call serve_forever). `dataset`:
    the directory to serve /dataset/<id> from (the user's choice; None: no /dataset/ route)."""
    from deepvis.storage import layout

    layout.read_manifest(store)    # a clear error when the store holds no atlas
    handler = type("Handler", (AtlasHandler,), {
        "store": store, "verbose": verbose,
        "dataset": DatasetFiles(store, dataset) if dataset else None})
    return GuardedHTTPServer((host, port), handler, max_connections, timeout)


def check_port(port: int) -> None:
    """A --port that no socket can take is a one-line error before anything starts."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; pick one in 1..65535 (0 picks a free one)")


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
