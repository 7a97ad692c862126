"""Credentials in --endpoint-url (issue #17 item 5) never reach the atlas, the logs or the progress
output: a real build into a real S3 server (SeaweedFS) with `http://key:secret@host` as the
endpoint, then every object of the atlas and everything the commands printed is searched."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.s3server import s3_server_fixture

USER, SECRET = "AKIDINURL", "s3cr3t-in-the-url-0123456789"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    yield from s3_server_fixture(tmp_path_factory, bucket="atlas-secrets")


def cli(*args, env: dict, timeout=600):
    return subprocess.run([sys.executable, "-m", "deepvis.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def test_endpoint_credentials_never_written_or_printed(s3_server, sample_dir, tmp_path):
    images = tmp_path / "images.txt"
    images.write_text("".join(f"{f}\n" for f in sorted(sample_dir.glob("*/*.JPEG"))[::200][:4]))
    endpoint = s3_server.endpoint_url.replace("://", f"://{USER}:{SECRET}@", 1)
    env = {k: v for k, v in s3_server.env().items() if k != "AWS_ENDPOINT_URL"}
    uri = f"s3://{s3_server.bucket}/leak"
    build = cli("build", "--layers", "_fc", "--units", "0:2", "--presets", "yosinski-3", "--steps", "4",
                "--size", "32", "--dataset", images, "--k", "2", "--actors", "1", "--out", uri,
                "--endpoint-url", endpoint, env=env)     # progress bars on: they are output too
    assert build.returncode == 0, build.stderr
    status = cli("status", uri, "--endpoint-url", endpoint, env=env)
    query = cli("query", uri, "--layer", "_fc", "--unit", "0", "--endpoint-url", endpoint, env=env)
    unreachable = cli("status", uri, "--endpoint-url", f"http://{USER}:{SECRET}@127.0.0.1:1/?token={SECRET}",
                      env=env, timeout=120)
    assert status.returncode == 0 and query.returncode == 0, (status.stderr, query.stderr)
    assert unreachable.returncode == 2 and "127.0.0.1:1" in unreachable.stderr
    client = s3_server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=s3_server.bucket, Prefix="leak/") for o in page.get("Contents", [])]
    assert "leak/manifest.json" in keys and "leak/index/units.parquet" in keys
    blobs = {k: client.get_object(Bucket=s3_server.bucket, Key=k)["Body"].read() for k in keys}
    printed = {f"{name}.{stream}": getattr(r, stream) for name, r in
               (("build", build), ("status", status), ("query", query), ("unreachable", unreachable))
               for stream in ("stdout", "stderr")}
    for secret in (SECRET, USER, s3_server.secret_key):
        assert [k for k, data in blobs.items() if secret.encode() in data] == []
        assert [k for k, text in printed.items() if secret in text] == []
    # the endpoint itself is kept (it says where the atlas was built), without its userinfo
    assert s3_server.endpoint_url.encode() in blobs["leak/manifest.json"]
