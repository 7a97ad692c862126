"""Benchmark: the build's optimization pass against the deep-visualization-toolbox's loop, in one run.

  toolbox  one unit at a time, a plain full forward pass of the network per step (the layer captured
           by a hook), the same start image, update and regularizers; this process, torch's default
           threads (every core)
  build    `deepvis build` itself (cluster.build.run_build: the actors' code, ShardWorker._optimize:
           optimize_units, quality measures, PNG writes) on a local Ray cluster started once, CPU
           actors as the build sizes them; units/s is MARGINAL: (32 - 8) units / (time of the 32-unit
           build - time of the 8-unit build), so start-up and fixed costs cancel
  actor compute  optimize_units on one shard (8 units) in this process with 1 torch thread, as an
           actor runs it: contiguous vs channels_last model (CPU seconds, robust to a busy machine)

Builds and baselines are interleaved (--repeat), best of each kept: on a shared machine the ratio in
one run is what to read. Writes the "## Optimization" section of BENCHMARKS.md (others are kept).

    python bench/optimize.py                          # CPU: _blocks.8, 128 px, 20 steps, 8 -> 32 units
    python bench/optimize.py --quick --no-write       # smoke run
    python bench/optimize.py --device cuda --batches 8,32 --size 224
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmd import replace_section  # noqa: E402  (bench/ is the script directory)

from deepvis.tasks.models import load_model  # noqa: E402
from deepvis.tasks.optimize import (Hyper, clip_range, get_preset, objective, optimize_units,  # noqa: E402
                            regularize, start_image, unit_seed)

SECTION = "## Optimization"


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_unit(model, pre, layer, unit, preset, model_name, steps, size, device) -> float:
    """One unit, the toolbox's loop: full forward each step, the layer's output taken by a hook.
    Same start image and update (tasks.optimize.regularize). Returns the best activation."""
    dtype = torch.float32
    mean = torch.tensor(pre["mean"], dtype=dtype, device=device).view(1, 3, 1, 1)
    to_model = 1.0 / (255.0 * torch.tensor(pre["std"], dtype=dtype, device=device).view(1, 3, 1, 1))
    lo, hi = -255.0 * mean, 255.0 * (1.0 - mean)
    x = start_image(unit_seed(model_name, layer, unit, preset.name), size, dtype)[None].to(device)
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    units = torch.tensor([unit], device=device)
    hyper = Hyper([preset], device, dtype)
    best, best_x = -math.inf, None
    try:
        for t in range(steps):
            x = clip_range(x, lo, hi).requires_grad_(True)
            model(x * to_model)                                  # the whole network, every step
            a = objective(captured.pop("out"), units)
            g, = torch.autograd.grad(a.sum(), x)
            x = x.detach()
            if float(a.detach()) > best:                         # keep the best iterate, as the toolbox
                best, best_x = float(a.detach()), x.clone()
            if t < steps - 1:
                x = regularize(x, g, t, hyper)
    finally:
        handle.remove()
    assert best_x is not None
    return best


def timed(fn, device, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if hasattr(os, "getloadavg"):
        desc += f", load average {os.getloadavg()[0]:.1f} at the start"
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host: {desc}"
    return desc


def write_section(path: Path, body: str) -> None:
    replace_section(path, SECTION, f"{SECTION}\n\n{body.rstrip()}\n")


def build_seconds(a, units: str, out: str) -> float:
    """Wall seconds of one `deepvis build` (run_build) of the layer's `units`, no dataset."""
    from deepvis.cluster.build import run_build
    from deepvis.cluster.config import BuildConfig
    cfg = BuildConfig(model=a.model, layers=a.layer, units=units, presets=a.preset, steps=a.steps, size=a.size,
                      dataset=None, out=out, progress=False, device=a.device)
    t0 = time.perf_counter()
    s = run_build(cfg, log=lambda *m: None)
    if s["status"] != "complete":
        raise SystemExit(f"build failed: {s['failed_shards']}")
    return time.perf_counter() - t0


