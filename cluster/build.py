"""`deepvis build`: plan shards of units/images, run them on a Ray actor pool, write the atlas.

Phases (timed, manifest["build"]["phases"]): plan, actors (start/join Ray, wait for the first actor),
optimization shards, dataset shards (one pool of actors sized to the cluster serves both and every
later phase), merge of the dataset shards' partial top-k states (a tree of Ray tasks), receptive-field
crop shards, index Parquet files, viewer.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from deepvis.cluster.config import BuildConfig, parse_units
from deepvis.cluster.resources import allowed_cpus
from deepvis.storage import layout
from deepvis.storage.errors import StoreError
from deepvis.storage.store import Store, open_store
from deepvis.tasks.errors import UserError

VERSION = "0.1.0"
# the dataset pass's images per forward when --batch-size is not given. CPU: 8, measured (bench/phase.py,
# BENCHMARKS.md): a batch's maps stay in the caches, 1.2x the images/s of batches of 32 on this 2-core
# CPU with the hooks' reductions reading every map once more; GPU: 32, as before
CPU_BATCH, GPU_BATCH = 8, 32
# Dataset shard caps. Every shard leaves a partial state of every unit (12 MB for lite0's 23,816 units,
# k=9) that is written, read back and merged: ImageNet train in 200-image shards is 5,720 states, 73 GB
# through S3; in 4,096-image shards 320 states, 4 GB (cluster.estimate). A GPU actor does 4,096 images
# in seconds (decode-bound, ~1,200 img/s a node), so a lost shard costs little and 320 shards still
# keep 8 actors busy to the end. A CPU actor takes ~8 s for 200 (its state costs 2% of that).
CPU_SHARD_IMAGES, GPU_SHARD_IMAGES = 200, 4096


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
    batch_size: int = 0           # the dataset pass's, set by make_shards (--batch-size or the device's)


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
    if infos:  # a range past every selected layer is an error, not an empty or clamped selection
        widest = max(infos, key=lambda i: i.units)
        parse_units(cfg.units, widest.units, widest.name)
    layers = [{**i.to_dict(), "selected": parse_units(cfg.units, i.units, i.name, clamp=True)} for i in infos]
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
    base = {"v": VERSION, "model": plan.cfg.model, "weights": _weights_signature(plan.cfg.weights),
            "pre": plan.model["preprocessing"]}
    # what changes the numbers, only when not the default (the shards of earlier builds keep their hash)
    for key, default in (("precision", "fp32"), ("decoder", "pil")):
        if getattr(plan.cfg, key) != default:
            base[key] = getattr(plan.cfg, key)
    return base


def make_shards(plan: Plan, gpu: bool = False, actors: int = 1, store: Store | None = None) -> None:
    """Split the work: optimization shards of units (one layer each, so the forward pass stops at that
    layer; sized for the device) and dataset shards of consecutive image ids, balanced over `actors`
    (see data_shard_sizes), or as an earlier run of this build into `store` split them."""
    cfg, base = plan.cfg, _base_hash(plan)
    names = [p["name"] for p in plan.presets]
    if plan.presets:
        # images per batch on a CPU actor, measured (bench/optimize.py, BENCHMARKS.md): 8 at 128 px and
        # more (larger batches fall out of the caches), 32 at 64 px and less
        size = cfg.size or plan.model["preprocessing"]["crop"]
        per = cfg.shard_units or max(1, (128 if gpu else 32 if size <= 64 else 8) // len(plan.presets))
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
    plan.batch_size = cfg.batch_size or (GPU_BATCH if gpu else CPU_BATCH)
    if plan.images:
        names_l = [l["name"] for l in plan.layers]
        units_l = [l["units"] for l in plan.layers]
        start = 0
        cap = cfg.shard_images or (GPU_SHARD_IMAGES if gpu else CPU_SHARD_IMAGES)
        for j, n in enumerate(data_shard_sizes(len(plan.images), plan.batch_size, cap, actors,
                                               _planned_data_shards(store, plan))):
            ids = plan.images[start:start + n]
            start += n
            shard = {"type": "data", "layers": names_l, "units": units_l, "k": cfg.k, "images": ids,
                     "batch_size": plan.batch_size}
            shard["id"] = f"data/{j:05d}"
            shard["hash"] = _hash({**base, **{k: v for k, v in shard.items() if k != "batch_size"},
                                   "dataset": _dataset_uri(cfg.dataset)})
            plan.data_shards.append(shard)


def data_shard_sizes(images: int, batch: int, cap: int, actors: int = 1, count: int | None = None) -> list[int]:
    """Images per dataset shard, in order. Whole batches each (ShardWorker._dataset: an image's batch
    must not depend on the sharding), at most `cap` images (rounded up to a batch), and as equal as
    whole batches allow, in a number of shards that is a multiple of `actors`: shards of 7, 7, 7 and 4
    batches on 2 actors left one idle for a fifth of the dataset phase (bench/phase.py). `count`: the
    number of shards an earlier run of the same build planned (kept, so its finished shards match)."""
    batches = -(-images // batch)
    if not batches:
        return []
    if not count:
        count = -(-batches // max(1, -(-cap // batch)))
        count = -(-count // max(1, actors)) * max(1, actors)
    count = max(1, min(count, batches))
    q, r = divmod(batches, count)
    sizes = [(q + (i < r)) * batch for i in range(count)]
    sizes[-1] -= sum(sizes) - images           # the last batch of the last shard is the short one
    return sizes


# ---------------------------------------------------------------- Ray
def connect(address: str | None) -> bool:
    """Start or join a Ray cluster. Returns True when this call started it (and should stop it)."""
    import ray

    from deepvis.storage.s3 import redact_text, redact_url   # an address may hold user:secret@
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
            raise UserError(f"cannot reach the Ray cluster at {redact_url(address)!r}; check the address "
                            f"(head node's GCS host:port or ray://host:10001) or omit --address for a local cluster") from None
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
    try:
        if address in (None, "", "local"):
            ray.init(num_cpus=allowed_cpus(), **kwargs)  # the CPUs a container/taskset allows
        else:
            ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {redact_url(address)!r} "
                        f"({redact_text(str(e), address)}); start one with "
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
    if cfg.precision != "fp32":
        raise UserError(f"--precision {cfg.precision} needs GPU actors and this cluster has no GPU (on CPU, "
                        f"reduced precision was slower than fp32 here, see BENCHMARKS.md); use --precision fp32")
    if cfg.decoder == "nvjpeg":
        raise UserError("--decoder nvjpeg decodes on the actors' GPUs and this cluster has no GPU; "
                        "use --decoder pil (or torchvision)")
    n = cfg.actors or max(1, int(cpus))
    return n, {"num_cpus": min(1.0, cpus / n), **spread}, 1


# ---------------------------------------------------------------- the build
PHASES = ("plan", "actors", "optimization", "dataset", "merge", "crops", "index", "viewer")


@dataclass
class Phases:
    """Wall-clock seconds per phase of this run only: a resumed build records what it did itself.
    The phases do not overlap, so they add up to about the build's seconds."""
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def move(self, src: str, dst: str, seconds: float) -> None:
        """Count `seconds` of phase src as dst's (time a phase spent waiting for the first actor)."""
        self.seconds[src] -= seconds
        self.seconds[dst] = self.seconds.get(dst, 0.0) + seconds

    def to_dict(self) -> dict[str, float]:
        return {k: round(max(0.0, v), 3) for k, v in self.seconds.items()}


