"""`deepvis build`: plan shards of units/images, run them on a Ray actor pool, write the atlas.

Phases: (1) optimization shards and dataset shards in one pool, (2) merge the dataset shards' partial
top-k states, (3) receptive-field crop shards, (4) index Parquet files, manifest and viewer.
Every shard leaves a completion record holding a hash of all that determines its output; a re-run
skips shards whose record matches."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field

from deepvis.cluster.config import BuildConfig, parse_units
from deepvis.storage import layout
from deepvis.storage.errors import StoreError
from deepvis.storage.store import Store, open_store
from deepvis.tasks.errors import UserError

VERSION = "0.1.0"


@dataclass
class Plan:
    cfg: BuildConfig
    model: dict
    layers: list[dict]            # {name, kind, shape, units, selected: [unit ids]}
    presets: list[dict]
    images: list[str] = field(default_factory=list)
    opt_shards: list[dict] = field(default_factory=list)
    data_shards: list[dict] = field(default_factory=list)
    labels: list[str] | None = None


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _dataset_uri(dataset: str) -> str:
    return dataset if "://" in dataset else os.path.abspath(dataset)


def _weights_signature(weights: str | None) -> str:
    if weights in (None, "default", "none"):
        return str(weights)
    st = os.stat(weights)
    return f"{os.path.abspath(weights)}:{st.st_size}:{int(st.st_mtime)}"


# ---------------------------------------------------------------- planning (driver, before any work)
def make_plan(cfg: BuildConfig) -> Plan:
    """Resolve and validate everything (model, layers, units, presets, dataset) before any work:
    bad input fails here with a UserError/StoreError."""
    from deepvis.tasks.layers import resolve_layers
    from deepvis.tasks.models import load_model
    from deepvis.tasks.optimize import all_presets, get_preset, load_presets

    lm = load_model(cfg.model, cfg.weights)
    infos = resolve_layers(lm.module, lm.input_size, cfg.layers)
    layers = [{**i.to_dict(), "selected": parse_units(cfg.units, i.units, i.name)} for i in infos]
    extra = load_presets(cfg.presets_file) if cfg.presets_file else {}
    builtin = all_presets()
    names = [] if cfg.presets.strip() == "none" else (
        list(builtin) + [n for n in extra if n not in builtin] if cfg.presets.strip() == "all"
        else [n.strip() for n in cfg.presets.split(",") if n.strip()])
    presets = [(extra[n] if n in extra else get_preset(n)).to_dict() for n in names]
    model = {"name": lm.name, "source": lm.source, "weights": lm.weights, "input_size": lm.input_size,
             "preprocessing": lm.preprocessing}
    if cfg.diversity_layer:
        from deepvis.tasks.hooks import get_layer
        get_layer(lm.module, cfg.diversity_layer)      # unknown -> UserError before any work
    plan = Plan(cfg, model, layers, presets, labels=lm.labels)
    if cfg.dataset:
        from deepvis.storage.datasets import list_images
        plan.images = list_images(cfg.dataset, cfg.endpoint_url)
    return plan


def _base_hash(plan: Plan) -> dict:
    return {"v": VERSION, "model": plan.cfg.model, "weights": _weights_signature(plan.cfg.weights),
            "pre": plan.model["preprocessing"]}


def make_shards(plan: Plan, gpu: bool = False) -> None:
    """Split the work: optimization shards of units (one layer each, so the forward pass stops at that
    layer; sized for the device) and dataset shards of consecutive image ids."""
    cfg, base = plan.cfg, _base_hash(plan)
    names = [p["name"] for p in plan.presets]
    if plan.presets:
        per = cfg.shard_units or max(1, (128 if gpu else 8) // len(plan.presets))
        for l in plan.layers:
            sel = l["selected"]
            for i in range(0, len(sel), per):
                units = sel[i:i + per]
                shard = {"type": "opt", "layer": l["name"], "units": units, "presets": names,
                         "steps": cfg.steps, "size": cfg.size}
                if cfg.diversity > 1 and any(p.get("kind") == "modern" for p in plan.presets):
                    shard.update(diversity=cfg.diversity, diversity_layer=cfg.diversity_layer)
                shard["id"] = f"opt/{l['name']}/{units[0]}-{units[-1]}"
                shard["hash"] = _hash({**base, **shard, "presets": plan.presets})
                plan.opt_shards.append(shard)
    if plan.images:
        names_l = [l["name"] for l in plan.layers]
        units_l = [l["units"] for l in plan.layers]
        # a whole number of batches per shard (see ShardWorker._dataset)
        n = -(-cfg.shard_images // cfg.batch_size) * cfg.batch_size
        for i in range(0, len(plan.images), n):
            ids = plan.images[i:i + n]
            shard = {"type": "data", "layers": names_l, "units": units_l, "k": cfg.k, "images": ids,
                     "batch_size": cfg.batch_size}
            shard["id"] = f"data/{i // n:05d}"
            shard["hash"] = _hash({**base, **{k: v for k, v in shard.items() if k != "batch_size"},
                                   "dataset": _dataset_uri(cfg.dataset)})
            plan.data_shards.append(shard)


# ---------------------------------------------------------------- Ray
def connect(address: str | None) -> bool:
    """Start or join a Ray cluster. Returns True when this call started it (and should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "") and os.environ.get("RAY_ADDRESS"):
        # inside a Ray job (`deepvis submit`), or the user's RAY_ADDRESS: join that cluster, as Ray does
        address = os.environ["RAY_ADDRESS"]
    if address not in (None, "", "local", "auto"):
        hostport = address.split("://", 1)[-1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host or hostport, int(port or 6379)), timeout=3).close()
        except (OSError, ValueError):
            raise UserError(f"cannot reach the Ray cluster at {address!r}; check the address "
                            f"(head node's GCS host:port or ray://host:10001) or omit --address for a local cluster") from None
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
    try:
        if address in (None, "", "local"):
            ray.init(num_cpus=os.cpu_count(), **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {address!r} ({e}); start one with "
                        f"`ray start --head` or omit --address for a local cluster") from None
    return True


