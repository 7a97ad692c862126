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
CROP_UNITS = 64      # units per crop shard (cluster.build._crop_shards' default)
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
    crop_layer: float             # receptive-field map of a layer, once per layer and actor
    crop: float                   # one crop JPEG: crop + encode (its image decoded once per shard)
    crop_decode: float            # decoding one dataset image for crops
    tile: float                   # viewer publish: decode + paste one unit image into a sprite sheet
    write_local: float            # one object put to a local directory
    write_s3: float               # one object put to S3 (small object, one PUT)
    tail: float                   # fixed end of a build: indexes, manifest, viewer copy, Ray shutdown
    png_bytes_at_ref: int         # an optimized image's PNG at REF_PX (bytes scale by pixels)
    crop_bytes: int               # a crop JPEG, mean
    record_row_bytes: int         # opt completion record: one unit-preset row, without its history
    tile_bytes: int               # sprite sheet bytes per tile


# The table. CPU: measured on this project's 2-core machine (bench/dryrun.py --calibrate, one
# torch thread per actor as cluster.build.actor_layout gives a CPU actor). cuda: derived from
# BENCHMARKS.md's H200 runs (optimization: 227 units/s at 128 px, 20 steps, batch 32; dataset
# pass: 1,182 images/s full pass) — not a dry-run calibration; crops and writes are host-side
# work, taken as the CPU's per core.
COSTS: dict[str, DeviceCosts] = {
    "cpu": DeviceCosts(
        name="cpu (x86_64, 1 torch thread per actor)",
        source="bench/dryrun.py --calibrate, 2-core AMD EPYC, 2026-12-03",
        ray_start=2.2, actor_start=3.0, opt_unit_step=0.0045, opt_modern_factor=1.5,
        opt_image=0.012, opt_shard=0.05, image_forward=0.075, crop_layer=0.3, crop=0.0015,
        crop_decode=0.006, tile=0.0006, write_local=0.0004, write_s3=0.004, tail=2.0,
        png_bytes_at_ref=9000, crop_bytes=4500, record_row_bytes=400, tile_bytes=3500),
    "cuda": DeviceCosts(
        name="cuda (NVIDIA H200, derived from BENCHMARKS.md, not calibrated)",
        source="BENCHMARKS.md: Optimization on NVIDIA H200; Dataset pass cuda H200 (2026-11-27)",
        ray_start=2.2, actor_start=8.0, opt_unit_step=0.000055, opt_modern_factor=1.5,
        opt_image=0.004, opt_shard=0.05, image_forward=0.00085, crop_layer=0.3, crop=0.0015,
        crop_decode=0.006, tile=0.0006, write_local=0.0004, write_s3=0.004, tail=2.0,
        png_bytes_at_ref=9000, crop_bytes=4500, record_row_bytes=400, tile_bytes=3500),
}


@dataclass
class Objects:
    """Objects a build writes, by kind (each written key counted once)."""
    opt_png: int = 0
    crop_jpg: int = 0
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
    o.states = len(plan.data_shards)
    o.index = 1 + (1 if plan.data_shards else 0)            # units.parquet, topk.parquet
    if plan.data_shards:
        o.crop_jpg = sum(units) * crops_per_unit(k, n_img)
        o.records += crop_shards
    views = len(plan.presets) + (1 if plan.data_shards else 0)   # presets + the top-0 crop view
    sheets = sum(math.ceil(n / PER_SHEET) for n in units) * views
    o.viewer = static_files + 1 + len(plan.layers) + sheets     # files, model.json, layer JSONs, sprites
    return o


def crop_shard_count(plan) -> int:
    """Crop shards: CROP_UNITS selected units of one layer each (planned before the dataset pass)."""
    if not plan.data_shards:
        return 0
    return sum(math.ceil(len(l["selected"]) / CROP_UNITS) for l in plan.layers)


def opt_size(plan) -> int:
    return int(plan.cfg.size or plan.model["preprocessing"]["crop"])


def count_bytes(plan, o: Objects, c: DeviceCosts) -> dict[str, int]:
    """Rough sizes by kind (means measured on real builds; PNGs scale with pixels)."""
    px = (opt_size(plan) / REF_PX) ** 2
    k, units = plan.cfg.k, sum(len(l["selected"]) for l in plan.layers)
    rows = sum(len(s["units"]) * len(plan.presets) for s in plan.opt_shards)
    hist = sum(len(s["units"]) * (_steps(p, plan.cfg.steps) // HISTORY_EVERY + 2)
               for s in plan.opt_shards for p in plan.presets)
    unit_k = units * 2 * k
    tiles = units * (len(plan.presets) + (1 if plan.data_shards else 0))
    return {
        "opt_png": int(o.opt_png * c.png_bytes_at_ref * px),
        "crop_jpg": o.crop_jpg * c.crop_bytes,
        "records": rows * c.record_row_bytes + hist * HISTORY_POINT_BYTES + o.records * 200
        + (o.crop_jpg * 150),                                 # crop records list every entry
        "states": o.states * (unit_k * 24 + units * 48),
        "index": units * 60 + (unit_k * 14 if plan.data_shards else 0),
        "manifest": 2000 + units * 6,
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


def _crop_seconds(plan, c: DeviceCosts, write: float) -> list[float]:
    """One cost per crop shard, in the planned order; the first shard of a layer on an actor also
    computes the layer's receptive-field map (charged to the layer's first shard)."""
    per_unit = crops_per_unit(plan.cfg.k, len(plan.images))
    out = []
    for l in plan.layers:
        n = len(l["selected"])
        for i in range(0, n, CROP_UNITS):
            entries = min(CROP_UNITS, n - i) * per_unit
            decodes = min(entries, len(plan.images))     # an image is decoded once per shard
            out.append((c.crop_layer if i == 0 else 0.0) + decodes * c.crop_decode
                       + entries * (c.crop + write) + write)
    return out


def estimate(plan, *, device: str, actors: int, local_ray: bool, s3: bool, plan_seconds: float,
             static_files: int, costs: dict[str, DeviceCosts] | None = None) -> Estimate:
    """Objects, bytes and seconds per phase of building `plan` (shards made) on `actors` actors."""
    table = costs or COSTS
    c = table["cuda" if str(device).startswith("cuda") else "cpu"]
    write = c.write_s3 if s3 else c.write_local
    n_crop = crop_shard_count(plan)
    o = count_objects(plan, n_crop, static_files)
    opt = [_opt_shard_seconds(plan, s, c, write) for s in plan.opt_shards]
    data = [len(s["images"]) * c.image_forward + 2 * write for s in plan.data_shards]
    crops = _crop_seconds(plan, c, write) if plan.data_shards else []
    tiles = sum(len(l["selected"]) for l in plan.layers) * (len(plan.presets) + (1 if plan.data_shards else 0))
    busy = opt + data
    sec = {
        "startup": (c.ray_start if local_ray else 0.0) + plan_seconds + (c.actor_start if busy or crops else 0.0),
        "optimize_and_dataset": schedule(busy, actors),
        "crops": schedule(crops, actors),
        "index_and_viewer": c.tail + tiles * c.tile + (o.index + o.manifest + o.viewer) * write,
    }
    sec = {k: round(v, 2) for k, v in sec.items()}
    sec["total"] = round(sum(sec.values()), 2)
    return Estimate(device=str(device), actors=actors, costs=c.name, source=c.source, objects=o,
                    bytes=count_bytes(plan, o, c), seconds=sec,
                    shards={"opt": len(plan.opt_shards), "data": len(plan.data_shards), "crop": n_crop})
