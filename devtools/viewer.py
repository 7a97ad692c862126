"""A synthetic atlas written exactly as FORMAT.md lays it out (fast, any size: a 1,024-unit layer),
an HTTP server on an atlas, and headless Debian Chromium. Shared by the viewer tests
(tests/atlas_viewer/conftest.py) and bench/viewer.py."""
from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from deepvis.storage import layout
from deepvis.storage.store import LocalStore

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


class _Synth:
    """The state of one synthetic atlas being written: random numbers are drawn in a fixed order
    (dataset images, then unit by unit), so the same arguments give the same atlas."""

    def __init__(self, root: Path, big_units: int, topk: bool, presets: list[str], img_size: int, k: int,
                 schema: int):
        self.rng, self.store, self.topk, self.presets = np.random.default_rng(0), LocalStore(root), topk, presets
        self.img_size, self.k, self.schema = img_size, k, schema
        self.topk_schema = {1: layout.TOPK_SCHEMA_V1, 2: layout.TOPK_SCHEMA_V2}.get(schema, layout.TOPK_SCHEMA)
        self.layers = [
            {"name": BIG, "kind": "conv", "shape": [big_units, 7, 7], "units": big_units, "selected": list(range(big_units))},
            {"name": MID, "kind": "block", "shape": [32, 14, 14], "units": 32, "selected": list(range(8))},
            {"name": XSS_LAYER, "kind": "conv", "shape": [3, 4, 4], "units": 3, "selected": [0, 1, 2]},
            {"name": OUT, "kind": "linear", "shape": [10], "units": 10, "selected": list(range(10))},
        ]
        self.failed_units = {(MID, u) for u in range(4, 8)} if presets else set()
        self.dead_units = {(MID, 2)} if presets else set()
        self.missing_png = (MID, 1, presets[0]) if presets else None
        self.missing_crop = (MID, 0, "bottom", k - 1) if topk else None
        self.unit_rows, self.histories = [], {}
        self.top_cols = {f.name: [] for f in self.topk_schema}

    def dataset(self, ds_root: Path) -> None:
        ds_root.mkdir(parents=True, exist_ok=True)
        self.ds_root = ds_root
        self.images = [f"n0{i:02d}/img_{i:03d}.JPEG" for i in range(10)] + [f"odd/{XSS_FILE}"]
        for im in self.images:
            (ds_root / im).parent.mkdir(parents=True, exist_ok=True)
            (ds_root / im).write_bytes(_jpg(self.rng, 48))

    def unit(self, layer: str, u: int) -> None:
        row = {"layer": layer, "unit": u}
        if self.topk:
            mean, std = float(self.rng.normal(0, 1)), float(self.rng.uniform(0.5, 2))
            row.update(mean=mean, std=std, max=mean + 3 * std, frac_positive=float(self.rng.uniform(0, 1)),
                       count=len(self.images))
        for p in self.presets:
            if (layer, u) not in self.failed_units:
                self.optimized(row, p)
        self.unit_rows.append(row)
        if self.topk and layer != BIG:
            self.top_rows(row)

    def optimized(self, row: dict, p: str) -> None:
        layer, u = row["layer"], row["unit"]
        row[f"opt_{p}"] = float(self.rng.uniform(1, 50))
        row[f"dead_{p}"] = (layer, u) in self.dead_units
        if (layer, u, p) != self.missing_png:
            self.store.put(layout.unit_key(layer, u, f"{p}.png"), _png(self.rng, self.img_size))
        if layer == OUT:
            self.histories.setdefault((layer, p), []).append(
                {"unit": u, "preset": p, "activation": row[f"opt_{p}"], "dead": False,
                 "history": [float(x) for x in np.linspace(0, row[f"opt_{p}"], 20)]})

    def top_rows(self, row: dict) -> None:
        layer, u, n = row["layer"], row["unit"], len(self.images)
        acts = np.sort(self.rng.normal(row["mean"], row["std"], n)).astype(np.float32)
        order = self.rng.permutation(n)
        if (layer, u) == (OUT, 0):   # the XSS file name is the strongest image of fc:0
            order = np.array([n - 1] + [i for i in range(n - 1)])[::-1]
        for kind in ("top", "bottom"):
            for rank in range(self.k):
                j = n - 1 - rank if kind == "top" else rank
                missing = (layer, u, kind, rank) == self.missing_crop
                box = (1, 1, 99, 119) if missing else (0, 0, 100 + rank, 120)   # its own crop
                image = self.images[order[j]]
                crop = self._crop_object(layer, u, kind, rank, image, box, missing)
                for c, v in (("layer", layer), ("unit", u), ("kind", kind), ("rank", rank),
                             ("activation", float(acts[j])), ("image", image),
                             ("y", rank), ("x", rank + 1), ("x0", box[0]), ("y0", box[1]), ("x1", box[2]),
                             ("y1", box[3]), ("crop", crop), ("input", crop)):
                    if c in self.top_cols:
                        self.top_cols[c].append(v)
                if not missing and not (self.schema > 1 and self.store.exists(crop)):
                    # schema 3: the preprocessed input (the boxes are cut from it); else the crop itself
                    self.store.put(crop, _jpg(self.rng, 224 if self.schema >= 3 else 24))

    def _crop_object(self, layer, u, kind, rank, image, box, missing) -> str:
        """The key of the object that holds the row's crop, in this atlas's schema. The missing crop's
        object is never written (schema 3: the row names an input object that is absent)."""
        if self.schema == 1:
            return layout.unit_key(layer, u, layout.crop_name(kind, rank))
        if self.schema == 2:
            return layout.crop_key(image, box)
        return layout.input_key(image + ("#missing" if missing else ""))

    def manifest(self) -> dict:
        labels = [XSS_LABEL] + [f"class_{i}" for i in range(1, 10)]
        n = len(self.images)
        return {
            "schema_version": self.schema, "status": "failed" if self.failed_units else "complete",
            "model": {"name": "synthnet", "source": "synthetic", "weights": "none", "input_size": 224,
                      "preprocessing": {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                        "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"},
                      "labels": labels, "output_layer": OUT},
            "layers": self.layers,
            "presets": [{"name": p, "steps": 10} for p in self.presets],
            "optimization": {"steps": 10, "size": self.img_size},
            "k": self.k,
            "dataset": None if not self.topk else {"uri": str(self.ds_root), "images": n, "images_seen": n,
                                                   "images_skipped": 1, "skipped": [f"broken/{XSS_FILE}: not an image"]},
            "build": {"started": "2025-01-01T00:00:00Z", "finished": "2025-01-01T00:01:00Z", "seconds": 60.0,
                      "versions": {"deepvis": "0.1.0"}, "config": {}, "actors": []},
            "failed_shards": [{"id": f"opt/{MID}/4-7", "error": XSS_ERROR}] if self.failed_units else [],
        }