@dataclass
class _Build:
    """One run of a build: what every phase function reads and adds to."""
    cfg: BuildConfig
    store: Store
    plan: Plan
    started: float
    phases: Phases
    log: Callable[[str], None]
    on_actor: Callable | None = None
    done: dict = field(default_factory=dict)      # shard id -> summary (finished now or before)
    failed: dict = field(default_factory=dict)    # shard id -> error
    todo: list = field(default_factory=list)
    skipped: int = 0
    actors_info: list = field(default_factory=list)
    make_actor: Callable | None = None
    layout: tuple = ()
    pool: object = None                           # started on first use: a resumed build loads no model
    restarts: int = 0                             # actors lost (process or node) over the build
    pools: int = 0                                # pools made (one per stretch of phases on actors)
    bars: object = None

    def run_shards(self, phase: str, shards: list[dict], on_done) -> None:
        """Run shards on the pool (made on first use, sized to the cluster), timed as `phase`; the
        time spent waiting for the first actor is the "actors" phase's."""
        with self.phases(phase):
            if not shards:
                return
            if self.pool is None:
                self.pool = _make_pool(self)
            waited = self.pool.waiting_s
            self.failed.update(self.pool.run(shards, on_done))
        self.phases.move(phase, "actors", self.pool.waiting_s - waited)

    def close_pool(self) -> None:
        if self.pool is not None:
            self.restarts += self.pool.restarts
            self.pool.shutdown()
            self.pool = None

    def finished(self, shard: dict, summary: dict) -> None:
        self.done[shard["id"]] = summary
        self.bars.update(shard, summary)


