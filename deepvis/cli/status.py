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
    from deepvis.storage.atlas import layer_status

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
