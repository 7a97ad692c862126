"""Benchmark: the full default-layer build of efficientnet_lite0 (every unit of all 66 layers,
`--presets none`, 100 sample images), into a local directory and into SeaweedFS, and the crop layout
table of issue #16.

  build         run_build's wall time (one Ray cluster started here first, not counted), the crop
                phase's own parts from its log line (receptive fields once, planning, writing) and,
                when the build records them, manifest["build"]["phases"]
  crop layout   from the local build (schema 3): top/bottom-k entries, distinct source images and
                distinct (image, box) crops; objects and bytes of each layout: one input image per
                source image (schema 3, what the build wrote, measured), content-addressed crops
                (schema 2: one JPEG per distinct crop, each encoded here from the stored inputs to
                size it), per-unit objects (schema 1: one per entry, the bytes of its crop), one
                sprite per unit; image requests of a unit page counted in headless Chromium

    .venv/bin/python bench/fullnet.py                   # local + SeaweedFS, writes BENCHMARKS.md
    .venv/bin/python bench/fullnet.py --images 20 --layers '_blocks.1*' --no-s3 --no-write

The machine may be shared: absolute times are noisy (the load average is printed with them).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmd import replace_section  # noqa: E402  (bench/ is the script directory)

from deepvis.cluster.build import run_build  # noqa: E402
from deepvis.cluster.config import BuildConfig  # noqa: E402
from deepvis.storage import layout  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "datasets" / "imagenet-sample"
SECTION = "## Full-network build and crop layout"


def dataset_list(n: int, tmp: Path) -> str:
    files = sorted(SAMPLE.glob("*/*.JPEG"))
    step = max(1, len(files) // n)
    path = tmp / "images.txt"
    path.write_text("".join(f"{f}\n" for f in files[::step][:n]))
    return str(path)


def build(out: str, dataset: str, layers: str | None, endpoint: str | None = None, **keys) -> dict:
    """run_build of the full-network configuration (`--presets none` unless keys say otherwise), timed."""
    lines: list[str] = []
    cfg = BuildConfig(**{"model": "efficientnet_lite0", "layers": layers, "presets": "none", "dataset": dataset,
                         "out": out, "endpoint_url": endpoint, "progress": False, **keys})
    t = time.perf_counter()
    summary = run_build(cfg, log=lines.append)
    wall = time.perf_counter() - t
    crop_line = next((x for x in lines if "input images, written by" in x), "")
    m = re.search(r"seconds (\{.*\})", crop_line)
    crop_s = json.loads(m.group(1).replace("'", '"')) if m else {}
    return {"wall": round(wall, 1), "status": summary["status"], "units": summary["units"],
            "crop_line": crop_line, "crop_s": crop_s, "summary": summary}


def layout_table(root: Path) -> dict:
    """Objects and bytes of the crop layouts, from the schema 3 atlas at root: its input images as
    stored, and schema 2's distinct crops cut from them and JPEG-encoded as schema 2 did (quality 90)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(root / layout.TOPK, columns=["layer", "unit", "input", "x0", "y0", "x1", "y1"]).to_pylist()
    inputs = {p.name: p.stat().st_size for p in (root / layout.INPUTS).iterdir()}
    boxes: dict[str, set] = {}
    for r in rows:
        if r["input"]:
            boxes.setdefault(r["input"], set()).add((r["x0"], r["y0"], r["x1"], r["y1"]))
    crop_size: dict[tuple, int] = {}
    for key in sorted(boxes):
        img = Image.open(root / key).convert("RGB")
        for box in boxes[key]:
            buf = io.BytesIO()
            img.crop(box).save(buf, format="JPEG", quality=90)
            crop_size[(key, box)] = len(buf.getvalue())
    per_entry = sum(crop_size[(r["input"], (r["x0"], r["y0"], r["x1"], r["y1"]))] for r in rows if r["input"])
    units = len({(r["layer"], r["unit"]) for r in rows})
    return {"entries": len(rows), "units": units, "inputs": len(inputs), "inputs_bytes": sum(inputs.values()),
            "distinct": len(crop_size), "distinct_bytes": sum(crop_size.values()), "per_unit_bytes": per_entry}


