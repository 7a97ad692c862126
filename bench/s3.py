"""Object-storage write throughput: S3Store against a local SeaweedFS (`weed mini`), from 1 vs 2
parallel writers (Ray actors, as the atlas build writes).

    .venv/bin/python bench/s3.py [--small 2000 --small-kb 24 --large 4 --large-mb 32 --writers 1,2]

Starts its own server on free loopback ports in a temp dir (stopped by PID at the end), writes N
small objects (unit images) and a few large ones (Parquet indexes, multipart) per configuration,
prints MB/s and objects/s, and writes/replaces the "Object storage" section of BENCHMARKS.md.

    .venv/bin/python bench/s3.py --concurrent [--inflight 1,4,16,64 --small 2000 --small-kb 24]

measures one writer process instead, through `Store.writer(max_inflight=N)` (what the build's actors
use): objects/s with 1 upload in flight and with N, into the "Concurrent writes" section.

    .venv/bin/python bench/s3.py --reads [--inflight 1,4,16,64 --small 2000 --delay-ms 25]

reads back N shard completion records the way a resumed build does (cluster.build._finished_records,
Store.get_many with N GETs in flight), into the "Concurrent reads" section.

    .venv/bin/python bench/s3.py --list [--folders 24 --per-folder 1300 --delay-ms 25]

lists an ImageNet-shaped S3 dataset (folders of 1,300 images) the way the build does
(datasets.list_images: the folders side by side) and with one plain listing, as before, into the
"Dataset listing" section."""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmd import replace_section  # noqa: E402  (bench/ is the script directory)

SECTION = "## Object storage"
CONCURRENT = "## Concurrent writes"
READS = "## Concurrent reads"
LISTING = "## Dataset listing"


def make_writer_class(ray):
    @ray.remote(num_cpus=0.5)
    class Writer:
        def __init__(self, store, max_bytes: int, seed: int):
            self.store = store  # unpickled here: makes its own client, from this process's env
            self.payload = os.urandom(max_bytes)
            self.seed = seed

        def ready(self) -> bool:
            self.store.exists("warmup/none")  # client created, connection opened
            return True

        def write(self, keys: list[str], size: int) -> tuple[int, int, float]:
            t = time.perf_counter()
            for i, k in enumerate(keys):
                # distinct content per object (rotate the payload) without generating new bytes
                off = (i * 7919 + self.seed) % 4096
                self.store.put(k, self.payload[off:off + size])
            return len(keys), len(keys) * size, time.perf_counter() - t

    return Writer


def run(args) -> list[dict]:
    import ray

    from deepvis.storage.s3 import S3Store
    from devtools.s3server import SeaweedServer

    rows = []
    args.load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        server = SeaweedServer(Path(tmp) / "data", bucket="bench")
        server.start()
        try:
            os.environ.update(server.env())  # the standard AWS chain, for the driver and the actors
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
                     runtime_env={"env_vars": server.env()})
            Writer = make_writer_class(ray)
            small, large = args.small_kb * 1024, args.large_mb * 1024 * 1024
            for n_writers in args.writers:
                store = S3Store.from_uri(f"s3://bench/w{n_writers}")
                writers = [Writer.remote(store, max(small, large) + 4096, i) for i in range(n_writers)]
                ray.get([w.ready.remote() for w in writers])
                for kind, count, size in (("small", args.small, small), ("large", args.large, large)):
                    keys = ([f"units/features.{i % 13}/{i}/top-0.jpg" for i in range(count)] if kind == "small"
                            else [f"index/part-{i}.parquet" for i in range(count)])
                    shards = [keys[j::n_writers] for j in range(n_writers)]
                    t = time.perf_counter()
                    res = ray.get([w.write.remote(s, size) for w, s in zip(writers, shards)])
                    wall = time.perf_counter() - t
                    n = sum(r[0] for r in res)
                    nbytes = sum(r[1] for r in res)
                    rows.append({"writers": n_writers, "kind": kind, "objects": n, "size": size,
                                 "seconds": wall, "mb_s": nbytes / wall / 1e6, "obj_s": n / wall})
                    print(f"writers={n_writers} {kind:5s} {n:5d} x {size / 1024:8.0f} KiB  "
                          f"{wall:6.2f} s  {nbytes / wall / 1e6:7.1f} MB/s  {n / wall:7.1f} objects/s", flush=True)
                    assert len(store.list(keys[0].split("/")[0] + "/")) == count
                for w in writers:
                    ray.kill(w)
            args.load_after = os.getloadavg()[0]
        finally:
            try:
                ray.shutdown()
            finally:
                server.stop()
    return rows


