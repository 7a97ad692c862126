"""The S3 server of the tests: devtools.s3server's SeaweedServer (shared with bench/), and the
session fixture body that starts one."""
from __future__ import annotations

from devtools.s3server import SeaweedNotFound, SeaweedServer, find_weed, free_ports  # noqa: F401  (re-exported)


def s3_server_fixture(tmp_path_factory, bucket: str = "deepvis-test"):
    """Generator body for a session-scoped pytest fixture (see tests/storage/conftest.py):

        @pytest.fixture(scope="session")
        def s3_server(tmp_path_factory):
            yield from s3_server_fixture(tmp_path_factory)
    """
    import pytest
    try:
        server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs") / "data", bucket=bucket)
    except SeaweedNotFound as e:
        pytest.fail(str(e))
    server.start()
    try:
        yield server
    finally:
        server.stop()
