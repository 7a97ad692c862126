"""`deepvis submit` against a real multi-node Ray cluster on this machine: a head (`ray start --head`,
with the dashboard's Job Submission API on 127.0.0.1) and a worker node (`ray start --address=...`),
each with 1 CPU, so the build's two actors sit on different nodes. Then the worker node's raylet is
killed mid-build and the build must still finish with every unit exactly once."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepvis.storage import layout
from tests.conftest import ROOT
from tests.s3server import free_ports

BIN = Path(sys.executable).parent


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the direct children of pid (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == pid:
                out.append((int(d.name), comm))
    return out


class MultiNode:
    """A head and one worker node, each `ray start --block` in its own process group (so the test
    stops exactly the processes it started, by group id)."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="dvmn", dir="/tmp")      # short: Ray's socket paths
        self.gcs, self.dash, self.client_port = free_ports(3)
        # Ray >= 2.59 requires a token; one of our own, given to every process of this cluster
        # (nodes, `deepvis submit`) explicitly, so nothing depends on ~/.ray or on what else ran first
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    # notice a lost node in ~3 s instead of ~30 s
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_initial_delay_ms": "1000", "PYTHONDONTWRITEBYTECODE": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = f"http://127.0.0.1:{self.dash}"

    def _start(self, name: str, args: list[str]):
        log = open(Path(self.tmp) / f"{name}.log", "w")
        # every node's agents on ports of their own: two nodes (and the tests' own Ray) share this host
        listen, grpc, metrics, runtime_env = free_ports(4)
        ports = [f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
                 f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]
        self.procs[name] = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
                                             "--node-ip-address=127.0.0.1", *ports, *args],
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self):
        self._start("head", ["--head", f"--port={self.gcs}", "--num-cpus=1", "--num-gpus=0",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dash}", f"--ray-client-server-port={self.client_port}",
                             f"--temp-dir={self.tmp}/ray"])
        self._wait(lambda: len(self.nodes()) == 1, "the head node")
        self._start("worker", [f"--address=127.0.0.1:{self.gcs}", "--num-cpus=1", "--num-gpus=0",
                               '--resources={"deepvis_worker": 1}'])
        self._wait(lambda: len(self.nodes()) == 2, "the worker node")

    def _wait(self, cond, what: str, timeout: float = 90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    pytest.fail(f"ray start ({name}) exited: {self.log(name)[-2000:]}")
            try:
                if cond():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{what} did not come up in {timeout} s: {self.log('head')[-2000:]}")

    def log(self, name: str) -> str:
        return (Path(self.tmp) / f"{name}.log").read_text(errors="replace")

    def nodes(self) -> list[dict]:
        """The alive nodes, from the dashboard's state API."""
        req = urllib.request.Request(f"{self.address}/api/v0/nodes")
        req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=5) as r:
            rows = json.load(r)["data"]["result"]["result"]
        return [n for n in rows if n["state"] == "ALIVE"]

    def kill_worker_raylet(self) -> int:
        kids = [pid for pid, comm in _children(self.procs["worker"].pid) if comm == "raylet"]
        assert len(kids) == 1, _children(self.procs["worker"].pid)
        os.kill(kids[0], signal.SIGKILL)
        return kids[0]

    def stop(self):
        for p in self.procs.values():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    continue
            # the group may outlive its leader for a moment
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = MultiNode()
    try:
        c.start()
        CLUSTER_ENV.update(c.env)
        yield c
    finally:
        CLUSTER_ENV.clear()
        c.stop()


@pytest.fixture(scope="module")
def dataset(sample_dir, tmp_path_factory):
    ds = tmp_path_factory.mktemp("mnds")
    for f in sorted(sample_dir.glob("*/*.JPEG"))[::50][:16]:
        shutil.copy(f, ds / f.name)
    return ds


CLUSTER_ENV: dict = {}   # the running MultiNode's environment (its token), for `deepvis submit`


def submit(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepvis.cli", "submit", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env=CLUSTER_ENV or None)


def build_args(ds, out):
    # small shards (1 unit, 4 images), so that the node is lost with most of the work still to do
    return ["build", "--model", "efficientnet_lite0", "--layers", "_blocks.1,_fc", "--units", "0:6",
            "--presets", "yosinski-3", "--steps", "12", "--size", "32", "--dataset", str(ds), "--k", "3",
            "--shard-units", "1", "--shard-images", "4", "--batch-size", "4", "--out", str(out), "--no-progress"]


def assert_every_unit_once(out: Path, units=range(6), layers=("_blocks.1", "_fc"), k=3):
    m = json.loads((out / layout.MANIFEST).read_text())
    assert m["status"] == "complete", m.get("failed_shards")
    rows = pq.read_table(out / layout.UNITS).to_pylist()
    assert sorted((r["layer"], r["unit"]) for r in rows) == sorted((l, u) for l in layers for u in units)
    top = pq.read_table(out / layout.TOPK).to_pylist()
    keys = [(r["layer"], r["unit"], r["kind"], r["rank"]) for r in top]
    assert len(keys) == len(set(keys)) == len(layers) * len(units) * 2 * k
    for l in layers:
        for u in units:
            assert (out / layout.unit_key(l, u, "yosinski-3.png")).is_file()
    assert all((out / r["input"]).is_file() for r in top)
    return m


def same_atlas(a: Path, b: Path):
    """Identical unit images, input images and indexes (the manifest holds times and hosts: not compared)."""
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*")  # noqa: E731
                                if p.is_file() and (p.suffix in (".png", ".jpg") and p.parts[len(root.parts)] in ("units", "inputs")
                                                    or p.suffix == ".parquet"))
    fa, fb = files(a), files(b)
    assert fa == fb and fa
    for f in fa:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def record_pids(paths) -> set:
    """The processes that wrote these completion records (written whole: temp file, then rename)."""
    pids = set()
    for p in paths:
        try:
            pids.add(json.loads(p.read_text()).get("pid"))
        except (OSError, ValueError):
            pass
    return pids


