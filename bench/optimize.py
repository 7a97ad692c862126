"""Benchmark: regularized activation maximization, batched over units vs one unit at a time.

  batched   tasks.optimize.optimize_units: B units in one batch, one forward/backward per step that
            stops at the target layer (tasks.hooks.hooked)
  baseline  the deep-visualization-toolbox's way: one unit at a time, a plain full forward pass of
            the network per step (the layer captured by a hook), the same update and regularizers

Both run the same preset and number of steps at the same image size, in one process. Reports units/s
and writes the table to BENCHMARKS.md (its "## Optimization" section; other sections are kept).

    python bench/optimize.py                          # CPU defaults: 64 and 128 px, batches 1 8 32
    python bench/optimize.py --quick --no-write       # smoke run
    python bench/optimize.py --device cuda --sizes 128,224 --steps 50
"""
from __future__ import annotations

import argparse
import datetime as dt
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--layer", default="_blocks.8", help="target layer (default: a mid-network block)")
    p.add_argument("--preset", default="yosinski-3")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--sizes", default="64,128", help="image sizes, comma-separated (default 64,128)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes (units per batch), default 1,8,32")
    p.add_argument("--steps", type=int, default=20, help="optimization steps per unit (default 20)")
    p.add_argument("--baseline-units", type=int, default=4,
                   help="units timed one at a time for the baseline (default 4)")
    p.add_argument("--repeat", type=int, default=2, help="time each config this many times, keep the best")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64 px, batches 1,8, 5 steps, 2 baseline units, 1 repeat")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.batches, a.steps, a.baseline_units, a.repeat = "64", "1,8", 5, 2, 1
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but CUDA is not available")
    sizes, batches = ints(a.sizes), ints(a.batches)
    preset = get_preset(a.preset)
    lm = load_model(a.model, device=device)
    model, pre = lm.module, lm.preprocessing
    where = machine(device)

    rows = []   # (size, method, batch, units/s)
    for size in sizes:
        n_base = max(1, a.baseline_units)
        base_units = list(range(n_base))
        baseline_unit(model, pre, a.layer, 0, preset, a.model, 2, size, device)          # warm-up
        t = timed(lambda: [baseline_unit(model, pre, a.layer, u, preset, a.model, a.steps, size, device)
                           for u in base_units], device, a.repeat)
        base = n_base / t
        rows.append((size, "baseline: one unit, full forward", 1, base))
        print(f"{size}px baseline: {base:.3f} units/s", file=sys.stderr, flush=True)
        for b in batches:
            units = list(range(b))
            optimize_units(model, pre, a.layer, units, [preset], model_name=a.model, steps=2, size=size,
                           device=device)                                                  # warm-up
            t = timed(lambda: optimize_units(model, pre, a.layer, units, [preset], model_name=a.model,
                                             steps=a.steps, size=size, device=device), device, a.repeat)
            rows.append((size, "batched: optimize_units", b, b / t))
            print(f"{size}px batch {b}: {b / t:.3f} units/s ({b / t / base:.2f}x)", file=sys.stderr, flush=True)

    lines = ["| image | method | units per batch | units/s | vs baseline |", "|---|---|---|---|---|"]
    base_of = {s: u for s, m, _, u in rows if m.startswith("baseline")}
    for s, m, b, u in rows:
        lines.append(f"| {s} px | {m} | {b} | {u:.3g} | {u / base_of[s]:.2f}x |")
    best = max((r for r in rows if not r[1].startswith("baseline")), key=lambda r: r[3] / base_of[r[0]])
    alone = []   # the gain of batching itself: best batch vs batch 1 of optimize_units, per size
    for s_ in sizes:
        one = [u for s, m, b, u in rows if s == s_ and b == 1 and not m.startswith("baseline")]
        top = max(((u, b) for s, m, b, u in rows if s == s_ and not m.startswith("baseline")), default=None)
        if one and top:
            alone.append(f"{s_} px: {top[0] / one[0]:.2f}x (batch {top[1]})")
    cmd = "python bench/optimize.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        f"Regularized activation maximization of `{a.model}` layer `{a.layer}` (preset `{preset.name}`, "
        f"{a.steps} steps per unit), units/s. *batched*: `tasks.optimize.optimize_units`, all units of a "
        f"batch in one forward/backward that stops at the layer. *baseline*: the deep-visualization-"
        f"toolbox's way, one unit at a time with a full forward pass of the network per step "
        f"({a.baseline_units} units timed), same update and regularizers. Best of {a.repeat} runs each.",
        "",
        f"- machine: {where}; device `{device}`",
        f"- date: {dt.date.today().isoformat()}; command: `{cmd.strip()}`",
        "",
        *lines,
        "",
        f"Best: {best[3] / base_of[best[0]]:.2f}x the baseline ({best[0]} px, {best[2]} units per batch)."
        + (f" Batching alone (best batch vs batch 1 of optimize_units): {'; '.join(alone)}." if alone else ""),
    ])
    print(body)
    if not a.no_write:
        write_section(Path(a.out), body)
        print(f"wrote the {SECTION!r} section of {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
