"""`deepvis compare STORE`: which optimization preset makes the best images? The quality measures of
index/units.parquet (tasks.quality), summarised per preset and layer:

  ratio   median of activation reached / the unit's top dataset activation (needs a dataset pass;
          > 1: the image drives the unit harder than any dataset photo)
  hf      median high-frequency energy relative to natural photos (1 = natural; higher = noisier)
  robust  mean activation kept under random jitter, scale and rotation (1 = fully kept)
  dead    units whose gradient was zero
Each preset's "all layers" row comes first."""
from __future__ import annotations

import json
import math
import statistics
import sys

from deepvis.cli.args import add_store_args


def add_parser(sub):
    p = sub.add_parser("compare", help="compare the optimization presets of an atlas by measured quality",
                       description="Print, per preset and layer, the quality of the atlas's optimized images: "
                                   "ratio (activation reached / the top dataset activation, median), hf "
                                   "(high-frequency energy relative to natural photos, median; 1 = natural), "
                                   "robust (activation kept under random jitter/scale/rotation, mean) and dead "
                                   "units. Higher ratio and robust and hf near 1 are better.")
    add_store_args(p)
    p.add_argument("--layer", default=None, help="only this layer")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _median(v):
    """Median of the values that are numbers (None and NaN skipped); None when there are none."""
    v = [x for x in v if x is not None and not math.isnan(x)]
    return statistics.median(v) if v else None


def _mean(v):
    v = [x for x in v if x is not None and not math.isnan(x)]
    return statistics.fmean(v) if v else None


def summarize(rows: list[dict], presets: list[str], layers: list[str]) -> list[dict]:
    """One dict per (preset, layer) plus (preset, None) for all layers; rows are units.parquet's."""
    out = []
    for p in presets:
        acts = [r.get(f"act_{p}") for r in rows]
        if all(a is None or math.isnan(a) for a in acts):
            continue                     # built before the measures existed (or nothing optimized)
        for layer in [None] + layers:
            rs = [r for r in rows if layer is None or r["layer"] == layer]
            rs = [r for r in rs if r.get(f"opt_{p}") is not None and not math.isnan(r[f"opt_{p}"])]
            if not rs:
                continue
            out.append({"preset": p, "layer": layer, "units": len(rs),
                        "ratio": _median(r.get(f"ratio_{p}") for r in rs),
                        "hf": _median(r.get(f"hf_{p}") for r in rs),
                        "robust": _mean(r.get(f"robust_{p}") for r in rs),
                        "dead": sum(bool(r.get(f"dead_{p}")) for r in rs)})
    return out


def _fmt(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


def run(args) -> int:
    from deepvis.storage import layout
    from deepvis.storage.store import open_store
    from deepvis.tasks.errors import UserError

    store = open_store(args.store, args.endpoint_url)
    manifest = layout.read_manifest(store)
    presets = [p["name"] for p in manifest.get("presets") or []]
    if not presets:
        raise UserError(f"the atlas {store.uri} has no optimized images (built with --presets none)")
    if not store.exists(layout.UNITS):
        raise UserError(f"the atlas {store.uri} has no index/units.parquet yet; finish the build first")
    rows = layout.read_table(store, layout.UNITS).to_pylist()
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    if args.layer:
        if args.layer not in layers:
            raise UserError(f"layer {args.layer!r} is not in this atlas (layers: {', '.join(layers[:8])}"
                            f"{', ...' if len(layers) > 8 else ''})")
        layers = [args.layer]
        rows = [r for r in rows if r["layer"] == args.layer]
    table = summarize(rows, presets, layers if len(layers) > 1 else [])
    if not table:
        raise UserError(f"the atlas {store.uri} has no quality measures (built before they existed); "
                        f"rebuild the optimization pass to get them")
    if args.json:
        json.dump(table, sys.stdout, indent=1)
        print()
        return 0
    no_dataset = all(t["ratio"] is None for t in table)
    print(f"atlas {store.uri}: {manifest.get('model', {}).get('name')}, presets {', '.join(presets)}")
    head = ["preset", "layer", "units", "ratio", "hf", "robust", "dead"]
    lines = [[t["preset"], t["layer"] or "(all layers)", str(t["units"]), _fmt(t["ratio"]), _fmt(t["hf"]),
              _fmt(t["robust"]), str(t["dead"])] for t in table]
    w = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w[i]) if i < 2 else h.rjust(w[i]) for i, h in enumerate(head)))
    for l in lines:
        print("  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(l)))
    print("ratio: median activation / top dataset activation (>1 beats every photo); hf: median high-frequency "
          "energy vs natural photos (1 = natural); robust: mean activation kept under jitter/scale/rotation")
    if no_dataset:
        print("(no dataset pass in this atlas: ratio needs one, build with --dataset)")
    return 0
