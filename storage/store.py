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


class LinkOutsideStore(StoreError):
    """A key whose path, through symbolic links, leads outside the store's root: refused, so that an
    atlas someone else made cannot make a reader (a server above all) return any other local file."""


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike, must_exist: bool = False):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {str(self.root)!r} is a file, not a directory; pass a directory")
        if must_exist and not self.root.is_dir():
            # a read-only command: a typo must not leave an empty directory behind
            raise StoreError(f"no atlas at {str(self.root)!r} (no such directory); check the path, or build "
                             f"one with `deepvis build --out ...`")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {str(self.root)!r}: {e.strerror}") from None
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _temp_for(self, path: Path) -> tuple[int, str]:
        """A temp file next to path; an unwritable store is one line naming it (StoreError)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        except OSError as e:
            raise StoreError(f"cannot write to the store {self.uri!r} ({e.strerror}: "
                             f"{os.path.relpath(e.filename or path, self.root)}); choose a directory you can "
                             f"write, or fix its permissions") from None

    def _write_temp(self, path: Path, data: bytes) -> str:
        """The whole object in a temp file beside `path`, readable as the umask allows; its name."""
        fd, tmp = self._temp_for(path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a static web server must read it
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _read_path(self, key: str) -> Path:
        """The path to read `key` from, every symbolic link resolved; LinkOutsideStore when that
        leaves the root. (Links inside the root are fine: a copied atlas may use them.)"""
        path = self._path(key)
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.root]) != str(self.root):
            raise LinkOutsideStore(f"store key {key!r} is a symbolic link that leads outside the store "
                                   f"({str(self.root)!r}); refused: copy the file into the store instead")
        return Path(real)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        # the whole object goes to a temp file first, then link() publishes it: link fails when the
        # name exists (an exclusive create, like O_CREAT|O_EXCL) and readers never see a partial file
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def get(self, key: str) -> bytes:
        try:
            return self._read_path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        try:
            return self._read_path(key).is_file()
        except LinkOutsideStore:
            return False             # and nothing said about what the link points at

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
        root = os.path.join(str(self.root), "")          # os.walk's paths start with it: slice, no relpath
        for dirpath, _dirs, files in os.walk(start):
            d = os.path.join(dirpath, "")[len(root):].replace(os.sep, "/")
            for f in files:
                if f.startswith(".tmp-"):
                    continue
                rel = d + f
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
            return open(self._read_path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def local_path(self, key: str) -> str | None:
        return str(self._path(key))

    def writer(self, max_inflight: int = 16) -> Writer:
        # a local write is a few system calls, not a network round trip: a few threads hide the
        # file-system latency, more would only compete with the compute for the cores
        return Writer(self, min(max_inflight, 4))

    def get_many(self, keys, max_inflight: int = 16):
        return super().get_many(keys, min(max_inflight, 4))   # as writer: a read is no round trip


def open_store(uri: str, endpoint_url: str | None = None, must_exist: bool = False) -> Store:
    """'s3://bucket/prefix' -> S3 store (endpoint_url, else AWS_ENDPOINT_URL, for S3-compatible
    servers); 'file://path' or a plain path -> local directory. must_exist (read-only commands): a
    local directory that does not exist is an error, not created (an S3 store never creates
    anything when opened; its bucket is checked)."""
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
    return LocalStore(uri[len("file://"):] if uri.startswith("file://") else uri, must_exist=must_exist)
