"""The build lease: one build at a time per store.

A build holds `_build/lease.json` ({holder, host, pid, user, started, heartbeat, token}) for as long
as it runs. It is taken with an atomic create-if-absent (S3 `If-None-Match: *`, locally a hard link
that fails when the name exists), so of two builds started at once into the same `--out` exactly
one gets it; the other stops with one line naming the holder. A heartbeat thread rewrites it every
HEARTBEAT_S seconds, so a lease whose heartbeat is older than STALE_S belongs to a build that died
without releasing it (SIGKILL, a lost machine): `deepvis status` says so, and `--force` takes it over.
The lease is deleted when the build ends, however it ends (complete, failed, Ctrl-C, SIGTERM)."""
from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from deepvis.storage.store import Store
from deepvis.tasks.errors import UserError

LEASE_KEY = "_build/lease.json"
HEARTBEAT_S = 30.0
STALE_S = 120.0   # four missed heartbeats: the holder is gone


@dataclass
class Lease:
    holder: str        # "host:pid", as printed
    host: str
    pid: int
    user: str
    started: float     # epoch seconds
    heartbeat: float   # epoch seconds of the last refresh
    token: str         # tells our lease from a successor's after a --force take-over

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.heartbeat)

    def stale(self, now: float | None = None) -> bool:
        return self.age(now) > STALE_S or self.gone()

    def gone(self) -> bool:
        """The holder ran on this machine and its process no longer exists: the build is over, whatever
        its last heartbeat says (a build stopped by a dead store could not release its lease)."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:      # it exists (another user's process)
            return False
        return False

    def describe(self) -> str:
        return f"{self.holder} (user {self.user}), last heartbeat {self.age():.0f} s ago"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return str(os.getuid())


def new_lease() -> Lease:
    host, pid, now = socket.gethostname(), os.getpid(), time.time()
    return Lease(f"{host}:{pid}", host, pid, _user(), now, now, uuid.uuid4().hex)


def read_lease(store: Store) -> Lease | None:
    """The lease in the store, or None (no build holds it, or the object is damaged/foreign)."""
    data = store.get_or_none(LEASE_KEY)
    if data is None:
        return None
    try:
        d = json.loads(data)
        return Lease(str(d["holder"]), str(d["host"]), int(d["pid"]), str(d["user"]),
                     float(d["started"]), float(d["heartbeat"]), str(d["token"]))
    except (ValueError, KeyError, TypeError):
        return None


def _encode(lease: Lease) -> bytes:
    return json.dumps(asdict(lease), indent=1).encode()


class BuildLease:
    """`with BuildLease(store, force, log):` holds the store's lease for the block (see module doc)."""

    def __init__(self, store: Store, force: bool = False, log=print, heartbeat_s: float = HEARTBEAT_S):
        self.store, self.force, self.log, self.heartbeat_s = store, force, log, heartbeat_s
        self.lease = new_lease()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False   # set when another build took the lease over (--force)

    def __enter__(self) -> "BuildLease":
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="deepvis-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.release()

    def acquire(self) -> None:
        for _ in range(3):   # a damaged lease object, or one deleted between our two reads: retry
            if self.store.put_if_absent(LEASE_KEY, _encode(self.lease)):
                return
            other = read_lease(self.store)
            if other is not None:
                return self._take_over(other)
        # the object exists but is not a lease we can read: a damaged one is taken, with a warning
        self.log(f"warning: replacing an unreadable build lease at {self.store.uri}/{LEASE_KEY}")
        self.store.put(LEASE_KEY, _encode(self.lease))

    def _take_over(self, other: Lease) -> None:
        if other.gone():
            self.log(f"taking over the lease of a build that is no longer running ({other.holder}: no such process)")
            self.store.put(LEASE_KEY, _encode(self.lease))
            return
        if not self.force:
            state = "it looks dead (no heartbeat for over 2 min)" if other.stale() else "it is running"
            raise UserError(f"another build holds {self.store.uri}: {other.describe()}; {state}. Wait for "
                            f"it to finish, use another --out, or, if that build is dead, re-run with --force")
        if not other.stale():
            self.log(f"warning: --force takes over the lease of a build that looks alive ({other.describe()}); "
                     f"if it is still running, both builds write {self.store.uri}: stop it")
        else:
            self.log(f"taking over the stale lease of {other.describe()}")
        self.store.put(LEASE_KEY, _encode(self.lease))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = read_lease(self.store)
                if current is not None and current.token != self.lease.token:
                    self.lost = True
                    self.log(f"warning: another build took over the lease of {self.store.uri} "
                             f"({current.describe()}); this build no longer holds it")
                    return
                self.lease.heartbeat = time.time()
                self.store.put(LEASE_KEY, _encode(self.lease))
            except Exception as e:  # noqa: BLE001 - a store hiccup must not kill the build; retried
                self.log(f"warning: could not refresh the build lease ({type(e).__name__}); retrying")

    def release(self) -> None:
        try:
            current = read_lease(self.store)
            if current is not None and current.token == self.lease.token:
                self.store.delete(LEASE_KEY)
        except Exception as e:  # noqa: BLE001 - the build's result matters more; the lease goes stale
            self.log(f"warning: could not release the build lease ({type(e).__name__}); it expires "
                     f"by itself {STALE_S:.0f} s after the last heartbeat")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the build stops, writes status 'interrupted', keeps its work."""


@contextmanager
def sigterm_interrupts():
    """Within the block, SIGTERM raises Terminated in the main thread (as Ctrl-C raises
    KeyboardInterrupt), so `finally`/`except` blocks record the interruption. Outside the main
    thread, nothing changes (signals are delivered to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def mark_interrupted(store: Store) -> None:
    """Rewrite a 'running' manifest as 'interrupted' (a manifest not yet written stays absent)."""
    from deepvis.storage import layout

    m = layout.get_json(store, layout.MANIFEST)
    if isinstance(m, dict) and m.get("status") == "running":
        m["status"] = "interrupted"
        m.setdefault("build", {})["interrupted"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        layout.put_json(store, layout.MANIFEST, m)


@contextmanager
def build_guard(store: Store, force: bool = False, log=print):
    """Hold the lease for the block; on Ctrl-C or SIGTERM, record 'interrupted' before letting go.
    ray.init replaces our SIGTERM handler with one that calls sys.exit(SIGTERM): that SystemExit is
    the same termination, so it is recorded and re-raised as Terminated."""
    with BuildLease(store, force, log), sigterm_interrupts():
        try:
            yield
        except KeyboardInterrupt:
            mark_interrupted(store)
            raise
        except SystemExit as e:
            if e.code != signal.SIGTERM:
                raise
            mark_interrupted(store)
            raise Terminated() from None