def actor_layout(cfg: BuildConfig) -> tuple[int, dict, int]:
    """(number of actors, ray options, torch threads). One actor per GPU of the whole cluster, holding
    its node's CPUs per GPU (they decode images while the GPU computes); else one per CPU core with
    one torch thread each, so CPU results do not depend on the pool size. `--device cuda` asks for GPU
    actors even when no GPU node is up yet (an autoscaling cluster starts them for the pending actors).
    Actors are spread over the nodes (SPREAD), so a node that leaves takes as few as possible with it."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    spread = {"scheduling_strategy": "SPREAD"}
    if (gpus and cfg.device != "cpu") or cfg.device == "cuda":
        n = cfg.actors or max(1, gpus)
        per_node = [r.get("CPU", 0) / r["GPU"] for r in
                    (node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")) if r.get("GPU")]
        per = max(1, int(min(per_node))) if per_node else 1   # the smallest GPU node must fit an actor
        return n, {"num_gpus": 1, "num_cpus": per, **spread}, per
    n = cfg.actors or max(1, int(cpus))
    return n, {"num_cpus": min(1.0, cpus / n), **spread}, 1


# ---------------------------------------------------------------- the build
def run_build(cfg: BuildConfig, on_actor=None, log=print) -> dict:
    import ray
    from deepvis.cluster.pool import ShardPool
    from deepvis.cluster.worker import ShardWorker

    if cfg.dry_run:
        return dry_run(cfg)      # the plan and its estimate; no Ray, nothing written
    started = time.time()
    store = open_store(cfg.out, cfg.endpoint_url)
    plan = make_plan(cfg)
    started_ray = connect(cfg.address)
    try:
        n_actors, opts, threads = actor_layout(cfg)
        make_shards(plan, gpu="num_gpus" in opts)
        _write_manifest(store, plan, status="running", started=started)
        done = _finished_records(store, plan.opt_shards + plan.data_shards)
        todo = [s for s in plan.opt_shards + plan.data_shards if s["id"] not in done]
        skipped = len(plan.opt_shards) + len(plan.data_shards) - len(todo)
        if skipped:
            log(f"resuming: {skipped} finished shard(s) skipped, {len(todo)} to compute")
        # credentials never travel with the store (it pickles without them): actors use their own
        # AWS chain — a local cluster's workers inherit the driver's environment, a remote cluster's
        # nodes have instance roles or profiles
        remote = ray.remote(ShardWorker).options(max_restarts=0, **opts)
        make = lambda: remote.remote(cfg.model, cfg.weights, store, cfg.device, threads,  # noqa: E731
                                     cfg.dataset, cfg.presets_file, cfg.endpoint_url)
        actors_info: list[dict] = []

        def actor_started(actor, info):
            actors_info.append(info)
            if on_actor:
                on_actor(actor, info)

        pool: list = []  # started on first use: a fully resumed build loads no model

        def run_shards(shards, on_done):
            if not shards:
                return {}
            if not pool:
                pool.append(ShardPool(make, min(n_actors, len(shards)), cfg.max_attempts, actor_started,
                                      fatal=(StoreError,)))
            return pool[0].run(shards, on_done)

        def finished(shard, summary):
            done[shard["id"]] = summary
            bars.update(shard, summary)

        failed: dict[str, str] = {}
        topk_rows, stats = None, {}
        bars = _Bars(plan, done, cfg.progress)
        try:
            failed.update(run_shards(todo, finished))
            if plan.data_shards and not any(s["id"] in failed for s in plan.data_shards):
                merged = _merge_dataset(store, plan)
                crop_shards = _crop_shards(plan, merged)
                crop_done = _finished_records(store, crop_shards)
                crop_todo = [s for s in crop_shards if s["id"] not in crop_done]
                bars.start_crops(len(crop_shards), len(crop_shards) - len(crop_todo))

                def cropped(shard, summary):
                    crop_done[shard["id"]] = summary
                    bars.update(shard, summary)
                failed.update(run_shards(crop_todo, cropped))
                topk_rows = _topk_rows(plan, merged, crop_done)
                stats = {l["name"]: merged[l["name"]].result()["stats"] for l in plan.layers}
        finally:
            bars.close()
            if pool:
                pool[0].shutdown()
        if topk_rows is not None:
            layout.write_topk(store, topk_rows)
        unit_rows = _unit_rows(plan, done, stats)
        store.put(layout.UNITS, layout.table_bytes(layout.units_table(unit_rows, [p["name"] for p in plan.presets])))
        summary = _summary(plan, done, failed, skipped, len(todo), started, store)
        summary["actors"] = actors_info
        summary["actors_lost"] = pool[0].restarts if pool else 0
        _write_manifest(store, plan, status=summary["status"], started=started, summary=summary)
        _publish_viewer(store)
        return summary
    finally:
        if started_ray:
            ray.shutdown()


# ---------------------------------------------------------------- dry run (`deepvis build --dry-run`)
def dry_run(cfg: BuildConfig) -> dict:
    """The build's plan, what it would write and a time estimate (cluster.estimate), without starting
    Ray, creating the store or writing anything. An existing store is only listed and read, to count
    the shards a re-run would skip."""
    from deepvis.cluster.estimate import estimate, load_factor

    t0 = time.time()
    plan = make_plan(cfg)
    device, n_actors, local = _dry_layout(cfg)
    make_shards(plan, gpu=device.startswith("cuda"))
    plan_seconds = time.time() - t0
    slowdown = 1.0 if device.startswith("cuda") else load_factor(os.getloadavg()[0], os.cpu_count() or 1, n_actors)
    est = estimate(plan, device=device, actors=n_actors, local_ray=local, s3=cfg.out.startswith("s3://"),
                   plan_seconds=plan_seconds, static_files=_static_files(), slowdown=slowdown,
                   depths=_layer_depths(cfg, plan) if plan.data_shards else None)
    est.shards_done = _dry_done(cfg, plan)
    return {"dry_run": True, "atlas": cfg.out, "model": plan.model["name"],
            "layers": [l["name"] for l in plan.layers],
            "units": sum(len(l["selected"]) for l in plan.layers),
            "presets": [p["name"] for p in plan.presets], "images": len(plan.images),
            "steps": cfg.steps, "size": cfg.size, "plan_seconds": round(time.time() - t0, 2),
            **est.to_dict()}


def _dry_layout(cfg: BuildConfig) -> tuple[str, int, bool]:
    """(device, actors, starts a local Ray cluster) as actor_layout would give on this machine; for a
    remote cluster (--address) the same guess, from --device/--actors when given."""
    import torch

    local = cfg.address in (None, "", "local") and not os.environ.get("RAY_ADDRESS")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.device == "cuda" or (cfg.device != "cpu" and gpus):
        return "cuda", cfg.actors or max(1, gpus), local
    return "cpu", cfg.actors or max(1, os.cpu_count() or 1), local


def _layer_depths(cfg: BuildConfig, plan: Plan) -> dict[str, float]:
    """A layer's depth in the model, 0..1 (its module's place among all modules): the share of a
    forward pass (and of a receptive-field sweep) it takes to reach it."""
    from deepvis.tasks.models import load_model

    # the structure only: random init ("none") skips reading the checkpoint a second time
    names = [n for n, _ in load_model(cfg.model, "none").module.named_modules()]
    pos = {n: i for i, n in enumerate(names)}
    return {l["name"]: (pos.get(l["name"], len(names) - 1) + 1) / len(names) for l in plan.layers}


def _static_files() -> int:
    try:
        from deepvis.atlas_viewer.publish import STATIC
    except ImportError:
        return 0
    return sum(1 for p in STATIC.rglob("*") if p.is_file() and not p.name.startswith("."))


def _dry_done(cfg: BuildConfig, plan: Plan) -> dict[str, int]:
    """Shards an existing store already holds (what a re-run skips); {} when there is no store yet.
    Crop shards are matched by id only: their hashes need the merged dataset pass."""
    if "://" not in cfg.out or cfg.out.startswith("file://"):
        path = cfg.out[len("file://"):] if cfg.out.startswith("file://") else cfg.out
        if not os.path.isdir(os.path.expanduser(path)):
            return {}
    store = open_store(cfg.out, cfg.endpoint_url)   # an existing directory or bucket: not modified
    done = _finished_records(store, plan.opt_shards + plan.data_shards)
    present = set(store.list(layout.RECORDS + "/crop/"))
    crops = [f"crop/{l['name']}/{sel[i]}-{sel[min(i + 64, len(sel)) - 1]}"   # as _crop_shards names them
             for l in plan.layers if plan.data_shards for sel in [l["selected"]] for i in range(0, len(sel), 64)]
    return {"opt": sum(1 for s in plan.opt_shards if s["id"] in done),
            "data": sum(1 for s in plan.data_shards if s["id"] in done),
            "crop": sum(1 for c in crops if layout.record_key(c) in present)}


def _finished_records(store: Store, shards: list[dict]) -> dict[str, dict]:
    """Shard id -> summary, for the shards whose completion record matches their current hash."""
    present = set(store.list(layout.RECORDS + "/"))
    out = {}
    for s in shards:
        key = layout.record_key(s["id"])
        if key in present:
            rec = layout.get_json(store, key)
            if rec and rec.get("hash") == s["hash"]:
                out[s["id"]] = rec["summary"]
    return out


def _merge_dataset(store: Store, plan: Plan) -> dict:
    """Merge the dataset shards' partial states, per layer (exact: order does not matter)."""
    from deepvis.tasks.topk import RunningTopK

    merged: dict = {}
    for s in plan.data_shards:
        state = layout.unpack_state(store.get(layout.state_key(s["id"])))
        for i, l in enumerate(plan.layers):
            part = RunningTopK.from_state_dict(state[f"L{i}"])
            merged[l["name"]] = merged[l["name"]].merge(part) if l["name"] in merged else part
    return merged