def actor_compute(model, pre, a, preset, channels_last: bool) -> float:
    """CPU seconds of optimize_units on one 8-unit shard, 1 thread (an actor's compute)."""
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.process_time()
        optimize_units(model, pre, a.layer, list(range(8)), [preset], model_name=a.model, steps=a.steps,
                       size=a.size, device=a.device)
        return time.process_time() - t0
    finally:
        torch.set_num_threads(threads)
        model.to(memory_format=torch.contiguous_format)


def measure_all(a, lm, preset, tmp) -> dict:
    """Interleaved repeats of every row; the best of each (seconds)."""
    import ray
    model, pre = lm.module, lm.preprocessing
    n_base = max(1, a.baseline_units)
    best: dict[str, float] = {}

    def keep(name, sec):
        best[name] = min(best.get(name, math.inf), sec)
        print(f"  {name}: {sec:.2f} s", file=sys.stderr, flush=True)
    baseline_unit(model, pre, a.layer, 0, preset, a.model, 2, a.size, a.device)              # warm-up
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR)
    try:
        for r in range(a.repeat):
            for threads in (os.cpu_count(), 1):
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                for u in range(n_base):
                    baseline_unit(model, pre, a.layer, u, preset, a.model, a.steps, a.size, a.device)
                keep(f"toolbox {threads}", time.perf_counter() - t0)
            torch.set_num_threads(os.cpu_count())
            for n in (a.small, a.large):
                keep(f"build {n}", build_seconds(a, f"0:{n}", str(tmp / f"b{n}-{r}")))
            for cl in (False, True):
                keep(f"actor {'channels_last' if cl else 'contiguous'}", actor_compute(model, pre, a, preset, cl))
    finally:
        ray.shutdown()
    return best


def actor_cpu_seconds(a, units: str, out: str) -> float:
    """CPU seconds (this process, 1 thread) of the opt shards a build makes for `units`, each run by
    ShardWorker.run as a CPU actor runs it (optimize_units, quality measures, PNGs, records)."""
    from deepvis.cluster.build import make_plan, make_shards
    from deepvis.cluster.config import BuildConfig
    from deepvis.cluster.worker import ShardWorker
    from deepvis.storage.store import open_store
    cfg = BuildConfig(model=a.model, layers=a.layer, units=units, presets=a.preset, steps=a.steps, size=a.size,
                      dataset=None, out=out, progress=False, device="cpu")
    plan = make_plan(cfg)
    make_shards(plan, gpu=False)
    w = ShardWorker(a.model, None, open_store(out), "cpu", 1)
    w.run(plan.opt_shards[0])                                       # warm-up
    t0 = time.process_time()
    for shard in plan.opt_shards:
        w.run(shard)
    return time.process_time() - t0


def measure_cpu_seconds(a, lm, preset, tmp) -> dict:
    """--cpu-seconds: every row in CPU seconds of one thread (robust to a busy machine), interleaved."""
    model, pre = lm.module, lm.preprocessing
    torch.set_num_threads(1)
    baseline_unit(model, pre, a.layer, 0, preset, a.model, 2, a.size, a.device)              # warm-up
    best: dict[str, float] = {}

    def keep(name, sec):
        best[name] = min(best.get(name, math.inf), sec)
        print(f"  {name}: {sec:.2f} CPU s", file=sys.stderr, flush=True)
    for r in range(a.repeat):
        t0 = time.process_time()
        for u in range(max(1, a.baseline_units)):
            baseline_unit(model, pre, a.layer, u, preset, a.model, a.steps, a.size, a.device)
        keep("toolbox 1", time.process_time() - t0)
        for n in (a.small, a.large):
            keep(f"build {n}", actor_cpu_seconds(a, f"0:{n}", str(tmp / f"c{n}-{r}")))
        for cl in (False, True):
            keep(f"actor {'channels_last' if cl else 'contiguous'}", actor_compute(model, pre, a, preset, cl))
    return best


