"""`deepvis build --dry-run`: what a build would write and how long it would take, from its plan.

Counts are exact for a fresh build (they follow the same rules as cluster.build and
cluster.worker); bytes and seconds come from a small table of measured costs per device class,
`COSTS` below — the one place to update when the code gets faster (re-measure with
`python bench/dryrun.py --calibrate`, which prints the CPU row). No Ray and no I/O here."""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field

REF_PX = 64          # optimization costs are measured at this image size and scaled by pixels
PER_SHEET = 256      # viewer sprite tiles per sheet (atlas_viewer.publish.PER_SHEET)


@dataclass(frozen=True)
class DeviceCosts:
    """Measured costs of one device class, per actor. Seconds unless named otherwise."""
    name: str
    source: str                   # where the numbers come from (machine, date, bench command)
    ray_start: float              # a local `ray.init` (0 when joining a running cluster)
    actor_start: float            # actor process up, model loaded, first-call imports done
    opt_unit_step: float          # one unit × one optimization step at REF_PX (paper preset, batched)
    opt_modern_factor: float      # a modern preset's step (Fourier/transforms) ÷ a paper preset's
    opt_image: float              # per optimized image: quality measures, display image, PNG encode
    opt_shard: float              # per optimization shard: setup, completion record
    image_forward: float          # one dataset image: decode + forward through every hooked layer + top-k
    crop_sweep: float             # the receptive-field sweep of every layer, once per build (a CPU task
                                  # using every core of its node: wall seconds)
    input_image: float            # one source image of the top/bottom lists: decode, resize, JPEG
    tile: float                   # viewer publish, per unit and view: tile, sheet, layer JSON rows
    write_local: float            # one object put to a local directory
    write_s3: float               # one object put to S3 (small object, one PUT)
    topk_row: float               # driver: one top-k row (merge, boxes, topk.parquet, viewer JSON)
    tail: float                   # fixed end of a build: indexes, manifest, viewer copy, Ray shutdown
    png_bytes_at_ref: int         # an optimized image's PNG at REF_PX (bytes scale by pixels)
    input_bytes: int              # an input image's JPEG at 224 px (bytes scale by pixels)
    record_row_bytes: int         # opt completion record: one unit-preset row, without its history
    tile_bytes: int               # sprite sheet bytes per tile


# The table. CPU: measured on this project's 2-core machine (bench/dryrun.py --calibrate, one
# torch thread per actor as cluster.build.actor_layout gives a CPU actor). cuda: derived from
# BENCHMARKS.md's H200 runs (optimization: 111 units/s at 224 px, 20 steps, batch 32, i.e. 0.45 ms
# per unit-step at 224 px = 0.037 ms at REF_PX; dataset pass: 1,182 images/s full pass) — not a
# dry-run calibration; crops and writes are host-side
# work, taken as the CPU's per core.
COSTS: dict[str, DeviceCosts] = {
    "cpu": DeviceCosts(
        name="cpu (x86_64, 1 torch thread per actor)",
        source="bench/dryrun.py --calibrate on a 2-core AMD EPYC, 2026-12-04, idle (load 0.26): "
               "opt_unit_step, opt_image, image_forward, write_local; crop_sweep and tile from the quiet "
               "full default-layer build of efficientnet_lite0 (100 images, bench/fullnet.py, 2026-12-04: "
               "receptive sweep 14.2 s, viewer 7.9 s for 23,816 units); input_image: schema 3's inputs, "
               "0.72 s for 100 images in 2 tasks on 2 cores",
        ray_start=3.0, actor_start=4.0, opt_unit_step=0.0029, opt_modern_factor=1.5,
        opt_image=0.021, opt_shard=0.05, image_forward=0.08, crop_sweep=14.0, input_image=0.014,
        tile=0.00033, write_local=0.00012, write_s3=0.0036, topk_row=0.00001,
        tail=2.0, png_bytes_at_ref=9000, input_bytes=16000, record_row_bytes=1000, tile_bytes=3500),
    "cuda": DeviceCosts(
        name="cuda (NVIDIA H200; derived from BENCHMARKS.md, not calibrated)",
        source="BENCHMARKS.md: Optimization on NVIDIA H200 (111 units/s at 224 px, 20 steps, batch 32 = "
               "0.45 ms per unit-step), Dataset pass cuda H200 (1,182 images/s); the receptive sweep "
               "(a CPU task), crops, tiles and writes: the CPU's",
        ray_start=3.0, actor_start=8.0, opt_unit_step=0.000037, opt_modern_factor=1.5,
        opt_image=0.004, opt_shard=0.05, image_forward=0.00085, crop_sweep=14.0, input_image=0.014,
        tile=0.00033, write_local=0.00012, write_s3=0.0036, topk_row=0.00001,
        tail=2.0, png_bytes_at_ref=9000, input_bytes=16000, record_row_bytes=1000, tile_bytes=3500),
}