def make_synthetic_atlas(root: Path, big_units: int = 1024, topk: bool = True, units_index: bool = True,
                         presets: list[str] | None = None, img_size: int = 32, k: int = 3,
                         schema: int = 1) -> dict:
    """Write a synthetic atlas (and its dataset folder root/../<name>-dataset) following FORMAT.md.
    schema 1: per-unit crops units/<layer>/<unit>/<kind>-<rank>.jpg, topk without a `crop` column
    (atlases built before schema 2 must keep opening); schema 2: shared crops/<sha>.jpg named by the
    `crop` column; schema 3 (what deepvis builds now): one 224 px input image per dataset image,
    inputs/<sha>.jpg named by the `input` column, each row's crop its box cut from it. Returns facts
    the tests check against."""
    presets = PRESETS if presets is None else presets
    s = _Synth(root, big_units, topk, presets, img_size, k, schema)
    s.dataset(Path(str(root) + "-dataset"))
    for l in s.layers:
        for u in l["selected"]:
            s.unit(l["name"], u)
    if topk:
        layout.write_topk(s.store, s.top_cols, s.topk_schema)
    if units_index:
        s.store.put(layout.UNITS, layout.table_bytes(layout.units_table(s.unit_rows, presets)))
    for (name, p), rows in s.histories.items():
        layout.put_json(s.store, layout.record_key(f"opt/{name}/0-9-{p}"),
                        {"id": f"opt/{name}/0-9", "hash": "x", "summary": {"layer": name, "rows": rows}})
    layout.put_json(s.store, layout.MANIFEST, s.manifest())
    return {"store": s.store, "root": Path(root), "dataset": s.ds_root, "images": s.images, "layers": s.layers,
            "presets": presets, "missing_png": s.missing_png, "missing_crop": s.missing_crop,
            "failed": sorted(s.failed_units), "dead": sorted(s.dead_units), "k": k}


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
    """The atlas served as `deepvis serve STORE --dataset-from-manifest` would (the viewer tests link
    the source images; these atlases are the tests' own, so their manifest is trusted)."""
    from deepvis.atlas_viewer.server import make_server, manifest_dataset_root
    server = make_server(store, "127.0.0.1", 0, dataset=manifest_dataset_root(layout.read_manifest(store)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return Served(server, t, Path(store.uri))


# ---------------------------------------------------------------- the browser
def launch_chromium(pw, extra_args=()):
    """Headless Debian Chromium (never a downloaded browser) with the suite's flags plus extra_args."""
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(extra_args), headless=True)