def unit_page_requests(root: Path, layer: str, unit: int) -> int:
    """Image requests of one unit page of the atlas at root (deepvis serve + headless Chromium)."""
    from deepvis.storage.store import LocalStore
    from devtools.viewer import launch_chromium, serve
    from playwright.sync_api import sync_playwright

    srv = serve(LocalStore(root))
    try:
        with sync_playwright() as pw:
            b = launch_chromium(pw)
            pg = b.new_context(viewport={"width": 1280, "height": 800}).new_page()
            pg.goto(srv.url(f"#/layer/{layer}/unit/{unit}"))
            pg.wait_for_selector("#top figure")
            pg.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=30000)
            names = pg.evaluate("() => performance.getEntriesByType('resource').map(e => e.name)")
            b.close()
    finally:
        srv.stop()
    return len([n for n in names if n.split("?")[0].endswith((".jpg", ".png"))])


def browse_requests(root: Path, layer: str, n: int) -> dict:
    """From the index: objects a unit page needs on average and what browsing the layer's first n
    units one after the other fetches (a shared object once), per layout: schema 3's input images,
    schema 2's distinct crops, schema 1's 2k objects a unit."""
    import pyarrow.parquet as pq
    rows = pq.read_table(root / layout.TOPK, columns=["layer", "unit", "image", "x0", "y0", "x1", "y1"]).to_pylist()
    rows = [r for r in rows if r["layer"] == layer]
    units = set(sorted({r["unit"] for r in rows})[:n])
    crop = lambda r: (r["image"], r["x0"], r["y0"], r["x1"], r["y1"])  # noqa: E731
    first = [r for r in rows if r["unit"] in units]
    per = lambda f: sum(len({f(r) for r in rows if r["unit"] == u}) for u in units) / len(units)  # noqa: E731
    return {"layer": layer, "rows": len(first), "inputs": len({r["image"] for r in first}),
            "crops": len({crop(r) for r in first}), "per_unit_inputs": per(lambda r: r["image"]),
            "per_unit_crops": per(crop)}


class NoS3:
    endpoint_url = None

    def env(self) -> dict:
        return {}

    def stop(self) -> None:
        pass


def s3_server(tmp: Path):
    """A started SeaweedFS server (tests/s3server.py); its credentials go in this process's env."""
    from devtools.s3server import SeaweedServer
    server = SeaweedServer(tmp / "s3data", bucket="bench")
    server.start()
    os.environ.update(server.env())
    return server


