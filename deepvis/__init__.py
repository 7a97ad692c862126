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