def run_build(cfg: BuildConfig, on_actor=None, log=print) -> dict:
    """The build, holding the store's lease (one build per store; taken before the model or Ray
    start, so an unwritable --out or a concurrent build fails at once); Ctrl-C and SIGTERM leave the
    manifest saying 'interrupted' (see cluster/lease.py)."""
    from deepvis.cluster.lease import build_guard

    # the driver handles SIGTERM itself (the manifest says 'interrupted'); Ray's C++ failure-signal
    # handler would print a stack dump and abort the driver on the way out. Read when ray is first
    # imported; a local cluster's workers inherit it (a crashing worker logs no C++ stack dump).
    if cfg.dry_run:
        return dry_run(cfg)      # the plan and its estimate; no lease, no Ray, nothing written
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    with build_guard(open_store(cfg.out, cfg.endpoint_url), cfg.force, log):
        return _run_build(cfg, on_actor, log)


def _run_build(cfg: BuildConfig, on_actor=None, log=print) -> dict:
    """Plan, then the phases in order: optimization, dataset, merge, crops (every one on the whole
    pool), index files, manifest and viewer. Returns the summary (see `_summary`)."""
    import ray

    started, phases = time.time(), Phases()
    with phases("plan"):
        store = open_store(cfg.out, cfg.endpoint_url)
        plan = make_plan(cfg)
        if cfg.dataset and not (cfg.address or "").startswith("ray://"):
            from deepvis.storage.datasets import check_list_entries
            check_list_entries(cfg.dataset, plan.images)   # a list read from the wrong directory
    with phases("actors"):
        started_ray = connect(cfg.address)
    try:
        b = _Build(cfg, store, plan, started, phases, log, on_actor)
        with phases("plan"):
            _prepare(b)
        merged, crop_done = _compute(b)
        return _finish(b, merged, crop_done)
    finally:
        if started_ray:
            ray.shutdown()


