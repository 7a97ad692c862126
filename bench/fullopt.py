"""Benchmark: the full default-layer build of efficientnet_lite0 with EVERY unit optimized too
(`--presets yosinski-3 --steps 2 --size 32`, 100 sample images, into a local directory), and its
per-shard overhead.

  build       run_build's wall time and manifest["build"]["phases"] (one Ray cluster started here
              first, not counted), the number of optimization shards and actors
  per shard   the optimization phase's actor-seconds per shard (phase wall x actors / shards) against
              the same shards' work run in this process, one after another, by `ShardWorker.run` with 1
              torch thread as each CPU actor does (optimize_units, quality measures, PNG encodes and
              local writes, completion record), on a sample of the build's own shards (every 25th);
              overhead = the difference: Ray calls, scheduling, the driver's bookkeeping, idle actors

    .venv/bin/python bench/fullopt.py                     # writes BENCHMARKS.md
    .venv/bin/python bench/fullopt.py --layers '_blocks.1*' --no-write
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmd import replace_section  # noqa: E402  (bench/ is the script directory)
from fullnet import build, dataset_list  # noqa: E402

from deepvis.cluster.build import make_plan, make_shards  # noqa: E402
from deepvis.cluster.config import BuildConfig  # noqa: E402

SECTION = "## Full-network build, every unit optimized"


OPT = {"presets": "yosinski-3", "steps": 2, "size": 32}    # every unit optimized, at the smallest cost


def bare_shards(cfg: BuildConfig, every: int, tmp: Path) -> tuple[int, list[float]]:
    """(number of opt shards, seconds of every `every`-th one run by ShardWorker.run in this process)."""
    import torch

    from deepvis.cluster.worker import ShardWorker
    from deepvis.storage.store import open_store

    plan = make_plan(cfg)
    make_shards(plan, gpu=False)
    threads = torch.get_num_threads()
    w = ShardWorker(cfg.model, None, open_store(str(tmp / "bare")), "cpu", 1)
    try:
        w.run(plan.opt_shards[0])                     # warm-up: first-call imports
        times = []
        for s in plan.opt_shards[::every]:
            t = time.perf_counter()
            w.run(s)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return len(plan.opt_shards), times


def report(args, summary: dict, wall: float, n_shards: int, bare: list[float]) -> str:
    ph = summary.get("phases") or {}
    actors = len(summary.get("actors") or []) or 1
    per_shard = ph.get("optimization", 0.0) * actors / max(1, n_shards)
    mean_bare = statistics.fmean(bare)
    load = os.getloadavg()[0]
    return "\n".join([
        SECTION, "",
        f"`python bench/fullopt.py` — {dt.date.today()}, {os.cpu_count()} cores, load average {load:.1f} at "
        f"the end. efficientnet_lite0, layers {args.layers or 'default (66)'}, {summary['units']} units, "
        f"`--presets yosinski-3 --steps 2 --size 32`, {args.images} sample images, k = 9, into a local "
        f"directory, {actors} CPU actors (1 torch thread each).", "",
        "| whole build (s) | optimization shards | optimization phase (s) | actor-seconds per shard | "
        "the same shard's work alone (s) | overhead per shard (s) | status |",
        "|---:|---:|---:|---:|---:|---:|---|",
        f"| {wall:.1f} | {n_shards} | {ph.get('optimization', 0.0):.1f} | {per_shard:.3f} | "
        f"{mean_bare:.3f} (mean of {len(bare)}) | **{per_shard - mean_bare:.3f}** | {summary['status']} |", "",
        "Phases (manifest build.phases): " + ", ".join(f"{k} {v} s" for k, v in ph.items()) + ".", "",
        "*the same shard's work alone*: `ShardWorker.run` in this process with 1 torch thread, as a CPU actor "
        "runs it (optimize_units, quality measures, PNG encodes, local writes, completion record), on every "
        "25th of the build's own shards; *overhead* = actor-seconds per shard in the build minus that: Ray "
        "calls, scheduling, the driver's bookkeeping and any time an actor waits.",
    ]) + "\n"


def main(argv=None) -> int:
    import ray
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--layers", default=None, help="layer names/globs (default: the 66 default layers)")
    p.add_argument("--every", type=int, default=25, help="time every N-th shard alone (default 25)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fullopt-") as tmp:
        ds = dataset_list(args.images, Path(tmp))
        cfg = BuildConfig(model="efficientnet_lite0", layers=args.layers, dataset=ds, out=str(Path(tmp) / "plan"),
                          progress=False, **OPT)
        n_shards, bare = bare_shards(cfg, args.every, Path(tmp))
        print(f"{n_shards} opt shards; alone: mean {statistics.fmean(bare):.3f} s over {len(bare)}", flush=True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR)
        try:
            b = build(str(Path(tmp) / "atlas"), ds, args.layers, **OPT)
        finally:
            ray.shutdown()
    text = report(args, b["summary"], b["wall"], n_shards, bare)
    print(text)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
