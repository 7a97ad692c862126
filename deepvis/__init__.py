"""deepvis-atlas: a browsable atlas of what every unit of every layer of an image network responds to."""
from __future__ import annotations

import os as _os

# In a source checkout the subpackages sit at the top of the repository (cluster/, tasks/, storage/,
# atlas_viewer/), beside this folder; an installed wheel has them inside it. Let the checkout import
# them as deepvis.* too (tests, bench, `deepvis submit --working-dir`, Ray workers started there).
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "tasks")) and _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    __path__.append(_root)  # noqa: F821 (a package's __path__)

# The public API. Kept import-light: `import deepvis` (and so `import deepvis.storage`, which loads
# this file first) pulls neither torch nor ray nor pyarrow; deepvis.api loads on first use.
from deepvis.errors import DeepvisError  # noqa: E402 (after the __path__ set-up above)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("deepvis-atlas")
    except PackageNotFoundError:   # a bare source checkout, not installed
        return "0+unknown"


__version__ = _version()
# not "open" in __all__: a star import must not shadow the builtin open
_API = ("Atlas", "Unit", "TopImage", "QueryHit", "Layer", "LayerStatus", "Status", "FailedShard")
__all__ = ["build", "DeepvisError", "__version__", *_API]


def open(uri, endpoint_url: str | None = None):  # noqa: A001 (deepvis.open, as in the notebook idiom)
    """The atlas at a directory or s3://bucket/prefix, as a deepvis.Atlas: `.layers`, `.status`,
    `.units()`, `.unit(layer, u)`, `.query_image(path)`; shown inline in Jupyter.
    endpoint_url: an S3-compatible server (else AWS_ENDPOINT_URL or AWS)."""
    from deepvis.api import open_atlas
    return open_atlas(uri, endpoint_url)


def build(**kwargs) -> dict:
    """`deepvis build` from Python: keyword arguments are the build flags (deepvis.cluster.config.
    BuildConfig keys, e.g. layers="_fc", presets="none", dataset=..., out=...); unknown keys raise
    DeepvisError. Returns the build summary dict (status, units, failed_shards, seconds, ...)."""
    from deepvis.api import build as _build
    return _build(**kwargs)


def __getattr__(name: str):
    if name in _API:
        from deepvis import api
        return getattr(api, name)
    raise AttributeError(f"module 'deepvis' has no attribute {name!r}")
