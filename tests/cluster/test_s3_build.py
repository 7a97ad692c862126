"""An atlas built straight into a real S3 server (SeaweedFS) reads back like the same build on disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from deepvis.cluster.build import run_build
from deepvis.cluster.config import BuildConfig
from tests.s3server import SeaweedServer, s3_server_fixture

ARGS = dict(layers="_blocks.1,_fc", units="0:4", presets="yosinski-3", steps=8, size=32, shard_units=2,
            shard_images=4, k=2, actors=2)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    yield from s3_server_fixture(tmp_path_factory, bucket="atlas-e2e")


@pytest.fixture(scope="module")
def dataset(sample_dir, tmp_path_factory) -> str:
    files = sorted(sample_dir.glob("*/*.JPEG"))[::67][:12]
    path = tmp_path_factory.mktemp("ds") / "images.txt"
    path.write_text("".join(f"{f}\n" for f in files))
    return str(path)


def cli(*args, env: dict, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "deepvis.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env}, **kw)


def build_args(dataset: str, out: str, endpoint: str) -> list[str]:
    flags = []
    for k, v in {**ARGS, "dataset": dataset}.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return ["build", *flags, "--out", out, "--endpoint-url", endpoint, "--no-progress"]


def comparable(key: str, data: bytes):
    if key.startswith("viewer/data/") and key.endswith(".json"):
        obj = json.loads(data)
        return {k: v for k, v in obj.items() if k not in ("version", "generated", "build")}
    return data


def test_build_into_s3_matches_local(ray_cluster, s3_server, dataset, tmp_path):
    local = tmp_path / "local"
    summary = run_build(BuildConfig(**ARGS, dataset=dataset, out=str(local), progress=False))
    assert summary["status"] == "complete"
    env = s3_server.env()
    uri = f"s3://{s3_server.bucket}/atlases/one"
    r = cli(*build_args(dataset, uri, s3_server.endpoint_url), env=env)
    assert r.returncode == 0, r.stderr
    assert uri in r.stdout

    c = s3_server.client()
    keys = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix="atlases/one/"):
        for o in page.get("Contents", []):
            keys[o["Key"][len("atlases/one/"):]] = o["Key"]
    skip = ("_build/", "manifest.json")
    s3_keys = {k for k in keys if not k.startswith(skip)}
    local_keys = {p.relative_to(local).as_posix() for p in local.rglob("*")
                  if p.is_file() and not p.relative_to(local).as_posix().startswith(skip)}
    assert s3_keys == local_keys and any(k.endswith(".png") for k in s3_keys)
    for k in sorted(s3_keys):
        body = c.get_object(Bucket=s3_server.bucket, Key=keys[k])
        assert comparable(k, body["Body"].read()) == comparable(k, (local / k).read_bytes()), k
        if k.endswith((".png", ".jpg", ".html", ".parquet")):
            assert body["ContentType"] in ("image/png", "image/jpeg", "text/html", "application/vnd.apache.parquet")
    manifest = c.get_object(Bucket=s3_server.bucket, Key=keys["manifest.json"])["Body"].read().decode()
    assert s3_server.secret_key not in manifest and s3_server.access_key not in manifest

    for args in (["query", "--layer", "_fc", "--unit", "1", "-k", "2", "--json"],
                 ["query", "--layer", "_blocks.1", "--unit", "3", "--bottom", "--json"],
                 ["status", "--json"]):
        a = cli(args[0], uri, *args[1:], "--endpoint-url", s3_server.endpoint_url, env=env)
        b = cli(args[0], str(local), *args[1:], env={})
        assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
        ja, jb = json.loads(a.stdout), json.loads(b.stdout)
        if args[0] == "status":   # how long each build's phases took differs run to run, by nature
            assert set(ja.pop("phases")) == set(jb.pop("phases")) >= {"plan", "dataset", "crops", "viewer"}
        assert ja == jb and ja


def test_wrong_secret_and_missing_bucket_fail_clearly(s3_server, dataset):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    r = cli(*build_args(dataset, f"s3://{s3_server.bucket}/x", s3_server.endpoint_url), env=env, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "wrong-secret" not in r.stderr
    r = cli("status", "s3://no-such-bucket-here/x", "--endpoint-url", s3_server.endpoint_url,
            env=s3_server.env(), timeout=60)
    assert r.returncode == 2 and "no-such-bucket-here" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_server_stopped_mid_build_then_resumed(dataset, tmp_path, monkeypatch):
    server = SeaweedServer(tmp_path / "data", bucket="flaky")
    server.start()
    try:
        env, uri = server.env(), "s3://flaky/atlas"
        args = build_args(dataset, uri, server.endpoint_url)
        args[args.index("--steps") + 1] = "30"
        args[args.index("--shard-units") + 1] = "1"
        proc = subprocess.Popen([sys.executable, "-m", "deepvis.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
        c = server.client()
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            got = c.list_objects_v2(Bucket="flaky", Prefix="atlas/_build/done/").get("KeyCount", 0)
            if got >= 2:
                break
            time.sleep(0.1)
        server.stop()
        out, err = proc.communicate(timeout=180)
        assert proc.returncode != 0, "the build finished before the server was stopped"
        assert "Traceback" not in err and "deepvis build: error:" in err
        assert err.strip().splitlines()[-1].startswith("deepvis build: error:")

        server.start()
        r = cli(*args, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "skipped (already finished)" in r.stdout and " 0 skipped (already" not in r.stdout
        # every unit exactly once
        import pyarrow.parquet as pq
        from deepvis.storage.s3 import S3Store
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        store = S3Store.from_uri(uri, endpoint_url=server.endpoint_url)
        for name in ("units", "topk"):
            t = pq.read_table(store.open(f"index/{name}.parquet")).to_pylist()
            ids = [(r["layer"], r["unit"]) + ((r["kind"], r["rank"]) if name == "topk" else ()) for r in t]
            assert len(ids) == len(set(ids)) == (8 if name == "units" else 8 * 2 * 2)
        pngs = [k for k in store.list("units/") if k.endswith(".png")]
        assert len(pngs) == 8
    finally:
        server.stop()


def test_dataset_from_s3_prefix_matches_local_folder(s3_server, sample_dir, tmp_path):
    """`--dataset s3://bucket/prefix` gives the same top-k index as the same images in a local folder."""
    files = sorted(sample_dir.glob("*/*.JPEG"))[::100][:8]
    local_ds = tmp_path / "ds"
    c = s3_server.client()
    for f in files:
        rel = f.relative_to(sample_dir).as_posix()
        (local_ds / rel).parent.mkdir(parents=True, exist_ok=True)
        (local_ds / rel).write_bytes(f.read_bytes())
        c.put_object(Bucket=s3_server.bucket, Key=f"datasets/sample/{rel}", Body=f.read_bytes())
    c.put_object(Bucket=s3_server.bucket, Key="datasets/sample/bad/broken.jpg", Body=b"not a jpeg")
    (local_ds / "bad").mkdir()
    (local_ds / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    common = ["build", "--layers", "_fc", "--presets", "none", "--k", "2", "--actors", "1", "--no-progress",
              "--endpoint-url", s3_server.endpoint_url]
    env = s3_server.env()
    a = cli(*common, "--dataset", f"s3://{s3_server.bucket}/datasets/sample", "--out", str(tmp_path / "a"), env=env)
    b = cli(*common, "--dataset", str(local_ds), "--out", str(tmp_path / "b"), env=env)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert (tmp_path / "a/index/topk.parquet").read_bytes() == (tmp_path / "b/index/topk.parquet").read_bytes()
    m = json.loads((tmp_path / "a/manifest.json").read_text())
    assert m["dataset"]["uri"] == f"s3://{s3_server.bucket}/datasets/sample"
    assert m["dataset"]["images"] == 9 and [s["image"] for s in m["dataset"]["skipped"]] == ["bad/broken.jpg"]