def _prepare(b: _Build) -> None:
    """Shards, the 'running' manifest, and what a previous run finished already."""
    import ray
    from deepvis.cluster.worker import ShardWorker

    cfg, plan = b.cfg, b.plan
    b.layout = actor_layout(cfg)
    n_actors, opts, threads = b.layout
    make_shards(plan, gpu="num_gpus" in opts, actors=n_actors, store=b.store)
    _write_manifest(b.store, plan, status="running", started=b.started)
    b.done = _finished_records(b.store, plan.opt_shards + plan.data_shards)
    b.todo = [s for s in plan.opt_shards + plan.data_shards if s["id"] not in b.done]
    b.skipped = len(plan.opt_shards) + len(plan.data_shards) - len(b.todo)
    b.log(_plan_line(plan, n_actors, "num_gpus" in opts, b.phases.seconds["plan"]))
    if b.skipped:
        b.log(f"resuming: {b.skipped} finished shard(s) skipped, {len(b.todo)} to compute")
    # credentials never travel with the store (it pickles without them): actors use their own AWS
    # chain — a local cluster's workers inherit the driver's environment, a remote cluster's nodes
    # have instance roles or profiles. Two calls at once: one computes while the other uploads.
    remote = ray.remote(ShardWorker).options(max_restarts=0, max_concurrency=2, **opts)
    b.make_actor = lambda: remote.remote(cfg.model, cfg.weights, b.store, cfg.device, threads,  # noqa: E731
                                         cfg.dataset, cfg.presets_file, cfg.endpoint_url,
                                         precision=cfg.precision, decoder=cfg.decoder)


def _plan_line(plan: Plan, actors: int, gpu: bool, seconds: float) -> str:
    """What the build will do, said before its first actor starts (listing a large dataset and
    planning take a while: the user sees it has begun)."""
    units = sum(len(l["selected"]) for l in plan.layers)
    presets = ", ".join(p["name"] for p in plan.presets) or "none"
    images = f"{len(plan.images):,} images" if plan.data_shards else "no dataset"
    return (f"plan: {units:,} units in {len(plan.layers)} layers, presets {presets}, {images}: "
            f"{len(plan.opt_shards):,} optimization and {len(plan.data_shards):,} dataset shards for "
            f"{actors} {'GPU' if gpu else 'CPU'} actor(s) ({seconds:.1f} s)")


def _make_pool(b: _Build):
    from deepvis.cluster.pool import ShardPool

    n_actors, opts, _ = b.layout
    # the manifest lists the build's actors: those of the first pool (a later one, for the crops, is
    # made of the same actors again once the merge's tasks have had the CPUs)
    b.pools += 1
    first = b.pools == 1

    def started(actor, info):
        if first:
            b.actors_info.append(info)
        if b.on_actor:
            b.on_actor(actor, info)
    ask = {k: v for k, v in opts.items() if k in ("num_cpus", "num_gpus", "resources")}
    return ShardPool(b.make_actor, n_actors, b.cfg.max_attempts, started, fatal=(StoreError,),
                     place_timeout=b.cfg.actor_timeout, ask=ask, log=b.log)


def overlap_sweep(actor_layout: tuple) -> bool:
    """Whether the crops' receptive-field sweep (a CPU task that depends on the architecture alone)
    runs during the optimization and dataset passes: with GPU actors, whose nodes' CPUs are mostly
    idle then. CPU actors take a core each, and the sweep would only slow them (bench/fullnet.py on 2
    cores: the dataset phase 12.1 -> 17.7 s, the whole build 61.5 -> 66.1 s); it runs after them."""
    return "num_gpus" in actor_layout[1]


def _compute(b: _Build) -> tuple[dict | None, object]:
    """The phases that run on the cluster: optimization, dataset, merge, crops. Returns the merged
    dataset states (None without a complete dataset pass) and the crop phase's CropIndex."""
    from deepvis.cluster.crops import run_crop_phase, start_receptive

    plan = b.plan
    b.bars = _Bars(plan, b.done, b.cfg.progress)
    merged, crop_done = None, None
    receptive = start_receptive(b.store, plan) if plan.data_shards and overlap_sweep(b.layout) else None
    try:
        todo = {s["id"] for s in b.todo}
        try:
            b.run_shards("optimization", [s for s in plan.opt_shards if s["id"] in todo], b.finished)
            b.run_shards("dataset", [s for s in plan.data_shards if s["id"] in todo], b.finished)
        finally:
            b.close_pool()   # the merge's tasks need the CPUs the actors hold
            b.bars.close()   # the passes' bars: the messages below go on lines of their own
        if plan.data_shards and not any(s["id"] in b.failed for s in plan.data_shards):
            with b.phases("merge"):
                merged = _merge_dataset(b.store, plan)
            b.log(f"merge: {len(plan.data_shards):,} dataset shard state(s) merged "
                  f"({b.phases.seconds['merge']:.1f} s)")
            with b.phases("crops"):   # Ray tasks on every node's CPUs (the pool is closed)
                crop_done = run_crop_phase(b.store, plan, merged, b.log, receptive)
            b.failed.update(crop_done.failed)
    finally:
        b.bars.close()
    return merged, crop_done


