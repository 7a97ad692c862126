"""Fixtures of the viewer tests: a synthetic atlas written exactly as FORMAT.md lays it out (fast, any
size: the 1,024-unit layer), a real small build, an HTTP server on either, a headless Chromium. The
helpers live in devtools.viewer (bench/viewer.py uses them too) and are re-exported here."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from deepvis.storage import layout
from deepvis.storage.store import LocalStore
from devtools.viewer import (BIG, CHROMIUM, CHROMIUM_ARGS, MID, OUT, PRESETS, XSS_ERROR, XSS_FILE,  # noqa: F401
                             XSS_LABEL, XSS_LAYER, Served, launch_chromium, make_synthetic_atlas, serve)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The synthetic atlas (1,024-unit layer), published (viewer + data)."""
    from deepvis.atlas_viewer.publish import publish
    facts = make_synthetic_atlas(tmp_path_factory.mktemp("synthetic") / "atlas")
    t0 = time.perf_counter()
    facts["model_json"] = publish(facts["store"])
    facts["publish_s"] = time.perf_counter() - t0
    return facts


# ---------------------------------------------------------------- schema 3: crops cut from input images
# boxes of every kind (x0, y0, x1, y1 in the 224 px input): the whole image, small ones the viewer
# enlarges, a wide and a tall one, one just over the 120 px display size, a 10 x 5 sliver
SCHEMA3_BOXES = [(0, 0, 224, 224), (37, 50, 61, 98), (10, 20, 210, 120), (100, 3, 147, 50), (60, 60, 188, 188),
                 (5, 90, 15, 95), (150, 30, 210, 224)]


def structured_jpeg(size: int, seed: int) -> bytes:
    """A size x size JPEG (4:4:4, quality 95) in which a region differs from its neighbours: red ramps
    along x, green along y, blue is a 16 px checkerboard shifted by `seed`. A box cut a few pixels off,
    or scaled wrongly, compares far from the right one (random noise would average out)."""
    import io

    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // (size - 1), y * 255 // (size - 1),
                    (((x + 5 * seed) // 16 + y // 16) % 2) * 255], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def schema3_atlas(root: Path, big_units: int = 16) -> dict:
    """The synthetic atlas in schema 3 (one input image per dataset image, each row's crop its box
    cut from it), with the boxes of SCHEMA3_BOXES in turn (the missing crop's row keeps its own) and
    structured_jpeg inputs, so that a crop shown from the wrong place is seen."""
    import pyarrow.parquet as pq
    facts = make_synthetic_atlas(root, big_units=big_units, schema=3)
    store = facts["store"]
    rows = pq.read_table(root / layout.TOPK).to_pylist()
    for i, r in enumerate(rows):
        if (r["layer"], r["unit"], r["kind"], r["rank"]) != facts["missing_crop"]:
            r["x0"], r["y0"], r["x1"], r["y1"] = SCHEMA3_BOXES[i % len(SCHEMA3_BOXES)]
    layout.write_topk(store, {f.name: [r[f.name] for r in rows] for f in layout.TOPK_SCHEMA})
    for seed, key in enumerate(store.list(f"{layout.INPUTS}/")):
        store.put(key, structured_jpeg(224, seed))
    return facts


@pytest.fixture(scope="session")
def synthetic_server(synthetic):
    s = serve(synthetic["store"])
    yield s
    s.stop()


# ---------------------------------------------------------------- a real build
REAL_LAYERS = ["_blocks.1", "_fc"]
MISSING_UNIT = ("_blocks.1", 3)


@pytest.fixture(scope="session")
def real_atlas(ray_cluster, sample_dir, tmp_path_factory):
    """A real small build (efficientnet_lite0, 2 layers x 6 units, 12 real ImageNet images plus a
    copy named like markup), then one unit's PNG deleted and the viewer republished. Shared by the
    viewer's and `deepvis live`'s browser tests."""
    import shutil

    from deepvis.atlas_viewer.publish import publish
    from deepvis.cluster.build import run_build
    from deepvis.cluster.config import BuildConfig

    base = tmp_path_factory.mktemp("real")
    ds = base / "dataset"
    ds.mkdir()
    files = sorted(sample_dir.glob("*/*.JPEG"))[::67][:12]
    for f in files:
        shutil.copy(f, ds / f.name)
    shutil.copy(files[0], ds / XSS_FILE)
    out = base / "atlas"
    t0 = time.perf_counter()
    summary = run_build(BuildConfig(model="efficientnet_lite0", layers=",".join(REAL_LAYERS), units="0:6",
                                    presets="yosinski-3", steps=5, size=32, dataset=str(ds), k=3, out=str(out),
                                    progress=False, actors=1))
    assert summary["status"] == "complete", summary["failed_shards"]
    store = LocalStore(out)
    store.delete(layout.unit_key(*MISSING_UNIT, "yosinski-3.png"))
    publish(store)
    s = serve(store)
    yield {"root": out, "store": store, "server": s, "build_s": time.perf_counter() - t0}
    s.stop()


# ---------------------------------------------------------------- the browser
def require_playwright():
    """playwright.sync_api, with Debian's Chromium present. `make test` installs both; under CI a
    missing browser is a failure, never a silent skip."""
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    try:
        import playwright.sync_api as pw_mod
    except ImportError:
        missing("playwright is not installed (make test installs it)")
    if not os.path.exists(CHROMIUM):
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return pw_mod


@pytest.fixture(scope="session")
def browser():
    with require_playwright().sync_playwright() as pw:
        b = launch_chromium(pw)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (1280x800) that records dialogs and page errors; the test fails on either."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    pg.dialogs, pg.errors = [], []

    def on_dialog(d):
        pg.dialogs.append(d.message)
        d.dismiss()
    pg.on("dialog", on_dialog)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    # the viewer logs what it could not render; a 404 the test provoked is the browser's own line
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error"
          and not m.text.startswith("Failed to load resource") else None)
    yield pg
    ctx.close()
    assert pg.dialogs == [], f"a dialog opened: {pg.dialogs}"
    assert pg.errors == [], f"page errors: {pg.errors}"


def screenshot(pg, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    pg.screenshot(path=str(path), full_page=False)
    return path


def send_raw(address, data: bytes, timeout: float) -> bytes:
    """Send bytes as they are to (host, port), then read the whole answer (until the server closes
    or the timeout): the servers' tests of malformed and hostile requests."""
    with socket.create_connection(address, timeout=timeout) as s:
        out = b""
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, BrokenPipeError, OSError) as e:   # a refusal may close first
            if isinstance(e, TimeoutError):
                raise
        return out