@dataclass
class Objects:
    """Objects a build writes, by kind (each written key counted once)."""
    opt_png: int = 0
    input_jpg: int = 0
    records: int = 0
    states: int = 0
    index: int = 0
    manifest: int = 1
    viewer: int = 0

    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass
class Estimate:
    device: str
    actors: int
    costs: str                    # DeviceCosts.name
    source: str
    objects: Objects
    bytes: dict[str, int]
    seconds: dict[str, float]     # per phase, wall clock; "total" included
    shards: dict[str, int]
    slowdown: float = 1.0         # load_factor() the CPU costs were multiplied by
    shards_done: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def schedule(costs: list[float], n: int) -> float:
    """Wall time of shards of these costs on n actors taking the next shard when free (the pool's
    order: as planned)."""
    if not costs:
        return 0.0
    free = [0.0] * max(1, min(n, len(costs)))
    for c in costs:
        t = heapq.heappop(free)
        heapq.heappush(free, t + c)
    return max(free)


def crops_per_unit(k: int, images: int) -> int:
    """Top-k and bottom-k crops of a unit: min(k, images) each (RunningTopK.result)."""
    return 2 * min(k, images)


HISTORY_EVERY = 10    # tasks.units.HISTORY_EVERY: an opt record holds the activation every 10 steps
HISTORY_POINT_BYTES = 24   # one history value in the record's indented JSON


def _images_per_unit(shard: dict, presets: list[dict]) -> int:
    """Optimized images of one unit in an opt shard: diversity applies to modern presets only."""
    div = int(shard.get("diversity", 1))
    return sum(div if p.get("kind") == "modern" else 1 for p in presets)


def _steps(p: dict, steps: int | None) -> int:
    return int(steps) if steps is not None else int(p.get("steps", 1000))


def count_objects(plan, crop_shards: int, static_files: int) -> Objects:
    """What a fresh build of `plan` (cluster.build.Plan with its shards made) writes."""
    k, n_img = plan.cfg.k, len(plan.images)
    units = [len(l["selected"]) for l in plan.layers]
    o = Objects()
    o.opt_png = sum(len(s["units"]) * _images_per_unit(s, plan.presets) for s in plan.opt_shards)
    o.records = len(plan.opt_shards) + len(plan.data_shards)
    o.states = len(plan.data_shards) + merged_states(len(plan.data_shards))
    o.index = 1 + (1 if plan.data_shards else 0)            # units.parquet, topk.parquet
    if plan.data_shards:
        # an upper bound: one input image per distinct source image of the top/bottom lists
        # (cluster/crops.py), at most every image of the dataset
        o.input_jpg = min(n_img, sum(units) * crops_per_unit(k, n_img))
        o.records += crop_shards
        o.states += 1                                        # _build/receptive.npz
    views = len(plan.presets) + (1 if plan.data_shards else 0)   # presets + the top-0 crop view
    sheets = sum(math.ceil(n / PER_SHEET) for n in units) * views
    o.viewer = static_files + 1 + len(plan.layers) + sheets     # files, model.json, layer JSONs, sprites
    return o


def merged_states(n: int) -> int:
    """States the tree merge writes for n dataset shards (cluster/merge.py: groups of FAN_IN per
    level; a group of one is passed up as it is)."""
    from deepvis.cluster.merge import FAN_IN

    written = 0
    while n > 1:
        groups = [min(FAN_IN, n - i) for i in range(0, n, FAN_IN)]
        written += sum(1 for g in groups if g > 1)
        n = len(groups)
    return written


def crop_shard_count(plan, cpus: int) -> int:
    """Crop tasks (cluster.crops.task_size: TASK_IMAGES source images each, fewer when that spreads
    them over more of the cluster's `cpus`), taking every dataset image as a source image (the
    top/bottom lists may name fewer); at least one when there is a dataset pass."""
    from deepvis.cluster.crops import task_size

    if not plan.data_shards:
        return 0
    n = len(plan.images)
    return max(1, math.ceil(n / task_size(n, cpus)))


def opt_size(plan) -> int:
    return int(plan.cfg.size or plan.model["preprocessing"]["crop"])


