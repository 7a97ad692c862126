"""Issue #17 item 10: the local Ray cluster of a build should listen on 127.0.0.1 only.

Ray 2.60's core servers (GCS, raylet, core workers) bind every interface whatever
`_node_ip_address` says (ray.init resolves 127.0.0.1 to the node's address, and the gRPC servers
listen on `*`), and no documented option changes that. Until Ray does (upstream: "eliminate 0.0.0.0
server bindings"), this test records the gap: strict xfail, so it fails loudly once it passes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, os, re, subprocess
from deepvis.cluster.build import connect
import ray
connect(None)
node = ray._private.worker._global_node
pids = {os.getpid()} | {i.process.pid for infos in node.all_processes.values() for i in infos}
listening = []
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
    if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids:
        listening.append(line.split()[3])
ray.shutdown()
print(json.dumps(listening))
"""


@pytest.mark.xfail(strict=True, reason="Ray 2.60 binds its gRPC servers to all interfaces; no option to stop it")
def test_local_cluster_listens_on_loopback_only():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    listening = json.loads(r.stdout.strip().splitlines()[-1])
    assert listening, "no listening socket of the cluster was found"
    assert [a for a in listening if not a.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"))] == []