def _crop_shards(plan: Plan, merged: dict, per: int = 64) -> list[dict]:
    base = {**_base_hash(plan), "dataset": _dataset_uri(plan.cfg.dataset)}
    shards = []
    for l in plan.layers:
        res = merged[l["name"]].result()
        units = l["selected"]
        for i in range(0, len(units), per):
            entries = []
            for u in units[i:i + per]:
                for kind in ("top", "bottom"):
                    r = res[kind]
                    for rank in range(r["activation"].shape[1]):
                        entries.append({"unit": u, "kind": kind, "rank": rank, "image": str(r["image"][u][rank]),
                                        "y": int(r["y"][u][rank]), "x": int(r["x"][u][rank])})
            shard = {"type": "crop", "layer": l["name"], "entries": entries}
            shard["id"] = f"crop/{l['name']}/{units[i]}-{units[min(i + per, len(units)) - 1]}"
            shard["hash"] = _hash({**base, **shard})
            shards.append(shard)
    return shards


def _topk_rows(plan: Plan, merged: dict, crop_done: dict) -> dict[str, list]:
    boxes = {}
    for summary in crop_done.values():
        for e in summary["entries"]:
            boxes[(summary["layer"], e["unit"], e["kind"], e["rank"])] = e["box"]
    cols = {f.name: [] for f in layout.TOPK_SCHEMA}
    for l in plan.layers:
        res = merged[l["name"]].result()
        for u in l["selected"]:
            for kind in ("top", "bottom"):
                r = res[kind]
                for rank in range(r["activation"].shape[1]):
                    x0, y0, x1, y1 = boxes.get((l["name"], u, kind, rank), (-1, -1, -1, -1))
                    for c, v in (("layer", l["name"]), ("unit", u), ("kind", kind), ("rank", rank),
                                 ("activation", float(r["activation"][u][rank])), ("image", str(r["image"][u][rank])),
                                 ("y", int(r["y"][u][rank])), ("x", int(r["x"][u][rank])),
                                 ("x0", x0), ("y0", y0), ("x1", x1), ("y1", y1)):
                        cols[c].append(v)
    return cols


