"""The store interface, its key rules and content types: what every backend (store.LocalStore,
s3.S3Store) builds on. Backends import this module, never each other."""
from __future__ import annotations

import mimetypes
import os


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

    def local_path(self, key: str) -> str | None:
        """A filesystem path for the key when the store is local (for viewers), else None."""
        return None


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}")
    return key