def run_concurrent(args) -> list[dict]:
    """One process, one S3Store, Store.writer(max_inflight=N) for each N: objects/s."""
    from deepvis.storage.s3 import S3Store
    from devtools.s3server import SeaweedServer

    rows = []
    args.load_before = os.getloadavg()[0]
    payload = os.urandom(args.small_kb * 1024 + 4096)
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        server = SeaweedServer(Path(tmp) / "data", bucket="bench")
        server.start()
        try:
            os.environ.update(server.env())
            for n in args.inflight:
                store = S3Store.from_uri(f"s3://bench/inflight{n}")
                store.exists("warmup/none")                       # client made, connection open
                size = args.small_kb * 1024
                t = time.perf_counter()
                with store.writer(n) as w:
                    for i in range(args.small):
                        off = (i * 7919) % 4096
                        w.put(f"units/features.{i % 13}/{i}/top-0.jpg", payload[off:off + size])
                wall = time.perf_counter() - t
                assert len(store.list("units/")) == args.small
                rows.append({"inflight": n, "objects": args.small, "size": size, "seconds": wall,
                             "obj_s": args.small / wall, "mb_s": args.small * size / wall / 1e6})
                print(f"inflight={n:3d}  {args.small} x {size // 1024} KiB  {wall:6.2f} s  "
                      f"{args.small / wall:7.1f} objects/s", flush=True)
            args.load_after = os.getloadavg()[0]
        finally:
            server.stop()
    return rows


def run_reads(args) -> list[dict]:
    """Write args.small completion records once, then find them as a resumed build does
    (cluster.build._finished_records) with N GETs in flight, straight to the server and through a
    proxy that adds args.delay_ms to each reply (a remote store's round trip): records/s."""
    from deepvis.storage import layout
    from deepvis.storage.s3 import S3Store
    from devtools.latency import LatencyProxy
    from devtools.s3server import SeaweedServer

    rows = []
    args.load_before = os.getloadavg()[0]
    shards = [{"id": f"opt/layer.{i % 66}/{i}-{i + 16}", "hash": f"h{i}"} for i in range(args.small)]
    summary = {"rows": [{"unit": u, "preset": "yosinski-3", "act": 1.5, "dead": False} for u in range(16)]}
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        server = SeaweedServer(Path(tmp) / "data", bucket="bench")
        server.start()
        try:
            os.environ.update(server.env())
            store = S3Store.from_uri("s3://bench/records")
            with store.writer(16) as w:
                for sh in shards:
                    w.put(layout.record_key(sh["id"]), json.dumps({"id": sh["id"], "hash": sh["hash"],
                                                                    "summary": summary}).encode())
            args.size = len(store.get(layout.record_key(shards[0]["id"])))
            for delay in [0, *args.delay_ms]:
                with LatencyProxy(server.ports["s3"], delay / 1000) as proxy:
                    url = proxy.url if delay else server.endpoint_url
                    for n in args.inflight:
                        rows.append(_time_resume(S3Store.from_uri("s3://bench/records", endpoint_url=url),
                                                 shards, n, delay))
            args.load_after = os.getloadavg()[0]
        finally:
            server.stop()
    return rows


def _time_resume(store, shards: list[dict], n: int, delay: int) -> dict:
    from deepvis.cluster import build
    from deepvis.storage import s3

    real = s3.S3Store.get_many
    s3.S3Store.get_many = lambda self, keys, max_inflight=16: real(self, keys, n)   # the default, set to n
    try:
        store.exists("warmup/none")                       # client made, connection open
        t = time.perf_counter()
        done = build._finished_records(store, shards)
        wall = time.perf_counter() - t
    finally:
        s3.S3Store.get_many = real
    assert len(done) == len(shards)
    print(f"delay={delay:3d} ms  inflight={n:3d}  {len(shards)} records  {wall:6.2f} s  "
          f"{len(shards) / wall:7.1f} records/s", flush=True)
    return {"delay": delay, "inflight": n, "objects": len(shards), "seconds": wall, "obj_s": len(shards) / wall}