def _finish(b: _Build, merged: dict | None, crop_done: dict) -> dict:
    """Index files, the summary, the manifest and the viewer."""
    plan, store = b.plan, b.store
    with b.phases("index"):
        stats = {}
        if merged is not None:
            layout.write_topk(store, _topk_rows(plan, merged, crop_done))
            stats = {l["name"]: merged[l["name"]].result()["stats"] for l in plan.layers}
        unit_rows = _unit_rows(plan, b.done, stats)
        store.put(layout.UNITS, layout.table_bytes(layout.units_table(unit_rows, [p["name"] for p in plan.presets])))

    def summarize() -> dict:
        summary = _summary(plan, b.done, b.failed, b.skipped, len(b.todo), b.started, store)
        summary.update(actors=b.actors_info, actors_lost=b.restarts,
                       phases=b.phases.to_dict())
        _write_manifest(store, plan, status=summary["status"], started=b.started, summary=summary)
        return summary
    with b.phases("index"):
        summarize()                   # the viewer reads the manifest
    b.log(f"viewer: publishing {len(plan.layers)} layer(s)")
    with b.phases("viewer"):
        _publish_viewer(store)
    return summarize()                # again, now with the viewer's seconds


def dry_run(cfg: BuildConfig) -> dict:
    """The build's plan, what it would write and a time estimate (cluster.estimate), without starting
    Ray, creating the store or writing anything. An existing store is only listed and read, to count
    the shards a re-run would skip."""
    from deepvis.cluster.estimate import estimate, load_factor

    t0 = time.time()
    plan = make_plan(cfg)
    device, n_actors, local = _dry_layout(cfg)
    make_shards(plan, gpu=device.startswith("cuda"), actors=n_actors, store=_existing_store(cfg))
    plan_seconds = time.time() - t0
    slowdown = 1.0 if device.startswith("cuda") else load_factor(os.getloadavg()[0], os.cpu_count() or 1, n_actors)
    est = estimate(plan, device=device, actors=n_actors, local_ray=local, s3=cfg.out.startswith("s3://"),
                   plan_seconds=plan_seconds, static_files=_static_files(), slowdown=slowdown,
                   depths=_layer_depths(cfg, plan) if plan.data_shards else None,
                   cpus=(os.cpu_count() or 1) if local else None)   # a remote cluster's: unknown here
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


def _existing_store(cfg: BuildConfig) -> Store | None:
    """The build's store when it exists already (None for a directory not there yet: not created)."""
    if "://" not in cfg.out or cfg.out.startswith("file://"):
        path = cfg.out[len("file://"):] if cfg.out.startswith("file://") else cfg.out
        if not os.path.isdir(os.path.expanduser(path)):
            return None
    return open_store(cfg.out, cfg.endpoint_url)   # an existing directory or bucket: not modified


def _planned_data_shards(store: Store | None, plan: Plan) -> int | None:
    """The number of dataset shards an earlier run of this build into `store` planned (its manifest),
    when it covered the same images in the same batches: a resume on a cluster of another size keeps
    that sharding, so the shards it finished still count. None otherwise."""
    if store is None or not plan.images:
        return None
    m = layout.get_json(store, layout.MANIFEST)        # a damaged manifest reads as None: plan afresh
    build = m.get("build") if isinstance(m, dict) else None
    ds = m.get("dataset") if isinstance(m, dict) else None
    if not isinstance(build, dict) or not isinstance(ds, dict):
        return None
    same = (ds.get("uri") == _dataset_uri(plan.cfg.dataset) and ds.get("images") == len(plan.images)
            and build.get("batch_size") == plan.batch_size)
    n = build.get("data_shards")
    return n if same and isinstance(n, int) and n > 0 else None


