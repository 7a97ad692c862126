"""Benchmark: `deepvis build --dry-run`'s time estimate against the measured time of the same build.

For each configuration: (1) the dry run through the CLI in a fresh process (`python -m deepvis.cli
build --dry-run --json ...`), its wall time (target < 10 s); (2) the same build for real, fresh
output directory, same process kind, its wall time; ratio = estimate ÷ measured (target 0.5–2×).

  A  the default layer set of efficientnet_lite0, `--presets none`, a list file of 100 sample images
     (every 8th); `--layers-a` narrows it when the full crop pass would take too long
  B  `--presets yosinski-3 --steps 2 --size 32` over a few layers (no dataset)

`--calibrate` measures the CPU cost table instead (cluster.estimate.DeviceCosts: a ShardWorker in
this process, 1 torch thread, as a CPU actor runs) and prints it for cluster/estimate.py's COSTS.

    python bench/dryrun.py                     # both configurations, writes BENCHMARKS.md
    python bench/dryrun.py --calibrate
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmd import replace_section  # noqa: E402  (bench/ is the script directory)

SECTION = "## Dry-run estimate vs measured"
SAMPLE = ROOT.parent / "shared" / "datasets" / "imagenet-sample"
B_LAYERS = "_blocks.1,_blocks.8,_blocks.15"
NOTES = """*load factor*: the dry run multiplies the CPU costs (cluster.estimate.COSTS, idle-machine figures)
by (1-minute load average + actors) ÷ CPUs, as measured when it runs (1 on an idle machine). Each
configuration first waits (up to 3 minutes) for the 1-minute load average to fall below 0.5: the
load a build leaves behind decays for minutes and would count as load that is not there. *dry run s*: wall time of the whole
command (Python and torch start-up, model load, layer resolution, dataset listing); *CPU s* is its
CPU time. *A*: the full default layer set (66 layers, 23,816 units) over 100 sample images, built
for real after its dry run (`--layers-a` narrows it, `--only` picks one configuration). The object
count is an upper bound: one input image per distinct source image of the top/bottom lists (atlas
schema 3), at most every image of the dataset. *C*: GoogLeNet (torchvision's, random weights: the
same cost) over A's images, all its default layers: the cost table is efficientnet_lite0's (a
dataset image, a unit-step), so this row shows how far it carries to another network. GPU rows of the
cost table are derived from the H200 sections above, not measured by this benchmark."""


def dataset_list(folder: Path, n: int, path: Path) -> str:
    files = sorted(folder.glob("*/*.JPEG"))
    step = max(1, len(files) // n)
    path.write_text("".join(f"{f}\n" for f in files[::step][:n]))
    return str(path)


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cli(args: list[str]) -> tuple[float, dict]:
    """Run `deepvis build ARGS --json` in a fresh process: (wall seconds, its JSON); its CPU seconds
    go to the JSON's "cpu_seconds" (about the wall time on an idle machine)."""
    t, c = time.perf_counter(), cpu_children()
    r = subprocess.run([sys.executable, "-m", "deepvis.cli", "build", *args, "--json", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"deepvis build {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    out = json.loads(r.stdout)
    out["cpu_seconds"] = cpu_children() - c
    return wall, out


def load() -> float:
    return os.getloadavg()[0]


def settle(below: float = 0.5, limit: float = 180.0) -> float:
    """Wait until the 1-minute load average is below `below` (at most `limit` s): the dry run's load
    factor counts the load there is when it runs, and the load a previous build (this benchmark's, or
    another's) leaves decays for minutes after it ends. Returns the seconds waited."""
    t = time.perf_counter()
    while load() >= below and time.perf_counter() - t < limit:
        time.sleep(5)
    return round(time.perf_counter() - t, 1)


def measure(name: str, args: list[str], tmp: Path, full: bool = False) -> dict:
    waited = settle()
    print(f"{name}: waited {waited} s for the load to settle ({load():.2f})", file=sys.stderr, flush=True)
    out = tmp / name
    dry_wall, d = cli([*args, "--dry-run", "--out", str(out)])
    assert not out.exists(), "the dry run wrote its output directory"
    if full:                     # the full default layer set: its dry run only (see the module doc)
        return {"name": name, "args": args, "dry_wall": dry_wall, "dry_cpu": d["cpu_seconds"],
                "estimate": d["seconds"]["total"], "phases": d["seconds"], "layers": len(d["layers"]),
                "units": d["units"], "objects": sum(d["objects"].values()), "measured": None,
                "ratio": None, "load": (load(), load()), "slowdown": d["slowdown"]}
    l0 = load()
    wall, s = cli([*args, "--out", str(out)])
    return {"name": name, "args": args, "dry_wall": dry_wall, "dry_cpu": d["cpu_seconds"],
            "slowdown": d["slowdown"], "estimate": d["seconds"]["total"],
            "phases": d["seconds"], "layers": len(d["layers"]), "units": d["units"],
            "objects": sum(d["objects"].values()), "measured": wall, "status": s["status"],
            "ratio": d["seconds"]["total"] / wall, "load": (l0, load())}


def gpu_figures() -> str:
    """The cuda row of the cost table, labelled: derived from the H200 sections, not measured here."""
    from deepvis.cluster.estimate import COSTS
    c = COSTS["cuda"]
    return (f"GPU (cuda) costs used by the dry run — **derived, not measured by this benchmark** ({c.source}): "
            f"{c.opt_unit_step * 1e3:.3f} ms per unit-step at 64 px (× pixels: "
            f"{c.opt_unit_step * 1e3 * (224 / 64) ** 2:.2f} ms at 224 px), {c.image_forward * 1e3:.2f} ms per "
            f"dataset image, {c.crop_sweep:g} s per full receptive-field sweep, actor start {c.actor_start:g} s "
            f"(a guess: CUDA init + model load).")


def section(rows: list[dict], cmd: str) -> str:
    import torch
    lines = [SECTION, "",
             f"`{cmd}` ({dt.date.today().isoformat()}): the dry run's estimate for the device it "
             f"would use against the wall time of the same build (fresh output directory; both through "
             f"the CLI in a fresh process, so the estimate includes Python/torch start-up). "
             f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
             f"torch {torch.__version__}; CPU actors, 1 torch thread each. Targets: dry run < 10 s; "
             f"estimate ÷ measured within 0.5–2×.", "",
             "| config | layers | units | objects | dry run s (CPU s) | load factor | estimate s | measured s | ratio | load avg before → after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = "not run" if r["measured"] is None else f"{r['measured']:.1f}"
        q = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['name']}: `{' '.join(r['args'])}` | {r['layers']} | {r['units']:,} | "
                     f"{r['objects']:,} | {r['dry_wall']:.1f} ({r['dry_cpu']:.1f}) | ×{r['slowdown']:g} | "
                     f"{r['estimate']:.1f} | {m} | {q} | {r['load'][0]:.1f} → {r['load'][1]:.1f} |")
    lines += ["", "Estimated phases (s): " + "; ".join(
        f"{r['name']}: " + ", ".join(f"{k} {v:g}" for k, v in r["phases"].items()) for r in rows), "",
        NOTES, "", gpu_figures()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- --calibrate
def _timed(fn, *a) -> tuple[float, object]:
    t = time.perf_counter()
    r = fn(*a)
    return time.perf_counter() - t, r


def _opt_costs(w, layer: str = "_blocks.8") -> dict:
    """Two opt shards of 8 units at 64 px, 2 and 22 steps: the step cost and the per-image rest."""
    def shard(steps, units):
        return {"type": "opt", "id": f"opt/{layer}/{units[0]}-{units[-1]}", "hash": "x", "layer": layer,
                "units": units, "presets": ["yosinski-3"], "steps": steps, "size": 64}
    first, _ = _timed(w.run, shard(2, list(range(8))))            # first call: lazy imports
    short, _ = _timed(w.run, shard(2, list(range(8, 16))))
    long_, _ = _timed(w.run, shard(22, list(range(16, 24))))
    step = (long_ - short) / (8 * 20)
    return {"opt_unit_step": step, "opt_image": max(0.0, (short - 8 * 2 * step) / 8),
            "first_call": first - short}


def _data_and_crop_costs(w, store, ds: str, n: int = 32) -> dict:
    """The dataset pass's cost per image. (Crop costs: cluster/crops.py's tasks run outside the
    actors; their per-image figure in COSTS comes from bench/fullnet.py's crop phase.)"""
    from deepvis.cluster.build import Plan, make_plan, make_shards
    from deepvis.cluster.config import BuildConfig

    plan: Plan = make_plan(BuildConfig(presets="none", dataset=ds, shard_images=n, batch_size=n, out="unused"))
    make_shards(plan)
    data = plan.data_shards[0]
    t_data, _ = _timed(w.run, data)
    return {"image_forward": t_data / len(data["images"])}


def _decode_seconds(w, ds: str, ids: list[str]) -> float:
    from deepvis.storage.datasets import dataset_root, read_image
    from deepvis.tasks.preprocess import crop_input
    t, _ = _timed(lambda: [crop_input(read_image(dataset_root(ds), i), w.lm.preprocessing) for i in ids])
    return t / len(ids)


def calibrate(sample: Path) -> dict:
    """The CPU row of cluster.estimate.COSTS, measured here (1 torch thread, like a CPU actor)."""
    import torch
    from deepvis.cluster.worker import ShardWorker
    from deepvis.storage.store import LocalStore

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dryrun-cal-") as tmp:
        ds = dataset_list(sample, 32, Path(tmp) / "images.txt")
        store = LocalStore(Path(tmp) / "atlas")
        t_start, w = _timed(ShardWorker, "efficientnet_lite0", None, store, "cpu", 1, ds)
        out = {**_opt_costs(w), **_data_and_crop_costs(w, store, ds)}
        out["actor_start"] = t_start + out.pop("first_call")
        blob = os.urandom(5000)
        t_w, _ = _timed(lambda: [store.put(f"w/{i}.bin", blob) for i in range(500)])
        out["write_local"] = t_w / 500
        out["tile"] = _tile_seconds(store)
    import ray
    t_ray, _ = _timed(lambda: ray.init(num_cpus=os.cpu_count(), include_dashboard=False))
    ray.shutdown()
    out["ray_start"] = t_ray
    out["load"] = load()
    return {k: round(v, 6) for k, v in out.items()}


def _tile_seconds(store) -> float:
    from deepvis.atlas_viewer.publish import _tile
    keys = [k for k in store.list("units/") if k.endswith(".png")]
    datas = [store.get(k) for k in keys]
    t, _ = _timed(lambda: [_tile(d, 64) for d in datas])
    return t / max(1, len(datas))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calibrate", action="store_true", help="measure the CPU cost table and print it")
    p.add_argument("--images", type=int, default=100, help="dataset images of configuration A")
    p.add_argument("--layers-a", default=None, help="layers of configuration A (default: all)")
    p.add_argument("--only", choices=("A", "B", "C"), default=None)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    if a.calibrate:
        print(json.dumps(calibrate(SAMPLE), indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="dryrun-bench-") as tmp:
        tmp = Path(tmp)
        ds = dataset_list(SAMPLE, a.images, tmp / "images.txt")
        rows: list[dict] = []
        if a.layers_a and a.only in (None, "A"):
            rows.append(measure("A (full)", ["--presets", "none", "--dataset", ds], tmp, full=True))
            print(json.dumps(rows[-1]), flush=True)
        configs = {"A": ["--presets", "none", "--dataset", ds] + (["--layers", a.layers_a] if a.layers_a else []),
                   "B": ["--presets", "yosinski-3", "--steps", "2", "--size", "32", "--layers", B_LAYERS],
                   # another network: the cost table is efficientnet_lite0's; how far it carries
                   "C": ["--model", "torchvision:googlenet", "--weights", "none", "--presets", "none", "--dataset", ds]}
        for name, args in configs.items():
            if a.only in (None, name):
                rows.append(measure(name, args, tmp))
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["args"] = [x if x != ds else f"<{a.images} images>" for x in r["args"]]
    text = section(rows, "python bench/dryrun.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if not a.no_write:
        replace_section(Path(a.out), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
