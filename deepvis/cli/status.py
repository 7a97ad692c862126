"""`deepvis status STORE`: per layer, units expected / done / dead / failed; where the build's time went."""
from __future__ import annotations

import json

from deepvis.cli.args import add_store_args


def add_parser(sub):
    p = sub.add_parser("status", help="report how complete an atlas is, per layer",
                       description="Per layer of the atlas at STORE: units expected, optimized (done), "
                                   "dead (zero gradient) and in failed shards. Works during a build too.")
    add_store_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def layer_status(store) -> tuple[dict, list[dict]]:
    from deepvis.storage import layout

    m = layout.read_manifest(store)
    rows = {l["name"]: {"layer": l["name"], "expected": len(l.get("selected") or range(l["units"])),
                        "done": 0, "dead": 0, "failed": 0} for l in m["layers"]}
    n_presets = len(m.get("presets") or [])
    for key in store.list(layout.RECORDS + "/opt/"):
        rec = layout.get_json(store, key)
        if not rec:
            continue
        s = rec["summary"]
        r = rows.get(s["layer"])
        if r is None:
            continue
        units = {x["unit"] for x in s["rows"]}
        r["done"] += len(units)
        r["dead"] += len({x["unit"] for x in s["rows"] if x["dead"]})
    for f in m.get("failed_shards", []):
        parts = f["id"].split("/")
        if len(parts) == 3 and parts[0] in ("opt", "crop") and parts[1] in rows:
            lo, hi = map(int, parts[2].split("-"))
            sel = [u for u in (next(l for l in m["layers"] if l["name"] == parts[1]).get("selected") or [])
                   if lo <= u <= hi]
            rows[parts[1]]["failed"] += len(sel)
    if n_presets == 0:  # dataset-only atlas: "done" = units with top-k rows
        for r in rows.values():
            r["done"] = r["expected"] if m["status"] == "complete" else 0
    return m, list(rows.values())


def build_state(store, status: str) -> tuple[str, str]:
    """(state, one-line explanation): a 'running' manifest is 'running' only while its build's lease
    has a fresh heartbeat; with a stale lease or none, that build is 'dead' (it stopped without
    finishing: SIGKILL, a lost machine)."""
    from deepvis.cluster.lease import HEARTBEAT_S, read_lease

    lease = read_lease(store)
    resume = "re-run the same command to resume"
    if status == "interrupted":
        return status, f"interrupted (Ctrl-C or SIGTERM); {resume}"
    if status != "running":
        if lease is not None and not lease.stale():   # a re-run is under way on a finished atlas
            return status, f"{status}; a build is running on it (lease held by {lease.holder}, heartbeat {lease.age():.0f} s ago)"
        return status, status
    if lease is not None and not lease.stale():
        return "running", f"running (lease held by {lease.holder}, heartbeat {lease.age():.0f} s ago)"
    last = f"last heartbeat {lease.age():.0f} s ago from {lease.holder}" if lease else "no build holds its lease"
    return "dead", (f"dead: the build stopped without finishing ({last}; a live build beats every "
                    f"{HEARTBEAT_S:.0f} s); {resume}")


def run(args) -> int:
    from deepvis.storage.store import open_store

    store = open_store(args.store, args.endpoint_url, must_exist=True)
    m, rows = layer_status(store)
    state, line = build_state(store, m["status"])
    if args.json:
        print(json.dumps({"status": m["status"], "state": state, "state_detail": line, "layers": rows,
                          "failed_shards": m.get("failed_shards", []),
                          "phases": (m.get("build") or {}).get("phases") or {}}))
        return 0
    w = max([len(r["layer"]) for r in rows] + [5])
    print(f"atlas {args.store}: {line}  model {m['model']['name']}")
    print(f"{'layer':<{w}}  {'expected':>8}  {'done':>6}  {'dead':>5}  {'failed':>6}")
    for r in rows:
        print(f"{r['layer']:<{w}}  {r['expected']:>8}  {r['done']:>6}  {r['dead']:>5}  {r['failed']:>6}")
    tot = {k: sum(r[k] for r in rows) for k in ("expected", "done", "dead", "failed")}
    print(f"{'total':<{w}}  {tot['expected']:>8}  {tot['done']:>6}  {tot['dead']:>5}  {tot['failed']:>6}")
    print_phases(m.get("build") or {})
    return 0


def print_phases(build: dict) -> None:
    """The last run's wall-clock seconds per phase (a resumed build's: what it did itself)."""
    phases = build.get("phases") or {}
    if phases:
        total = build.get("seconds")
        print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
              + (f"; total {total:.1f} s" if total is not None else ""))
