"""Object stores: one small interface, a local-directory backend (the embedded default) and, by URI
scheme, others (s3://bucket/prefix).

Keys are '/'-separated relative paths (layer names with dots are used verbatim). Every put is atomic:
a reader sees the whole object or none (local: write to a temp file in the same directory, then
os.replace)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from deepvis.storage.base import Store, Writer, check_key  # noqa: F401 (Store: the interface, re-exported)
from deepvis.storage.errors import StoreError

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {str(self.root)!r} is a file, not a directory; pass a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {str(self.root)!r}: {e.strerror}") from None
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a static web server must read it
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        parts = prefix.split("/")
        if prefix.startswith("/") or any(p in (".", "..") for p in parts) or "" in parts[:-1]:
            raise ValueError(f"invalid store key prefix {prefix!r}")
        base = self.root / prefix if prefix else self.root
        # a prefix may end mid-name ("units/features.3" matches "units/features.30/..."): walk the
        # parent unless the prefix names a directory explicitly (trailing '/')
        start = base if (not prefix or prefix.endswith("/")) else base.parent
        if not start.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(start):
            for f in files:
                if f.startswith(".tmp-"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def open(self, key: str):
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None

    def local_path(self, key: str) -> str | None:
        return str(self._path(key))

    def writer(self, max_inflight: int = 16) -> Writer:
        # a local write is a few system calls, not a network round trip: a few threads hide the
        # file-system latency, more would only compete with the compute for the cores
        return Writer(self, min(max_inflight, 4))


def open_store(uri: str, endpoint_url: str | None = None) -> Store:
    """'s3://bucket/prefix' -> S3 store (endpoint_url, else AWS_ENDPOINT_URL, for S3-compatible
    servers); 'file://path' or a plain path -> local directory."""
    if not uri or not str(uri).strip():
        raise StoreError("empty store address; pass a directory or s3://bucket/prefix")
    uri = str(uri)
    if uri.startswith("s3://"):
        try:
            from deepvis.storage.s3 import S3Store
        except ModuleNotFoundError:
            raise StoreError("S3 stores are not available in this version; use a local directory") from None
        return S3Store.from_uri(uri, endpoint_url=endpoint_url)
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"unsupported store address {uri!r}; use a directory path or s3://bucket/prefix")
    return LocalStore(uri[len("file://"):] if uri.startswith("file://") else uri)
