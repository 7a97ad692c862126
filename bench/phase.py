"""Benchmark (issue 16): the dataset phase of a real build, read from manifest["build"]["phases"],
against the bare decode + forward of the same images on the same machine, interleaved in one run.

  build     run_build of efficientnet_lite0 over the images, every default layer (66 layers, 23,816
            units), `--presets none`: its `dataset` phase (shards on the actors: decode processes,
            hooks on every layer, the on-device top-k, each shard's state written)
  bare      the same images decoded by the build's decoder (cluster.decode.Decoder, uint8 batches of
            the same size) and fed to a bare model(x): no hooks, no reducer, nothing written, the
            model loaded and warmed up before the clock starts. Two layouts, the faster is the
            baseline: one process with every core's threads, and one process per core with one thread
            each (the build's CPU actor layout), each taking its share of the images.

The pairs run back to back (bare, build, bare, build, ...); the VM's speed drifts, so each pair's
ratio and their median are reported as well as the best of each.

    .venv/bin/python bench/phase.py                      # 800 sample images, 3 pairs, writes BENCHMARKS.md
    .venv/bin/python bench/phase.py --images 200 --repeat 1 --no-write
"""
from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmd import replace_section  # noqa: E402  (bench/ is the script directory)
from fullnet import build, dataset_list  # noqa: E402

SECTION = "## Dataset phase of a build vs the bare forward"
MODEL = "efficientnet_lite0"


def _bare_proc(source: str, ids: list[str], threads: int, batch: int, ready, go, out) -> None:
    """One bare process: load and warm up, wait for `go`, decode + forward its ids, report seconds."""
    import torch

    from deepvis.cluster.decode import Decoder
    from deepvis.storage.datasets import dataset_root
    from deepvis.tasks.activations import to_model_input
    from deepvis.tasks.models import load_model

    torch.set_num_threads(threads)
    lm = load_model(MODEL, None, device="cpu")
    lm.module.to(memory_format=torch.channels_last)       # as the build's actors
    dec = Decoder(dataset_root(source), lm.preprocessing, 1)

    def run(part):
        with torch.no_grad():
            for b in dec.batches(part, batch):
                if b.ids:
                    lm.module(to_model_input(b.pixels, lm.preprocessing, "cpu", channels_last=True))
    run(ids[:batch])                                       # warm-up: oneDNN builds its kernels here
    ready.release()
    go.wait()
    t = time.perf_counter()
    run(ids)
    out.put(time.perf_counter() - t)
    dec.close()


def bare(source: str, procs: int, threads: int, batch: int) -> float:
    """Wall seconds from `go` until the last of `procs` processes is done, each decoding and
    forwarding its share of the images (contiguous, as the build's shards)."""
    from deepvis.storage.datasets import list_images

    ids = list_images(source)
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    step = -(-len(ids) // procs)
    shares = [ids[i:i + step] for i in range(0, len(ids), step)]
    ps = [ctx.Process(target=_bare_proc, args=(source, s, threads, batch, ready, go, out)) for s in shares]
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)     # as Ray sets it for an actor of `threads` CPUs:
    try:                                             # unset, OpenMP's idle threads slowed 1-thread
        for p in ps:                                 # processes by ~15% here
            p.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    for _ in ps:
        ready.acquire()
    t = time.perf_counter()
    go.set()
    for _ in ps:
        out.get()
    wall = time.perf_counter() - t
    for p in ps:
        p.join()
    return wall


def run(images: int, repeat: int, batch: int) -> dict:
    """`repeat` rounds of (bare in both layouts, build), back to back, in one Ray cluster."""
    import ray

    from deepvis.cluster.resources import allowed_cpus

    cpus = allowed_cpus()
    tmp = Path(tempfile.mkdtemp(prefix="bench-phase-"))
    source = dataset_list(images, tmp)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    rounds = []
    for r in range(repeat):
        one = bare(source, 1, cpus, batch)
        per_core = bare(source, cpus, 1, batch)
        b = build(str(tmp / f"atlas{r}"), source, None, batch_size=batch)
        ph = b["summary"]["phases"]
        rounds.append({"bare_1": one, "bare_n": per_core, "dataset": ph["dataset"], "phases": ph,
                       "wall": b["wall"], "load": os.getloadavg()[0]})
        print(f"  round {r + 1}: bare 1x{cpus} threads {one:.1f} s, bare {cpus}x1 {per_core:.1f} s, "
              f"build dataset phase {ph['dataset']:.1f} s (build {b['wall']:.1f} s)", file=sys.stderr, flush=True)
    ray.shutdown()
    return {"images": images, "batch": batch, "cpus": cpus, "rounds": rounds}


def section(info: dict) -> str:
    rs, n, cpus = info["rounds"], info["images"], info["cpus"]
    base = [min(r["bare_1"], r["bare_n"]) for r in rs]
    ratios = [b / r["dataset"] for b, r in zip(base, rs)]
    best = min(base) / min(r["dataset"] for r in rs)
    lines = ["| round | bare, 1 process × %d threads (s) | bare, %d processes × 1 thread (s) | build `dataset` phase (s) | "
             "baseline / phase | build wall (s) | load (1 min) |" % (cpus, cpus), "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {i + 1} | {r['bare_1']:.1f} | {r['bare_n']:.1f} | {r['dataset']:.1f} | {q:.2f} | {r['wall']:.1f} | "
              f"{r['load']:.1f} |" for i, (r, q) in enumerate(zip(rs, ratios))]
    import torch
    return f"""{SECTION}

`bench/phase.py` (issue 16's target: the build's dataset phase, read from `build.phases`, ≥ 0.9× the
bare decode + forward of the same images, as a ratio in one run). {dt.date.today().isoformat()},
{platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__}; `{MODEL}`, all
66 default layers (23,816 units) hooked, `--presets none`, {n} sample images, batches of {info['batch']}.
The bare runs use the build's decoder (`cluster.decode.Decoder`, 1 decode process each) and a bare
`model(x)` in channels_last, loaded and warmed up before the clock starts; the faster of the two layouts
is each round's baseline. Rounds run back to back.

{chr(10).join(lines)}

**Dataset phase / bare decode + forward: median of the rounds {statistics.median(ratios):.2f}×, best of each
{best:.2f}×** (target ≥ 0.9×). Images/s: bare {n / min(base):.1f}, the build's dataset phase
{n / min(r['dataset'] for r in rs):.1f}. Phases of the last round (s): {', '.join(f'{k} {v}' for k, v in rs[-1]['phases'].items())}.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=800, help="sample images (default: all 800)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of (bare, build)")
    p.add_argument("--batch", type=int, default=0,
                   help="images per forward, in the build and the bare runs (default: the build's CPU default)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    from deepvis.cluster.build import CPU_BATCH
    text = section(run(args.images, args.repeat, args.batch or CPU_BATCH))
    print(text)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", SECTION, text)
        print("wrote the section to BENCHMARKS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
