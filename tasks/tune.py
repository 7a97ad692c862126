"""The paper's random search over regularization hyperparameters (Yosinski et al. tried 300
combinations), scored by measured quality (tasks.quality) instead of by eye.

Each trial is a Preset drawn from the ranges the paper explored; the trials' images of the sample
units are optimized together (a preset per image: the batched loop), then measured. Score of a trial
(higher is better), over its units:
      score = mean(min(ratio, 2)) * mean(clip(robust, 0, 1)) / max(1, median(hf))
ratio = activation reached / the unit's top dataset activation (or, without a reference, / the best
activation any trial reached for that unit): strong, still strong when moved, and not noisier than
natural photos."""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

import torch

from deepvis.tasks.optimize import Preset, optimize_units
from deepvis.tasks.quality import finite, finite_mean, measure


def sample_presets(n: int, seed: int = 0, steps: int = 200) -> list[Preset]:
    """n random regularization settings from the paper's ranges (reproducible for a seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        blur_width = 0.0 if rng.random() < 0.2 else round(rng.uniform(0.3, 1.5), 2)
        progress = rng.random() < 0.3
        out.append(Preset(
            name=f"trial-{i:03d}",
            decay=0.0 if rng.random() < 0.25 else float(f"{10 ** rng.uniform(-5, math.log10(0.3)):.2g}"),
            blur_width=blur_width,
            blur_every=0 if blur_width == 0 else rng.choice([1, 2, 4, 6, 8]),
            norm_pct=0.0 if rng.random() < 0.5 else round(rng.uniform(5, 50)),
            contrib_pct=0.0 if rng.random() < 0.5 else round(rng.uniform(10, 90)),
            steps=steps,
            lr=100.0 if progress else float(f"{10 ** rng.uniform(0, 3):.2g}"),
            lr_policy="progress" if progress else "constant"))
    return out


def score(ratios: list[float], robust: list[float], hf: list[float]) -> float:
    r, h = finite(ratios), finite(hf)
    if not r or not h:
        return float("-inf")
    r_term = sum(min(x, 2.0) for x in r) / len(r)
    # robustness is undefined (NaN) where the image does not excite the unit at all: it counts as 0
    b = [min(max(x, 0.0), 1.0) if x is not None and math.isfinite(x) else 0.0 for x in robust]
    b_term = sum(b) / len(b) if b else 0.0
    return r_term * b_term / max(1.0, statistics.median(h))


@dataclass
class Trial:
    preset: Preset
    score: float
    ratio: float
    robust: float
    hf: float
    per_unit: list[dict]


def tune(lm, layer: str, units: list[int], presets: list[Preset], *, size: int, device="cpu",
         reference: dict[int, float] | None = None, batch: int = 64, on_batch=None) -> list[Trial]:
    """Optimize and measure every (trial preset, unit); trials best first. reference: unit -> its top
    dataset activation (None: normalise by the best trial per unit)."""
    per_trial: dict[str, list[dict]] = {p.name: [] for p in presets}
    per = max(1, batch // max(1, len(units)))                     # trials per batch
    unit_chunks = [units[j:j + batch] for j in range(0, len(units), batch)]   # > batch units: split
    for i in range(0, len(presets), per):
        chunk = presets[i:i + per]
        for us in unit_chunks:      # at most `batch` images per optimization
            results = optimize_units(lm.module, lm.preprocessing, layer, us, chunk, model_name=lm.name,
                                     size=size, device=device)
            for r, q in zip(results, measure(lm.module, lm.preprocessing, layer, results, lm.name, device)):
                per_trial[r.preset].append({"unit": r.unit, "dead": r.dead, **q})
        if on_batch:
            on_batch(len(chunk))
    best_act = {u: max((m["act"] for ms in per_trial.values() for m in ms if m["unit"] == u), default=0.0)
                for u in units}
    trials = []
    for p in presets:
        ms = per_trial[p.name]
        for m in ms:
            ref = (reference or {}).get(m["unit"]) if reference else best_act[m["unit"]]
            m["ratio"] = m["act"] / ref if ref and ref > 0 else float("nan")
        s = score([m["ratio"] for m in ms], [m["robust"] for m in ms], [m["hf"] for m in ms])
        trials.append(Trial(p, s, *(finite_mean(m[k] for m in ms) for k in ("ratio", "robust", "hf")), ms))
    trials.sort(key=lambda t: (-t.score, t.preset.name))
    return trials


@torch.no_grad()
def dataset_top(lm, layer: str, units: list[int], images, device="cpu", batch: int = 32) -> dict[int, float]:
    """unit -> its highest activation (FORMAT.md) over the given preprocessed images (iterable of (3, H, W))."""
    from deepvis.tasks.hooks import hooked
    best = {u: float("-inf") for u in units}
    idx = torch.tensor(units)
    buf = []

    def flush(run):
        out = run(torch.stack(buf).to(device))[layer][:, idx]
        vals = out.flatten(2).amax(2) if out.dim() > 2 else out
        for j, u in enumerate(units):
            best[u] = max(best[u], float(vals[:, j].max()))
        buf.clear()

    with hooked(lm.module, [layer]) as run:
        for x in images:
            buf.append(x)
            if len(buf) == batch:
                flush(run)
        if buf:
            flush(run)
    return best
