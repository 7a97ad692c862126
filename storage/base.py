"""The store interface, its key rules and content types: what every backend (store.LocalStore,
s3.S3Store) builds on. Backends import this module, never each other."""
from __future__ import annotations

import mimetypes
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


CONTENT_TYPES = {".json": "application/json", ".parquet": "application/vnd.apache.parquet",
                 ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".html": "text/html",
                 ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
                 ".svg": "image/svg+xml", ".txt": "text/plain"}


def content_type(key: str) -> str:
    ext = os.path.splitext(key)[1].lower()
    return CONTENT_TYPES.get(ext) or mimetypes.guess_type(key)[0] or "application/octet-stream"


class Store:
    """Interface. `uri` is the store's own address, printed to users (never holds credentials)."""
    uri: str

    def put(self, key: str, data: bytes) -> None: raise NotImplementedError
    def get(self, key: str) -> bytes: raise NotImplementedError
    def exists(self, key: str) -> bool: raise NotImplementedError
    def list(self, prefix: str = "") -> list[str]: raise NotImplementedError
    def delete(self, key: str) -> None: raise NotImplementedError
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write the object only if no object has the key, atomically against concurrent writers
        (the build lease relies on it). True when written, False when the key already existed."""
        raise NotImplementedError
    def open(self, key: str):
        """A seekable binary file object for reading (Parquet readers fetch only the row groups
        they need). KeyError when missing."""
        raise NotImplementedError

    def get_or_none(self, key: str) -> bytes | None:
        try:
            return self.get(key)
        except KeyError:
            return None

    def list_many(self, prefixes: Iterable[str], max_inflight: int = 16) -> list[str]:
        """The keys under any of prefixes, sorted: what S3 lists side by side (S3Store), a local
        store walks once, from the prefixes' common start."""
        prefixes = tuple(sorted(set(prefixes)))
        if not prefixes:
            return []
        return [k for k in self.list(os.path.commonprefix(prefixes)) if k.startswith(prefixes)]

    def local_path(self, key: str) -> str | None:
        """A filesystem path for the key when the store is local (for viewers), else None."""
        return None

    def get_many(self, keys: Iterable[str], max_inflight: int = 16) -> Iterator[tuple[str, bytes | None]]:
        """(key, bytes or None when missing) for each key, in order, with at most max_inflight GETs
        running (a resume or `deepvis status` reads thousands of completion records: one S3 GET
        after another, 20-50 ms each, would take minutes). At most max_inflight results wait
        unread, so memory stays bounded; an error other than a missing key is raised in order."""
        if max_inflight <= 1:
            yield from ((k, self.get_or_none(k)) for k in keys)
            return
        window: deque = deque()
        with ThreadPoolExecutor(max_inflight, thread_name_prefix="store-get") as pool:
            try:
                for k in keys:
                    if len(window) >= max_inflight:
                        key, fut = window.popleft()
                        yield key, fut.result()
                    window.append((k, pool.submit(self.get_or_none, k)))
                while window:
                    key, fut = window.popleft()
                    yield key, fut.result()
            finally:                      # the caller stopped early or a GET failed: drop the rest
                for _, fut in window:
                    fut.cancel()

    def writer(self, max_inflight: int = 16) -> "Writer":
        """Puts in background threads, at most max_inflight at a time (an S3 PUT is 20-50 ms of
        waiting: one after another, a shard's thousands of objects would take minutes). Use as
        `with store.writer() as w: w.put(key, data)`; leaving the block waits for every upload and
        re-raises the first error, so what is written after the block (a completion record) is
        written only when all of them are in the store."""
        return Writer(self, max_inflight)


class Writer:
    """Bounded concurrent puts into one store (see Store.writer). `put` blocks while max_inflight
    uploads are running, so memory stays bounded; after a failed upload every later `put` raises at
    once, and `close` (the end of the `with` block) re-raises it after the running ones finished."""

    def __init__(self, store: Store, max_inflight: int = 16):
        self.store = store
        self.max_inflight = max(1, int(max_inflight))
        self.written = 0
        self._slots = threading.BoundedSemaphore(self.max_inflight)
        self._pool = ThreadPoolExecutor(self.max_inflight, thread_name_prefix="store-put") \
            if self.max_inflight > 1 else None
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def put(self, key: str, data: bytes | Callable[[], bytes]) -> None:
        """Upload `data`, or what the callable `data` returns: then the encoding (a PNG, a packed
        state) runs in the upload thread too, and the caller's thread (an actor's compute) goes on."""
        self._raise()
        if self._pool is None:          # one in flight: the caller's own thread, no hand-off
            self.store.put(key, data() if callable(data) else data)
            self.written += 1
            return
        self._slots.acquire()
        try:
            self._pool.submit(self._put, key, data)
        except BaseException:
            self._slots.release()
            raise

    def _put(self, key: str, data: bytes | Callable[[], bytes]) -> None:
        try:
            self.store.put(key, data() if callable(data) else data)
            with self._lock:
                self.written += 1
        except BaseException as e:  # noqa: BLE001 - kept and re-raised in the caller's thread
            with self._lock:
                self._error = self._error or e
        finally:
            self._slots.release()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every upload; re-raise the first error."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._raise()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._pool is not None:  # the block failed: still wait (no upload outlives it), keep its error
            self._pool.shutdown(wait=True)


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}")
    return key
