"""The one-namespace install, for real: a wheel built from this checkout and installed (no deps, no
index) into a fresh venv puts nothing but `deepvis` and its dist-info at the top of site-packages and
carries the package data; and a build run from a folder holding its own `tasks.py` and `storage/`
(names the checkout uses at its top) never imports them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import distributions
from pathlib import Path

import pytest

from tests.conftest import ROOT

# what a wheel build reads; copied to a scratch folder so the build leaves nothing in the checkout
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "deepvis", "cluster", "tasks", "storage", "atlas_viewer")
BUILD_BACKEND_MIN = (77,)   # pyproject: setuptools>=77 (PEP 639 license metadata)


def _setuptools_path() -> str:
    """The sys.path entry holding the newest setuptools this interpreter can see: `pip wheel
    --no-build-isolation` (no network) imports the backend from the running environment."""
    found = [(tuple(int(x) for x in d.version.split(".")[:2]), str(d.locate_file("")))
             for d in distributions(name="setuptools")]
    if not found or max(found)[0] < BUILD_BACKEND_MIN:
        pytest.fail(f"setuptools>={BUILD_BACKEND_MIN[0]} (the build backend pyproject.toml names) is not "
                    f"installed here: {sorted(found)}")
    return max(found)[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(p, src / name)
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PYTHONPATH": _setuptools_path(), "PIP_NO_INDEX": "1"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("deepvis_atlas-*.whl")
    return whl


def test_wheel_installs_only_deepvis(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    before = set(os.listdir(site)) if site.is_dir() else set()
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    added = set(os.listdir(site)) - before
    dist_info = [n for n in added if n.endswith(".dist-info")]
    assert added == {"deepvis", *dist_info} and dist_info == [wheel.name.split("-")[0] + "-"
                                                               + wheel.name.split("-")[1] + ".dist-info"], added
    # the RECORD agrees: every installed file lies under those two (plus the console script)
    record = (site / dist_info[0] / "RECORD").read_text().splitlines()
    tops = {line.split(",")[0].split("/")[0] for line in record}
    assert tops - {"deepvis", dist_info[0]} <= {"..", ""}, tops   # ../../../bin/deepvis
    assert (venv / "bin" / "deepvis").is_file()
    # the installed tree imports as one namespace without the checkout (deepvis/__init__ has no deps)
    r = subprocess.run([str(py), "-c", "import deepvis, deepvis.tasks, deepvis.storage, deepvis.cluster, "
                        "deepvis.atlas_viewer; print(deepvis.tasks.__file__)"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(str(site / "deepvis" / "tasks")), r.stdout + r.stderr


def test_wheel_carries_package_data_and_metadata(wheel):
    """Every data file of tasks/data, atlas_viewer/static and atlas_viewer/live (as they are in the
    checkout) is in the wheel under deepvis/; the metadata states license, Python and the extras."""
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for folder, pattern in (("tasks/data", "*"), ("atlas_viewer/static", "**/*"), ("atlas_viewer/live", "*")):
        for f in (ROOT / folder).glob(pattern):
            if f.is_file() and f.suffix not in (".py", ".pyc"):
                want.add("deepvis/" + f.relative_to(ROOT).as_posix())
    assert {"deepvis/tasks/data/imagenet_classes.tsv", "deepvis/atlas_viewer/static/index.html",
            "deepvis/atlas_viewer/live/live.js"} <= want
    assert want <= names, sorted(want - names)
    assert {n.split("/")[0] for n in names} == {"deepvis", next(n.split("/")[0] for n in names if ".dist-info/" in n)}
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    assert meta["License-Expression"] == "MIT"
    assert "LICENSE" in meta.get_all("License-File")
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["Requires-Python"] == ">=3.11"
    assert {"demo", "test"} <= set(meta.get_all("Provides-Extra"))
    demo = [r for r in meta.get_all("Requires-Dist") if 'extra == "demo"' in r]
    assert demo and demo[0].startswith("scikit-image")


def test_build_from_a_folder_with_its_own_tasks_and_storage(tmp_path, sample_dir):
    """A real `deepvis build` (local Ray, 1 layer, 2 units, no presets, 4 sample images) run from a
    folder whose own `tasks.py` and `storage/` raise when imported: deepvis imports only deepvis.*,
    in the driver and in the Ray workers (which put the driver's folder on their sys.path)."""
    work = tmp_path / "project"
    (work / "storage").mkdir(parents=True)
    boom = "raise RuntimeError('the user\\'s {} was imported')\n"
    (work / "tasks.py").write_text(boom.format("tasks.py"))
    (work / "storage" / "__init__.py").write_text(boom.format("storage/"))
    (work / "cluster.py").write_text(boom.format("cluster.py"))
    ds = work / "images"
    ds.mkdir()
    for f in sorted(sample_dir.glob("*/*.JPEG"))[::200][:4]:
        shutil.copy(f, ds / f.name)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the trap works: from this folder a plain `import tasks` is the user's
    r = subprocess.run([sys.executable, "-c", "import tasks"], cwd=work, capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "the user's tasks.py was imported" in r.stderr
    r = subprocess.run([sys.executable, "-m", "deepvis.cli", "build", "--model", "efficientnet_lite0",
                        "--layers", "_conv_stem", "--units", "0:2", "--presets", "none", "--dataset", "images",
                        "--k", "1", "--out", "atlas", "--no-progress", "--actors", "1"],
                       cwd=work, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "was imported" not in r.stdout + r.stderr
    from deepvis.storage.atlas import Atlas
    atlas = Atlas.open(str(work / "atlas"))
    assert atlas.manifest["status"] == "complete" and atlas.manifest["dataset"]["images_seen"] == 4
    for unit in (0, 1):
        rows = atlas.top_images("_conv_stem", unit, k=1)
        assert len(rows) == 1 and (work / "atlas" / rows[0]["crop"]).is_file()