def report(args, local: dict, s3: dict | None, table: dict, req: dict) -> str:
    load = os.getloadavg()
    cs = local["crop_s"]
    quiet = load[1] < (os.cpu_count() or 1) + 2     # 5-minute average: the builds' own load and little more
    out = [SECTION, "",
           f"`python bench/fullnet.py` — {dt.date.today()}, {os.cpu_count()} cores, load average "
           f"{load[0]:.1f} / {load[1]:.1f} (1 / 5 min) at the end"
           f"{' (a quiet machine: the builds were its load)' if quiet else ' (**a shared machine: absolute times are noisy**; re-run on a quiet one)'}. "
           f"efficientnet_lite0, layers {args.layers or 'default (66)'}, {local['units']} units, "
           f"`--presets none`, {args.images} sample images, k = 9.", "",
           "| target | whole build (s) | receptive fields once (s) | crop planning (s) | crop writing (s) | status |",
           "|---|---:|---:|---:|---:|---|",
           f"| local directory | {local['wall']} | {cs.get('receptive')} | {cs.get('plan')} | {cs.get('write')} | {local['status']} |"]
    if s3:
        c3 = s3["crop_s"]
        out.append(f"| SeaweedFS (S3) | {s3['wall']} | {c3.get('receptive')} | {c3.get('plan')} | {c3.get('write')} | "
                   f"{s3['status']} (× {s3['wall'] / local['wall']:.2f} of local) |")
    phases = (local["summary"].get("phases") or {})
    if phases:
        out += ["", "Phases (manifest build.phases): " + ", ".join(f"{k} {v} s" for k, v in phases.items())]
    t = table
    out += ["", "Crop layout (the same build's top/bottom-k rows):", "",
            "| layout | objects | bytes | unit page image requests | browsing the first 10 units of "
            f"`{req['layer']}` |", "|---|---:|---:|---:|---:|",
            f"| one input image per source image, `inputs/<sha>.jpg` (schema 3, built) | {t['inputs']:,} | "
            f"{t['inputs_bytes']:,} | {req['measured']} measured in Chromium ({req['per_unit_inputs']:.1f} "
            f"distinct images a unit) | {req['inputs']} |",
            f"| content-addressed crops `crops/<sha>.jpg` (schema 2) | {t['distinct']:,} | {t['distinct_bytes']:,} | "
            f"{req['per_unit_crops']:.1f} | {req['crops']} |",
            f"| per unit, 18 objects a unit (schema 1) | {t['entries']:,} | {t['per_unit_bytes']:,} | 18 | {req['rows']} |",
            f"| one sprite per unit | {t['units']:,} | ~{t['per_unit_bytes']:,} | 1 | 10 |", "",
            f"{t['entries']:,} entries, {t['distinct']:,} distinct (image, box) crops "
            f"({t['entries'] / max(1, t['distinct']):.1f} entries per crop), **{t['inputs']:,} distinct source "
            f"images**."]
    return "\n".join(out + ["", CHOICE.format(
        objects=t["distinct"] / max(1, t["inputs"]), bytes=t["distinct_bytes"] / max(1, t["inputs_bytes"]))]) + "\n"


CHOICE = """Choice: **one input image per source image** (schema 3). Against schema 2's content-addressed
crops it writes {objects:.0f}x fewer objects and {bytes:.0f}x fewer bytes: a deep layer's crop is nearly the whole
input anyway, and a shallow layer's many small boxes of one photo are all cut from the same image. A
unit page shows its crops by clipping the input image (the browser fetches each distinct image once),
so it costs at most the requests of schema 2. Into S3 every object is a PUT, and the objects were
what cost: schema 2's crop writing alone took 217 s of PUTs against a SeaweedFS sharing the 2 cores.
One sprite per unit would make a unit page 1 request but re-encodes every crop per unit and shares
nothing between units; for the layer grid the viewer already has per-layer sprites.

Before schema 3 (schema 2, the same bench on the same quiet machine, 2026-12-03): local 81.5 s,
SeaweedFS 322.5 s (3.96x local); crop writing 21 s locally and 217 s into SeaweedFS (65,419 PUTs at
~300 a second)."""


def main(argv=None) -> int:
    import ray
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--layers", default=None, help="layer names/globs (default: the 66 default layers)")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--keep", help="build the local atlas here (kept) instead of a temp dir")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fullnet-") as tmp:
        ds = dataset_list(args.images, Path(tmp))
        server = NoS3() if args.no_s3 else s3_server(Path(tmp))
        # the actors and crop tasks of both builds reach SeaweedFS with its credentials
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR,
                 runtime_env={"env_vars": server.env()})
        try:
            out = Path(args.keep or Path(tmp) / "atlas")
            local = build(str(out), ds, args.layers)
            print("local:", local["wall"], "s;", local["crop_line"], flush=True)
            table = layout_table(out)
            layer = json.loads((out / layout.MANIFEST).read_text())["layers"][-2]["name"]
            req = {**browse_requests(out, layer, 10), "measured": unit_page_requests(out, layer, 0)}
            s3 = None
            if not args.no_s3:
                s3 = build("s3://bench/atlas", ds, args.layers, server.endpoint_url)
                print("s3:", s3["wall"], "s;", s3["crop_line"], flush=True)
        finally:
            ray.shutdown()
            server.stop()
    text = report(args, local, s3, table, req)
    print(text)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