def test_submit_build_and_survive_a_lost_node(cluster, dataset, tmp_path, ray_cluster):
    # 1. a small build, submitted, followed to the end: the command's exit code is the job's
    out = tmp_path / "atlas"
    r = submit("--address", cluster.address, "--working-dir", str(ROOT), "--", *build_args(dataset, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[complete]" in r.stdout and "SUCCEEDED, exit code 0" in r.stderr
    m = assert_every_unit_once(out)
    nodes = {a["node"] for a in m["build"]["actors"]}
    assert len(m["build"]["actors"]) == 2 and nodes == {n["node_id"] for n in cluster.nodes()}  # one per node

    # the reference: the same build on this process's own local Ray cluster
    from deepvis.cluster.build import run_build
    from deepvis.cli import build_parser
    from deepvis.cli.build import config_from_args
    ref = tmp_path / "reference"
    run_build(config_from_args(build_parser().parse_args(build_args(dataset, ref))))
    same_atlas(out, ref)

    # 2. the same build again, with small shards; the worker node's raylet is killed mid-build
    out2 = tmp_path / "atlas2"
    r = submit("--address", cluster.address, "--working-dir", str(ROOT), "--no-wait", "--",
               *build_args(dataset, out2))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().splitlines()[-1]
    deadline = time.time() + 300
    while time.time() < deadline:
        done = list((out2 / layout.RECORDS).rglob("*.json")) if (out2 / layout.RECORDS).exists() else []
        # both actors at work (records of two processes, one per node): the node to be lost has an
        # actor with shards in flight, so the build must lose it and redo them
        if len(done) >= 2 and len(record_pids(done)) >= 2:
            break
        time.sleep(0.1)
    assert len(record_pids(done)) >= 2 and len(done) < 12 + 4 - 4, \
        f"the build was not mid-way with both actors working when the node was to be lost: {len(done)} records"
    cluster.kill_worker_raylet()
    while time.time() < deadline and len(cluster.nodes()) != 1:     # the head notices in ~3 s
        time.sleep(0.5)
    assert len(cluster.nodes()) == 1
    # follow it to the end through `--status`
    while time.time() < deadline:
        st = submit("--address", cluster.address, "--status", job)
        if "SUCCEEDED" in st.stdout or "FAILED" in st.stdout or "STOPPED" in st.stdout:
            break
        time.sleep(1)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout, st.stdout + st.stderr + \
        submit("--address", cluster.address, "--logs", job).stdout[-3000:]
    m2 = assert_every_unit_once(out2)
    logs = submit("--address", cluster.address, "--logs", job).stdout
    assert m2["build"]["actors_lost"] >= 1, (len(done), m2["build"]["actors"], logs[-3000:])
    same_atlas(out2, ref)
    assert "actor(s) lost" in logs and "their shards were redone" in logs


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("deepvis submit: error: ") and "Traceback" not in r.stderr, r.stderr
    return err


def test_submit_errors(cluster, dataset, tmp_path):
    (port,) = free_ports(1)
    err = _one_line(submit("--address", f"http://127.0.0.1:{port}", "--status", "raysubmit_x"))
    assert "cannot reach the Ray dashboard" in err and str(port) in err
    err = _one_line(submit("--address", f"http://127.0.0.1:{port}", "--", *build_args(dataset, tmp_path / "a")))
    assert "cannot reach the Ray dashboard" in err
    for flag in ("--status", "--logs", "--stop"):
        err = _one_line(submit("--address", cluster.address, flag, "raysubmit_doesnotexist"))
        assert "no job 'raysubmit_doesnotexist'" in err, flag
    err = _one_line(submit("--address", cluster.address, "--", "build", "--model", "efficientnet_lite0",
                           "--out", "relative/atlas"))
    assert "relative path" in err and "s3://" in err
    err = _one_line(submit("--address", cluster.address))
    assert "nothing to submit" in err
    r = submit("--address", cluster.address, "--", "build", "--modle", "x")
    err = _one_line(r)
    assert "not valid" in err and "--modle" in r.stderr
    err = _one_line(submit("--address", cluster.address, "--", "live", "--model", "efficientnet_lite0"))
    assert "interactive or local" in err
    err = _one_line(submit("--address", "ray://127.0.0.1:10001", "--status", "x"))
    assert "Ray Client address" in err


def test_submit_returns_the_jobs_exit_code(cluster, tmp_path):
    """A build that fails on the cluster (an unknown layer: exit code 2 there) fails here with 2,
    and its one-line error comes through the streamed logs."""
    r = submit("--address", cluster.address, "--working-dir", str(ROOT), "--", "build", "--model",
               "efficientnet_lite0", "--layers", "no_such_layer", "--out", str(tmp_path / "a"), "--no-progress")
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "deepvis build: error: unknown layer" in r.stdout + r.stderr
    assert "FAILED" in r.stderr and "exit code 2" in r.stderr