def _dry_done(cfg: BuildConfig, plan: Plan) -> dict[str, int]:
    """Shards an existing store already holds (what a re-run skips); {} when there is no store yet.
    Crop tasks are counted by their records: their ids and hashes need the merged dataset pass."""
    store = _existing_store(cfg)
    if store is None:
        return {}
    done = _finished_records(store, plan.opt_shards + plan.data_shards)
    crops = len(store.list(layout.RECORDS + "/crops/"))   # crop tasks: ids known only after the merge
    return {"opt": sum(1 for s in plan.opt_shards if s["id"] in done),
            "data": sum(1 for s in plan.data_shards if s["id"] in done),
            "crop": crops}


def _finished_records(store: Store, shards: list[dict]) -> dict[str, dict]:
    """Shard id -> summary, for the shards whose completion record matches their current hash."""
    return layout.matching_records(store, layout.RECORDS + "/", {s["id"]: s["hash"] for s in shards})


def _merge_dataset(store: Store, plan: Plan) -> dict:
    """Merge the dataset shards' partial states, per layer (exact: order does not matter), in a tree
    of Ray tasks: the driver handles keys and reads only the final state (cluster/merge.py)."""
    from deepvis.cluster.merge import tree_merge
    from deepvis.tasks.topk import RunningTopK

    key = tree_merge(store, [layout.state_key(s["id"]) for s in plan.data_shards])
    state = layout.unpack_state(store.get(key))
    return {l["name"]: RunningTopK.from_state_dict(state[f"L{i}"]) for i, l in enumerate(plan.layers)}


def _topk_rows(plan: Plan, merged: dict, crops) -> dict[str, list]:
    """index/topk.parquet's columns, (layer, unit, kind, rank) order; boxes and input keys from the
    crop phase (cluster.crops.CropIndex)."""
    cols: dict[str, list] = {f.name: [] for f in layout.TOPK_SCHEMA}
    for l in plan.layers:
        res, sel = merged[l["name"]].result(), l["selected"]
        k = res["top"]["activation"].shape[1]
        for i, u in enumerate(sel):
            for kind in ("top", "bottom"):
                r, boxes, keys = res[kind], crops.boxes[(l["name"], kind)], crops.keys[(l["name"], kind)]
                cols["layer"] += [l["name"]] * k
                cols["unit"] += [u] * k
                cols["kind"] += [kind] * k
                cols["rank"] += range(k)
                cols["activation"] += r["activation"][u].tolist()
                cols["image"] += [str(v) for v in r["image"][u]]
                cols["y"] += r["y"][u].tolist()
                cols["x"] += r["x"][u].tolist()
                for c, col in (("x0", 0), ("y0", 1), ("x1", 2), ("y1", 3)):
                    cols[c] += boxes[i, :, col].tolist()
                cols["input"] += keys[i]
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
            "decoder": cfg.decoder,
            "images": len(plan.images),
            "images_seen": (summary or {}).get("images_seen"),
            "images_skipped": (summary or {}).get("images_skipped"),
            "skipped": (summary or {}).get("skipped_images", []),
        },
        "build": {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if summary else None,
                  "seconds": (summary or {}).get("seconds"), "versions": _versions(),
                  "config": {k: v for k, v in cfg.public_dict().items() if k not in ("progress", "force")},
                  "data_shards": len(plan.data_shards),   # a resume keeps this sharding
                  "batch_size": plan.batch_size,
                  "actors": (summary or {}).get("actors", []),
                  "actors_lost": (summary or {}).get("actors_lost", 0),
                  "phases": (summary or {}).get("phases", {})},
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
