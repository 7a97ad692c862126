"""Shared fixtures: the real ImageNet sample, the offline model, a real local Ray cluster."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = SHARED / "datasets" / "imagenet-sample"
CLASSES = SHARED / "datasets" / "imagenet-classes.tsv"

# A suite started in the background by a non-interactive shell (`make test &`) inherits SIGINT as
# ignored, and so would every CLI subprocess that tests stop with SIGINT (a build resumed after
# Ctrl-C, `deepvis serve` stopping): they would run on. Restore Python's handler, as on a terminal;
# subprocesses then start with the default action again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} not present")
    return SAMPLE


@pytest.fixture(scope="session")
def lite0():
    from deepvis.tasks.models import load_model
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster for the whole session (2 CPUs, no dashboard)."""
    import logging

    import ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             runtime_env={"env_vars": {"PYTHONDONTWRITEBYTECODE": "1"}})
    yield ray
    ray.shutdown()


# torch's own default thread count, read before any test or fixture could change it (a module-scoped
# fixture that runs an in-process ShardWorker runs before a function fixture's setup)
import torch as _torch  # noqa: E402
_TORCH_THREADS = _torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """An in-process ShardWorker sets torch's thread count for its actor (1 on CPU); later tests in
    the session must not inherit it: oneDNN's rounding (and so a marginal optimization) depends on
    it, and a suite left at 1 thread ran its optimization tests at half speed. Every test ends at
    torch's default, read before any test could change it."""
    yield
    if _torch.get_num_threads() != _TORCH_THREADS:
        _torch.set_num_threads(_TORCH_THREADS)
