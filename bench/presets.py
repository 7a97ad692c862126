"""Which preset makes the better images? The paper's yosinski-1..4 against lucid and maco on 5 class
units of the offline model (goldfish, starfish, balloon, strawberry, volcano), measured:

  logit          the class logit reached (the mean over the 5) and its margin over the best of the
                 800 sample photos for that class (min over the 5: > 0 = every image beats every photo)
  p(class) moved mean class probability under random jitter/scale/rotation (tasks.transforms.ROBUSTNESS,
                 8 draws with fixed seeds), the test's measure of transformation robustness
  hf             high-frequency energy relative to natural photos (tasks.quality; 1 = natural)
  robust         logit kept under the same transforms (tasks.quality.robustness)
  s              wall time of the 5 units (one batch per preset)

    python bench/presets.py [--size 128] [--steps 256] [--write]   (--write: the section of BENCHMARKS.md)
    python bench/presets.py --sample 40 --steps 0 --write   (40 class units drawn at random, seed 0:
                                                             how often each preset beats every photo)
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT.parent / "shared" / "datasets" / "imagenet-sample"
CLASSES = [1, 327, 417, 949, 980]
HEADING = "## Presets: measured quality"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=256, help="steps of every preset (0: each preset's own)")
    ap.add_argument("--presets", default="yosinski-1,yosinski-2,yosinski-3,yosinski-4,lucid,maco")
    ap.add_argument("--sample", type=int, default=0,
                    help="instead of the 5 fixed classes, N class units drawn at random (seed 0)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import torch
    from PIL import Image

    from deepvis.tasks.models import load_model
    from deepvis.tasks.optimize import get_preset, optimize_units
    from deepvis.tasks.preprocess import normalize, preprocess
    from deepvis.tasks.quality import finite_mean, measure
    from deepvis.tasks.transforms import ROBUSTNESS

    lm = load_model("efficientnet_lite0")
    files = sorted(SAMPLE.rglob("*.JPEG"))
    with torch.no_grad():
        data = torch.cat([lm.module(torch.stack([preprocess(Image.open(f), lm.preprocessing) for f in files[i:i + 50]]))
                          for i in range(0, len(files), 50)])
    classes = sorted(random.Random(0).sample(range(data.shape[1]), args.sample)) if args.sample else CLASSES
    n, cls = len(classes), torch.tensor(classes)
    best_photo = data[:, classes].max(0).values
    rows = []
    for name in args.presets.split(","):
        p = get_preset(name)
        t0 = time.perf_counter()
        res = optimize_units(lm.module, lm.preprocessing, "_fc", classes, [p], model_name=lm.name,
                             steps=args.steps or None, size=args.size)
        secs = time.perf_counter() - t0
        x = torch.stack([r.image for r in res])
        with torch.no_grad():
            logits = lm.module(normalize(x, lm.preprocessing))[torch.arange(n), cls]
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
        probs = []
        for _ in range(8):
            with torch.no_grad():
                pr = lm.module(normalize(ROBUSTNESS(x, gens), lm.preprocessing)).softmax(1)
            probs.append(pr[torch.arange(n), cls])
        q = measure(lm.module, lm.preprocessing, "_fc", res, lm.name)
        margins = logits - best_photo
        rows.append({"preset": name, "steps": res[0].steps, "logit": float(logits.mean()),
                     "margin": float(margins.min()), "median_margin": float(margins.median()),
                     "beat": int((margins > 0).sum()), "p_moved": float(torch.stack(probs).mean()),
                     "hf": finite_mean(m["hf"] for m in q), "robust": finite_mean(m["robust"] for m in q), "s": secs})
        print(rows[-1], flush=True)
    text = sample_table(args, rows, n, torch.__version__) if args.sample else fixed_table(args, rows, torch.__version__)
    print(text)
    if args.write:
        from bench.benchmd import replace_section
        replace_section(ROOT / "BENCHMARKS.md", text.splitlines()[0], text)
    return 0


def machine(torch_version: str) -> str:
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}, torch {torch_version})"


def fixed_table(args, rows: list[dict], torch_version: str) -> str:
    heading = HEADING if args.steps else HEADING + ", each preset's own step count"
    lines = [heading, "",
             f"`bench/presets.py` ({dt.date.today()}): 5 class units of `efficientnet_lite0` (goldfish, starfish, "
             f"balloon, strawberry, volcano) at {args.size} px, "
             f"{'%d steps for every preset' % args.steps if args.steps else 'each preset at its own step count'}; "
             f"{machine(torch_version)}. *margin* = the "
             f"smallest (image logit − best logit of the 800 sample photos) over the 5 classes: > 0 means every "
             f"image beats every photo. *p(class) moved* = mean class probability under random jitter/scale/"
             f"rotation (8 fixed draws). *hf* = high-frequency energy ÷ natural photos' median (1 = natural). "
             f"*robust* = logit kept under the same transforms (mean over images with a positive logit).", "",
             "| preset | steps | mean logit | margin over photos | p(class) moved | hf | robust | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['steps']} | {r['logit']:.1f} | {r['margin']:+.1f} | {r['p_moved']:.3f} | "
                     f"{r['hf']:.2f} | {r['robust']:.2f} | {r['s']:.0f} |")
    return "\n".join(lines)


def sample_table(args, rows: list[dict], n: int, torch_version: str) -> str:
    lines = [HEADING + ", random class units", "",
             f"`bench/presets.py --sample {n}` ({dt.date.today()}): {n} class units of `efficientnet_lite0` drawn "
             f"at random (`random.Random(0)`, not chosen by result) at {args.size} px, "
             f"{'%d steps for every preset' % args.steps if args.steps else 'each preset at its own step count'}; "
             f"{machine(torch_version)}. *beats every photo* = units whose image logit exceeds the best logit "
             f"of the 800 sample photos for that class; *margin* = image logit − that best photo logit.", "",
             "| preset | steps | beats every photo | min margin | median margin | mean logit | p(class) moved | "
             "hf | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['steps']} | {r['beat']}/{n} | {r['margin']:+.1f} | "
                     f"{r['median_margin']:+.1f} | {r['logit']:.1f} | {r['p_moved']:.3f} | {r['hf']:.2f} | {r['s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