def main(argv=None) -> int:
    import shutil
    import tempfile
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--layer", default="_blocks.8", help="target layer (default: a mid-network block)")
    p.add_argument("--preset", default="yosinski-3")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", type=int, default=128, help="image size (default 128)")
    p.add_argument("--steps", type=int, default=20, help="optimization steps per unit (default 20)")
    p.add_argument("--small", type=int, default=8, help="units of the smaller build (default 8)")
    p.add_argument("--large", type=int, default=32, help="units of the larger build (default 32)")
    p.add_argument("--baseline-units", type=int, default=4, help="units timed for the toolbox loop (default 4)")
    p.add_argument("--repeat", type=int, default=2, help="interleaved repeats, best kept (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 px, 5 steps, 2 -> 4 units, 1 repeat")
    p.add_argument("--cpu-seconds", action="store_true",
                   help="CPU seconds of one thread instead of wall time, the build's shards run by ShardWorker "
                        "in this process (for a busy machine; no Ray)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.steps, a.small, a.large, a.baseline_units, a.repeat = 64, 5, 2, 4, 2, 1
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but CUDA is not available")
    preset = get_preset(a.preset)
    lm = load_model(a.model, device=device)
    where = machine(device)
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-opt-"))
    try:
        best = (measure_cpu_seconds if a.cpu_seconds else measure_all)(a, lm, preset, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    body = report(a, best, where, load0, argv)
    print(body)
    if not a.no_write:
        write_section(Path(a.out), body)
        print(f"wrote the {SECTION!r} section of {a.out}", file=sys.stderr)
    return 0


def report(a, best: dict, where: str, load0: float, argv) -> str:
    n_base = max(1, a.baseline_units)
    base_threads = min((k for k in best if k.startswith("toolbox")), key=lambda k: best[k])
    base = n_base / best[base_threads]
    marginal = (a.large - a.small) / max(1e-9, best[f"build {a.large}"] - best[f"build {a.small}"])
    rows = [(f"toolbox loop, {k.split()[1]} thread(s)", n_base, best[k], n_base / best[k])
            for k in sorted(k for k in best if k.startswith("toolbox"))]
    what = "actor's shards (ShardWorker.run), 1 thread" if a.cpu_seconds else "deepvis build"
    rows += [(f"{what}, {n} units", n, best[f"build {n}"], n / best[f"build {n}"]) for n in (a.small, a.large)]
    rows.append((f"{what}, marginal {a.small} → {a.large} units", a.large - a.small,
                 best[f"build {a.large}"] - best[f"build {a.small}"], marginal))
    unit = "CPU seconds" if a.cpu_seconds else "seconds"
    lines = [f"| method | units | {unit} | units/{unit[:-1]} | vs toolbox |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {n} | {s:.2f} | {u:.3g} | {u / base:.2f}x |" for m, n, s, u in rows]
    cl, co = best["actor channels_last"], best["actor contiguous"]
    cmd = "python bench/optimize.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return "\n".join([
        f"The build's optimization pass against the deep-visualization-toolbox's loop, `{a.model}` layer "
        f"`{a.layer}`, preset `{a.preset}`, {a.steps} steps, {a.size} px. *toolbox*: one unit at a time, a "
        f"full forward pass per step, in this process ({n_base} units). *deepvis build*: `run_build` into a "
        f"fresh directory on a local Ray cluster started once (CPU actors as the build sizes them), no "
        f"dataset; *marginal* = the extra units over the extra seconds, so start-up cancels. Interleaved, "
        f"best of {a.repeat}; the machine was shared, read the ratios."
        + (" **`--cpu-seconds`**: the machine was too busy for wall time (load 20-40 on 2 cores), so every row "
           "is CPU seconds of one thread in this process: the toolbox loop at 1 thread, and the build's own "
           "shards (make_shards' sizing) run by `ShardWorker.run` with 1 torch thread as each CPU actor does "
           "(a CPU build runs one actor per core)." if a.cpu_seconds else ""),
        "",
        f"- machine: {where}, {os.getloadavg()[0]:.1f} at the end",
        f"- date: {dt.date.today().isoformat()}; command: `{cmd.strip()}`",
        "",
        *lines,
        "",
        f"**Build (marginal) / toolbox (its best thread count) = {marginal / base:.2f}×** (target ≥ 2×). "
        f"An actor's compute on one 8-unit shard, 1 thread, CPU seconds: contiguous {co:.2f} s, "
        f"channels_last {cl:.2f} s (**{co / cl:.2f}×**, why the actors use channels_last).",
    ])


if __name__ == "__main__":
    sys.exit(main())
