"""Fixtures of the viewer tests: a synthetic atlas written exactly as DESIGN.md lays it out (fast, any
size: the 1,024-unit layer), a real small build, an HTTP server on either, a headless Chromium."""
from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepvis.storage import layout
from deepvis.storage.store import LocalStore

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("DEEPVIS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

XSS_FILE = "<img src=x onerror=alert(1)>.jpg"
XSS_LAYER = "x<img src=x onerror=alert(2)>"
XSS_LABEL = "<b>bold</b><img src=x onerror=alert(3)> & \"quoted\""
XSS_ERROR = "RuntimeError: <script>alert(4)</script> actor died"

BIG = "conv.1"          # the 1,024-unit layer
MID = "block.2"         # 8 of 32 units: 1 missing image, 1 dead, 4 in a failed shard, 1 missing crop
OUT = "fc"              # output layer, class names
PRESETS = ["yosinski-3", "yosinski-1"]


# ---------------------------------------------------------------- the synthetic atlas
def _png(rng, size: int) -> bytes:
    """A smooth random colour image (like a regularized optimization result), PNG bytes."""
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((size, size), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(rng, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_synthetic_atlas(root: Path, big_units: int = 1024, topk: bool = True, units_index: bool = True,
                         presets: list[str] | None = None, img_size: int = 32, k: int = 3,
                         schema: int = 1) -> dict:
    """Write a synthetic atlas (and its dataset folder root/../<name>-dataset) following DESIGN.md.
    schema 1: per-unit crops units/<layer>/<unit>/<kind>-<rank>.jpg, topk without a `crop` column
    (atlases built before schema 2 must keep opening); schema 2: shared crops/<sha>.jpg named by the
    `crop` column. Returns facts the tests check against."""
    presets = PRESETS if presets is None else presets
    rng = np.random.default_rng(0)
    store = LocalStore(root)
    ds_root = Path(str(root) + "-dataset")
    ds_root.mkdir(parents=True, exist_ok=True)
    images = [f"n0{i:02d}/img_{i:03d}.JPEG" for i in range(10)] + [f"odd/{XSS_FILE}"]
    for im in images:
        (ds_root / im).parent.mkdir(parents=True, exist_ok=True)
        (ds_root / im).write_bytes(_jpg(rng, 48))
    labels = [f"class_{i}" for i in range(10)]
    labels[0] = XSS_LABEL
    layers = [
        {"name": BIG, "kind": "conv", "shape": [big_units, 7, 7], "units": big_units, "selected": list(range(big_units))},
        {"name": MID, "kind": "block", "shape": [32, 14, 14], "units": 32, "selected": list(range(8))},
        {"name": XSS_LAYER, "kind": "conv", "shape": [3, 4, 4], "units": 3, "selected": [0, 1, 2]},
        {"name": OUT, "kind": "linear", "shape": [10], "units": 10, "selected": list(range(10))},
    ]
    failed_units = {(MID, u) for u in range(4, 8)} if presets else set()
    dead_units = {(MID, 2)} if presets else set()
    missing_png = (MID, 1, presets[0]) if presets else None
    missing_crop = (MID, 0, "bottom", k - 1) if topk else None

    topk_schema = layout.TOPK_SCHEMA_V1 if schema == 1 else layout.TOPK_SCHEMA
    unit_rows, top_cols = [], {f.name: [] for f in topk_schema}
    histories = {}
    for l in layers:
        for u in l["selected"]:
            key = (l["name"], u)
            row = {"layer": l["name"], "unit": u}
            if topk:
                mean, std = float(rng.normal(0, 1)), float(rng.uniform(0.5, 2))
                row.update(mean=mean, std=std, max=mean + 3 * std, frac_positive=float(rng.uniform(0, 1)),
                           count=len(images))
            for p in presets:
                if key in failed_units:
                    continue
                row[f"opt_{p}"] = float(rng.uniform(1, 50))
                row[f"dead_{p}"] = key in dead_units
                if (l["name"], u, p) != missing_png:
                    store.put(layout.unit_key(l["name"], u, f"{p}.png"), _png(rng, img_size))
                if l["name"] == OUT:
                    histories.setdefault((l["name"], p), []).append(
                        {"unit": u, "preset": p, "activation": row[f"opt_{p}"], "dead": False,
                         "history": [float(x) for x in np.linspace(0, row[f"opt_{p}"], 20)]})
            unit_rows.append(row)
            if topk and l["name"] != BIG:
                acts = np.sort(rng.normal(row["mean"], row["std"], len(images))).astype(np.float32)
                order = rng.permutation(len(images))
                if key == (OUT, 0):   # the XSS file name is the strongest image of fc:0
                    order = np.array([len(images) - 1] + [i for i in range(len(images) - 1)])[::-1]
                for kind in ("top", "bottom"):
                    for rank in range(k):
                        j = len(images) - 1 - rank if kind == "top" else rank
                        missing = (l["name"], u, kind, rank) == missing_crop
                        box = (1, 1, 99, 119) if missing else (0, 0, 100 + rank, 120)   # its own crop
                        crop = (layout.unit_key(l["name"], u, layout.crop_name(kind, rank)) if schema == 1
                                else layout.crop_key(images[order[j]], box))
                        for c, v in (("layer", l["name"]), ("unit", u), ("kind", kind), ("rank", rank),
                                     ("activation", float(acts[j])), ("image", images[order[j]]),
                                     ("y", rank), ("x", rank + 1), ("x0", box[0]), ("y0", box[1]), ("x1", box[2]),
                                     ("y1", box[3]), ("crop", crop)):
                            if c in top_cols:
                                top_cols[c].append(v)
                        if not missing and not (schema > 1 and store.exists(crop)):
                            store.put(crop, _jpg(rng, 24))
    if topk:
        layout.write_topk(store, top_cols, topk_schema)
    if units_index:
        store.put(layout.UNITS, layout.table_bytes(layout.units_table(unit_rows, presets)))
    for (name, p), rows in histories.items():
        layout.put_json(store, layout.record_key(f"opt/{name}/0-9-{p}"),
                        {"id": f"opt/{name}/0-9", "hash": "x", "summary": {"layer": name, "rows": rows}})
    manifest = {
        "schema_version": schema, "status": "failed" if failed_units else "complete",
        "model": {"name": "synthnet", "source": "synthetic", "weights": "none", "input_size": 224,
                  "preprocessing": {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"},
                  "labels": labels, "output_layer": OUT},
        "layers": layers,
        "presets": [{"name": p, "steps": 10} for p in presets],
        "optimization": {"steps": 10, "size": img_size},
        "k": k,
        "dataset": None if not topk else {"uri": str(ds_root), "images": len(images), "images_seen": len(images),
                                          "images_skipped": 1, "skipped": [f"broken/{XSS_FILE}: not an image"]},
        "build": {"started": "2025-01-01T00:00:00Z", "finished": "2025-01-01T00:01:00Z", "seconds": 60.0,
                  "versions": {"deepvis": "0.1.0"}, "config": {}, "actors": []},
        "failed_shards": [{"id": f"opt/{MID}/4-7", "error": XSS_ERROR}] if failed_units else [],
    }
    layout.put_json(store, layout.MANIFEST, manifest)
    return {"store": store, "root": Path(root), "dataset": ds_root, "images": images, "layers": layers,
            "presets": presets, "missing_png": missing_png, "missing_crop": missing_crop,
            "failed": sorted(failed_units), "dead": sorted(dead_units), "k": k}


# ---------------------------------------------------------------- HTTP server
class Served:
    def __init__(self, server, thread, root: Path):
        self.server, self.thread, self.root = server, thread, root
        host, port = server.server_address[:2]
        self.base = f"http://{host}:{port}"

    def url(self, hash_: str = "") -> str:
        return f"{self.base}/viewer/index.html{hash_}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(store) -> Served:
    from deepvis.atlas_viewer.server import make_server
    server = make_server(store, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return Served(server, t, Path(store.uri))


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The synthetic atlas (1,024-unit layer), published (viewer + data)."""
    from deepvis.atlas_viewer.publish import publish
    facts = make_synthetic_atlas(tmp_path_factory.mktemp("synthetic") / "atlas")
    t0 = time.perf_counter()
    facts["model_json"] = publish(facts["store"])
    facts["publish_s"] = time.perf_counter() - t0
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


def launch_chromium(pw, extra_args=()):
    """Headless Debian Chromium (never a downloaded browser) with the suite's flags plus extra_args."""
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(extra_args), headless=True)


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
