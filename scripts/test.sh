#!/usr/bin/env bash
# Run the whole test suite. Services the tests need are started by the test fixtures themselves
# (local Ray cluster, S3 server) and stopped by PID when the session ends.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest -q "$@"