def _unit_rows(plan: Plan, done: dict, stats: dict) -> list[dict]:
    opt: dict = {}
    for s in plan.opt_shards:
        summary = done.get(s["id"])
        for r in (summary or {}).get("rows", []):
            p = r["preset"]
            opt.setdefault((s["layer"], r["unit"]), {}).update(
                {f"opt_{p}": r["activation"], f"dead_{p}": r["dead"],
                 **{f"{q}_{p}": r[q] for q in ("act", "hf", "robust") if r.get(q) is not None}})
    rows = []
    for l in plan.layers:
        st = stats.get(l["name"])
        for u in l["selected"]:
            row = {"layer": l["name"], "unit": u, **opt.get((l["name"], u), {})}
            if st is not None:
                row.update(mean=float(st["mean"][u]), std=float(st["std"][u]), max=float(st["max"][u]),
                           frac_positive=float(st["frac_positive"][u]), count=int(st["count"]))
                for p in plan.presets:   # activation reached / the strongest dataset image's
                    act, top = row.get(f"act_{p['name']}"), row["max"]
                    if act is not None and top > 0:
                        row[f"ratio_{p['name']}"] = act / top
            rows.append(row)
    return rows


def _summary(plan: Plan, done: dict, failed: dict, skipped: int, computed: int, started: float,
             store: Store) -> dict:
    n_units = sum(len(l["selected"]) for l in plan.layers)
    dead = set()
    for s in plan.opt_shards:
        for r in (done.get(s["id"]) or {}).get("rows", []):
            if r["dead"]:
                dead.add((s["layer"], r["unit"]))
    skipped_images = [x for s in plan.data_shards for x in (done.get(s["id"]) or {}).get("skipped", [])]
    seen = sum((done.get(s["id"]) or {}).get("seen", 0) for s in plan.data_shards)
    return {
        "status": "failed" if failed else "complete",
        "units": n_units, "layers": len(plan.layers), "dead_units": len(dead),
        "opt_shards": len(plan.opt_shards), "data_shards": len(plan.data_shards),
        "shards_computed": computed, "shards_skipped": skipped,
        "failed_shards": [{"id": k, "error": v} for k, v in sorted(failed.items())],
        "images": len(plan.images), "images_seen": seen, "images_skipped": len(skipped_images),
        "skipped_images": skipped_images, "seconds": round(time.time() - started, 2), "atlas": store.uri,
    }