def count_bytes(plan, o: Objects, c: DeviceCosts) -> dict[str, int]:
    """Rough sizes by kind, fitted to real builds (PNGs and input images scale with pixels)."""
    px = (opt_size(plan) / REF_PX) ** 2
    k, units = plan.cfg.k, sum(len(l["selected"]) for l in plan.layers)
    rows = sum(len(s["units"]) * len(plan.presets) for s in plan.opt_shards)
    hist = sum(len(s["units"]) * (_steps(p, plan.cfg.steps) // HISTORY_EVERY + 2)
               for s in plan.opt_shards for p in plan.presets)
    full_k = sum(l["units"] for l in plan.layers) * 2 * k   # a state holds every unit of its layers
    tiles = units * (len(plan.presets) + (1 if plan.data_shards else 0))
    return {
        "opt_png": int(o.opt_png * c.png_bytes_at_ref * px),
        "input_jpg": int(o.input_jpg * c.input_bytes * (plan.model["preprocessing"]["crop"] / 224) ** 2),
        "records": rows * c.record_row_bytes + hist * HISTORY_POINT_BYTES + o.records * 1500
        + o.input_jpg * 60,                                  # crop records list their images
        "states": o.states * (full_k * 26 + 2000),
        "index": o.index * 5000 + units * 60 + (units * 2 * k * 14 if plan.data_shards else 0),
        "manifest": 2000 + (16_000 if plan.labels else 0) + units * 6,   # + the class names
        "viewer": 60_000 + tiles * c.tile_bytes + units * (60 + (2 * k * 40 if plan.data_shards else 0)),
    }


def _opt_shard_seconds(plan, s: dict, c: DeviceCosts, write: float) -> float:
    px = (opt_size(plan) / REF_PX) ** 2
    t = c.opt_shard + write
    for p in plan.presets:
        factor = c.opt_modern_factor if p.get("kind") == "modern" else 1.0
        n_img = len(s["units"]) * _images_per_unit(s, [p])
        t += n_img * (_steps(p, plan.cfg.steps) * c.opt_unit_step * px * factor + c.opt_image + write)
    return t


def _entries(plan) -> int:
    """Top/bottom-k rows of a build (0 without a dataset pass)."""
    if not plan.data_shards:
        return 0
    return sum(len(l["selected"]) for l in plan.layers) * crops_per_unit(plan.cfg.k, len(plan.images))


def _crop_items(plan, c: DeviceCosts, write: float, n: int) -> list[float]:
    """Seconds per crop task (cluster/crops.py): each of the (at most) every dataset image is decoded,
    preprocessed, encoded and written once, split evenly over the n crop tasks."""
    entries = _entries(plan)
    if not entries:
        return []
    total = min(entries, len(plan.images)) * (c.input_image + write)
    return [total / n + write] * n


def schedule_crops(items: list[float], n: int, sweep: float) -> float:
    """One receptive-field sweep of the whole network (one task, before any crop), then the crop tasks
    on n workers."""
    return sweep + schedule(items, n) if items else 0.0


def estimate(plan, *, device: str, actors: int, local_ray: bool, s3: bool, plan_seconds: float,
             static_files: int, depths: dict[str, float] | None = None, slowdown: float = 1.0,
             costs: dict[str, DeviceCosts] | None = None, cpus: int | None = None) -> Estimate:
    """Objects, bytes and seconds per phase of building `plan` (shards made) on `actors` actors.
    depths: a layer's depth in the model, 0..1 (receptive-field sweeps); slowdown: load_factor()
    for CPU builds (the measured plan_seconds already include it); cpus: the cluster's CPUs, which
    the crop tasks spread over (default: one an actor, the least a GPU node has)."""
    table = costs or COSTS
    c = table["cuda" if str(device).startswith("cuda") else "cpu"]
    write = c.write_s3 if s3 else c.write_local
    # the crop tasks spread over the cluster's CPUs: one actor a core on CPU; on GPUs, at least a CPU
    # an actor (a node has more)
    cpus = max(actors, cpus or actors)
    n_crop = crop_shard_count(plan, cpus)
    o = count_objects(plan, n_crop, static_files)
    opt = [_opt_shard_seconds(plan, s, c, write) for s in plan.opt_shards]
    # the dataset forward stops after the deepest selected layer: its depth's share of a full forward
    deepest = max((depths or {}).values(), default=1.0) if depths else 1.0
    data = [len(s["images"]) * c.image_forward * deepest + 2 * write for s in plan.data_shards]
    crops = _crop_items(plan, c, write, n_crop) if plan.data_shards else []
    tiles = sum(len(l["selected"]) for l in plan.layers) * (len(plan.presets) + (1 if plan.data_shards else 0))
    busy = opt + data
    sec = {
        "startup": (c.ray_start if local_ray else 0.0) + (c.actor_start if busy or crops else 0.0),
        "optimize_and_dataset": schedule(busy, actors),
        "crops": schedule_crops(crops, cpus, c.crop_sweep),
        "index_and_viewer": c.tail + tiles * c.tile + (o.index + o.manifest + o.viewer) * write
        + _entries(plan) * c.topk_row,
    }
    sec = {k: round(v * slowdown, 2) for k, v in sec.items()}
    sec["startup"] = round(sec["startup"] + plan_seconds, 2)
    sec["total"] = round(sum(sec.values()), 2)
    return Estimate(device=str(device), actors=actors, costs=c.name, source=c.source, objects=o,
                    bytes=count_bytes(plan, o, c), seconds=sec, slowdown=round(slowdown, 2),
                    shards={"opt": len(plan.opt_shards), "data": len(plan.data_shards), "crop": n_crop})


def load_factor(load: float, cpus: int, actors: int) -> float:
    """How much slower CPU work runs on a shared machine: our actors share the cores with the
    load already there (1-minute load average); 1 on an idle machine with an actor per core."""
    return max(1.0, (load + actors) / max(1, cpus))

