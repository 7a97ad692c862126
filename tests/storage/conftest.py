"""Fixtures for the storage tests: a real S3 server (SeaweedFS `weed mini`, started once per session
on free loopback ports with generated keys, stopped by PID at the end) and an isolated AWS
environment (no host credentials, profiles or instance metadata leak into the tests)."""
from __future__ import annotations

import uuid

import pytest

from tests.s3server import SeaweedServer, s3_server_fixture


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> SeaweedServer:
    """The running server: .endpoint_url, .access_key, .secret_key, .bucket, .region, .env(),
    .client(); .stop()/.start()/.restart() keep the data dir and ports (don't stop this shared one:
    use `own_s3_server`)."""
    yield from s3_server_fixture(tmp_path_factory)


@pytest.fixture
def own_s3_server(tmp_path):
    """A private server for tests that stop and restart it."""
    server = SeaweedServer(tmp_path / "data", bucket="own-bucket")
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def isolated_aws_env(monkeypatch, tmp_path):
    """No AWS settings from the host: every test sets what it needs."""
    import os
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials of the session server in the environment (the standard AWS chain), no endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    return s3_server


@pytest.fixture
def s3_store(s3_env):
    """An S3Store on the session server under a prefix of its own."""
    from deepvis.storage.s3 import S3Store
    return S3Store(s3_env.bucket, f"t/{uuid.uuid4().hex[:12]}", endpoint_url=s3_env.endpoint_url)
