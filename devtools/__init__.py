"""Developer tooling shared by tests/ and bench/: a real S3 server (s3server), a synthetic atlas, its
HTTP server and headless Chromium (viewer). Not installed with deepvis, not test code: bench/ must
not import tests/ (tests/deploy/test_manifests.py checks it)."""