def markdown_reads(rows: list[dict], args) -> str:
    lines = [READS, "",
             f"`bench/s3.py --reads` ({time.strftime('%Y-%m-%d')}): a resumed build finds its finished "
             f"shards (`cluster.build._finished_records`: one LIST, then every completion record read "
             f"through `Store.get_many` with N GETs in flight; `deepvis status`, the crop phase's resume, "
             f"the tree merge and the viewer's optimization curves read the same way) — {args.small} "
             f"records of {args.size} B in {_where(args)}, straight to the server and through "
             f"`devtools/latency.py`, a loopback proxy that holds each reply {_ms(args.delay_ms)} (a remote "
             f"store's round trip). The default is 16 in flight; 1 in flight is how every record was "
             f"read before.", "",
             "| added latency | GETs in flight | records | seconds | records/s | × 1 in flight |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b["obj_s"] for b in rows if b["delay"] == r["delay"] and b["inflight"] == rows[0]["inflight"])
        lines.append(f"| {r['delay']} ms | {r['inflight']} | {r['objects']} | {r['seconds']:.2f} | "
                     f"{r['obj_s']:.1f} | {r['obj_s'] / base:.2f} |")
    return "\n".join(lines) + "\n"


def run_list(args) -> list[dict]:
    """An ImageNet-shaped dataset (args.folders x args.per_folder tiny objects), listed by
    datasets.list_images (folders side by side) and by one plain Store.list (before), straight to
    the server and through a proxy adding args.delay_ms a reply."""
    from deepvis.storage import datasets
    from deepvis.storage.s3 import S3Store
    from devtools.latency import LatencyProxy
    from devtools.s3server import SeaweedServer

    rows, n = [], args.folders * args.per_folder
    args.load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        server = SeaweedServer(Path(tmp) / "data", bucket="bench")
        server.start()
        try:
            os.environ.update(server.env())
            with S3Store.from_uri("s3://bench/train").writer(64) as w:
                for f in range(args.folders):
                    for i in range(args.per_folder):
                        w.put(f"n{f:08d}/n{f:08d}_{i}.JPEG", b"\xff\xd8")
            for delay in [0, *args.delay_ms]:
                with LatencyProxy(server.ports["s3"], delay / 1000) as proxy:
                    url = proxy.url if delay else server.endpoint_url
                    datasets._stores.clear()
                    for how, fn in (("one plain listing (before)", lambda: S3Store.from_uri(
                                        "s3://bench/train", endpoint_url=url).list("")),
                                    ("list_images: folders side by side", lambda: datasets.list_images(
                                        "s3://bench/train", endpoint_url=url))):
                        t = time.perf_counter()
                        got = fn()
                        wall = time.perf_counter() - t
                        assert len(got) == n, (how, len(got))
                        rows.append({"delay": delay, "how": how, "keys": n, "seconds": wall})
                        print(f"delay={delay:3d} ms  {how:36s} {n} keys  {wall:6.2f} s", flush=True)
            args.load_after = os.getloadavg()[0]
        finally:
            server.stop()
    return rows


def _where(args) -> str:
    return (f"a local SeaweedFS `weed mini` ({os.cpu_count()} CPUs, {platform.machine()}, Python "
            f"{platform.python_version()}; load average before/after {args.load_before:.1f}/{args.load_after:.1f})")


def _ms(delays: list[int]) -> str:
    return " or ".join(f"{d} ms" for d in delays)


def markdown_list(rows: list[dict], args) -> str:
    lines = [LISTING, "",
             f"`bench/s3.py --list` ({time.strftime('%Y-%m-%d')}): an ImageNet-shaped S3 dataset "
             f"({args.folders} folders of {args.per_folder} images, {args.folders * args.per_folder:,} keys) "
             f"listed as the build's plan lists `--dataset s3://...` (`datasets.list_images`: one delimited "
             f"LIST for the folders, then the folders' listings 16 at a time) and with one plain listing "
             f"(1,000 keys a page, one page after another: how it was listed before), in {_where(args)}, "
             f"straight to the server and through "
             f"`devtools/latency.py` adding {_ms(args.delay_ms)} to each reply. ImageNet train is 1,000 such "
             f"folders: 1,281 pages one after another.", "",
             "| added latency | listing | keys | seconds | × the plain listing |", "|---|---|---|---|---|"]
    for r in rows:
        base = next(b["seconds"] for b in rows if b["delay"] == r["delay"])
        lines.append(f"| {r['delay']} ms | {r['how']} | {r['keys']:,} | {r['seconds']:.2f} | "
                     f"{base / r['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def markdown_concurrent(rows: list[dict], args) -> str:
    base = rows[0]["obj_s"]
    lines = [CONCURRENT, "",
             f"`bench/s3.py --concurrent` ({time.strftime('%Y-%m-%d')}): one process writes "
             f"{args.small} objects of {args.small_kb} KiB (unit images) through `Store.writer(max_inflight=N)` "
             f"(the build's actors write every object this way; one boto3 client shared by the upload "
             f"threads) to a local SeaweedFS `weed mini` on the same machine ({os.cpu_count()} CPUs, "
             f"{platform.machine()}, Python {platform.python_version()}). Load average (1 min) before/after: "
             f"{args.load_before:.1f}/{args.load_after:.1f}"
             + (" (other jobs were competing for the CPUs)" if max(args.load_before, args.load_after)
                > (os.cpu_count() or 1) else "")
             + ". The server, the client and its threads share these CPUs, so the gain from N is a floor: "
               "against a remote object store (20-50 ms a PUT) the waiting that N uploads in flight hide is "
               "far larger than here.", "",
             "| uploads in flight | objects | seconds | objects/s | × 1 in flight |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['inflight']} | {r['objects']} | {r['seconds']:.2f} | {r['obj_s']:.1f} | "
                     f"{r['obj_s'] / base:.2f} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], args) -> str:
    import boto3

    from devtools.s3server import find_weed
    weed_v = subprocess.run([find_weed(), "version"], capture_output=True, text=True).stdout.strip()
    lines = [SECTION, "",
             f"`bench/s3.py` ({time.strftime('%Y-%m-%d')}): `S3Store.put` from Ray actors (num_cpus=0.5 each) "
             f"to a local SeaweedFS `weed mini` ({weed_v.split(' ')[2] if weed_v.count(' ') >= 2 else weed_v}) "
             f"on the same machine ({os.cpu_count()} CPUs, {platform.machine()}, Python "
             f"{platform.python_version()}, boto3 {boto3.__version__}). Small objects are unit images "
             f"(one PUT each); large ones are index files ({args.large_mb} MiB, multipart in 16 MiB parts "
             f"with 4 threads). Server and writers share the CPUs, so these numbers are a floor for a real "
             f"object store, and mostly measure per-request overhead for small objects. "
             f"Load average (1 min) before/after: {args.load_before:.1f}/{args.load_after:.1f}"
             + (" (other jobs were competing for the CPUs: rerun on an idle machine to compare)"
                if max(args.load_before, args.load_after) > (os.cpu_count() or 1) else "") + ".", "",
             "| writers | objects | size | seconds | MB/s | objects/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['size'] / 1024:.0f} KiB" if r["size"] < 1024 * 1024 else f"{r['size'] / 1024 / 1024:.0f} MiB"
        lines.append(f"| {r['writers']} | {r['objects']} {r['kind']} | {size} | {r['seconds']:.2f} | "
                     f"{r['mb_s']:.1f} | {r['obj_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=2000, help="number of small objects per configuration")
    ap.add_argument("--small-kb", type=int, default=24, help="size of a small object (KiB)")
    ap.add_argument("--large", type=int, default=4, help="number of large objects per configuration")
    ap.add_argument("--large-mb", type=int, default=32, help="size of a large object (MiB)")
    ap.add_argument("--writers", default="1,2", help="writer counts to compare, comma-separated")
    ap.add_argument("--no-md", action="store_true", help="don't update BENCHMARKS.md")
    ap.add_argument("--concurrent", action="store_true",
                    help="measure one process with N uploads in flight (Store.writer) instead")
    ap.add_argument("--reads", action="store_true",
                    help="measure reading completion records back as a resume does (Store.get_many) instead")
    ap.add_argument("--list", action="store_true",
                    help="measure listing an ImageNet-shaped S3 dataset (folders side by side vs one listing)")
    ap.add_argument("--folders", type=int, default=24, help="with --list: dataset folders")
    ap.add_argument("--per-folder", type=int, default=1300, help="with --list: images a folder (ImageNet's)")
    ap.add_argument("--delay-ms", type=lambda v: [int(x) for x in v.split(",")], default=[25],
                    help="with --reads or --list: latencies added to each reply by a loopback proxy, comma-separated "
                         "(default: 25; 0 is always measured)")
    ap.add_argument("--inflight", default="1,4,16,64",
                    help="uploads (or GETs, with --reads) in flight to compare, comma-separated")
    args = ap.parse_args(argv)
    args.writers = [int(x) for x in args.writers.split(",")]
    args.inflight = [int(x) for x in args.inflight.split(",")]
    mode = ("list" if args.list else "reads" if args.reads else "concurrent" if args.concurrent else "writers")
    measure, render, heading = {"list": (run_list, markdown_list, LISTING),
                                "reads": (run_reads, markdown_reads, READS),
                                "concurrent": (run_concurrent, markdown_concurrent, CONCURRENT),
                                "writers": (run, markdown, SECTION)}[mode]
    rows = measure(args)
    if not args.no_md:
        replace_section(ROOT / "BENCHMARKS.md", heading, render(rows, args))
        print(f"updated {ROOT / 'BENCHMARKS.md'} ({heading[3:]})")

if __name__ == "__main__":
    main()