def _versions() -> dict:
    import ray
    import torch
    return {"deepvis": VERSION, "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version()}


def _write_manifest(store: Store, plan: Plan, status: str, started: float, summary: dict | None = None) -> None:
    cfg = plan.cfg
    labels = plan.labels
    m = {
        "schema_version": layout.SCHEMA_VERSION,
        "status": status,
        "model": {**plan.model, "labels": labels,
                  "output_layer": next((l["name"] for l in reversed(plan.layers)
                                        if labels and l["units"] == len(labels)), None)},
        "layers": [{"name": l["name"], "kind": l["kind"], "shape": l["shape"], "units": l["units"],
                    "selected": l["selected"]} for l in plan.layers],
        "presets": plan.presets,
        "optimization": {"steps": cfg.steps, "size": cfg.size, "diversity": cfg.diversity},
        "k": cfg.k,
        "dataset": None if not cfg.dataset else {
            "uri": _dataset_uri(cfg.dataset),
            "images": len(plan.images),
            "images_seen": (summary or {}).get("images_seen"),
            "images_skipped": (summary or {}).get("images_skipped"),
            "skipped": (summary or {}).get("skipped_images", []),
        },
        "build": {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if summary else None,
                  "seconds": (summary or {}).get("seconds"), "versions": _versions(),
                  "config": {k: v for k, v in cfg.to_dict().items() if k not in ("progress",)},
                  "actors": (summary or {}).get("actors", []),
                  "actors_lost": (summary or {}).get("actors_lost", 0)},
        "failed_shards": (summary or {}).get("failed_shards", []),
    }
    layout.put_json(store, layout.MANIFEST, m)


def _publish_viewer(store: Store) -> None:
    try:
        from deepvis.atlas_viewer.publish import publish
    except ImportError:
        return  # the viewer is not part of this version yet
    publish(store)


class _Bars:
    """tqdm bars: units optimized, images searched, units cropped (with rate and ETA)."""

    def __init__(self, plan: Plan, done: dict, enabled: bool):
        from tqdm import tqdm
        self.tqdm, self.enabled, self.bars = tqdm, enabled, {}
        if not enabled:
            return
        n_p = max(1, len(plan.presets))
        if plan.opt_shards:
            tot = sum(len(s["units"]) for s in plan.opt_shards) * n_p
            ini = sum(len(s["units"]) for s in plan.opt_shards if s["id"] in done) * n_p
            self.bars["opt"] = tqdm(total=tot, initial=ini, desc="optimize", unit="img", file=sys.stderr,
                                    position=0, dynamic_ncols=True)
        if plan.data_shards:
            tot = len(plan.images)
            ini = sum(len(s["images"]) for s in plan.data_shards if s["id"] in done)
            self.bars["data"] = tqdm(total=tot, initial=ini, desc="dataset ", unit="img", file=sys.stderr,
                                     position=len(self.bars), dynamic_ncols=True)

    def start_crops(self, total: int, initial: int) -> None:
        if self.enabled:
            self.bars["crop"] = self.tqdm(total=total, initial=initial, desc="crops   ", unit="shard",
                                          file=sys.stderr, position=len(self.bars), dynamic_ncols=True)

    def update(self, shard: dict, summary: dict) -> None:
        bar = self.bars.get(shard["type"])
        if bar is None:
            return
        if shard["type"] == "opt":
            bar.update(len(summary["rows"]))
        elif shard["type"] == "data":
            bar.update(summary["images"])
        else:
            bar.update(1)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()
