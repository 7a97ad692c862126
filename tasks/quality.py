"""How good is a visualization? Three measures, each per image (tasks only, no I/O):
  activation ratio   activation reached / the unit's top activation over the dataset (> 1: the image
                     drives the unit harder than any photo); activation = FORMAT.md's (max over h, w)
  high frequency     hf_fraction(image) / the median hf_fraction of natural photos (1 = as natural
                     images; >> 1: the high-frequency noise the paper's regularizers fight)
  robustness         mean over random jitter/scale/rotation (tasks.transforms.ROBUSTNESS) of
                     activation(transformed) / activation(image): does the unit still see it when moved?"""
from __future__ import annotations

import functools
import math
import statistics

import numpy as np
import torch

HF_CUTOFF = 0.25      # cycles per pixel: the upper half of the frequencies (Nyquist = 0.5)


def finite(values) -> list[float]:
    """The defined measures among values (robustness is NaN where the image does not excite the
    unit; a missing measure is None): None, NaN and inf dropped."""
    return [x for x in values if x is not None and math.isfinite(x)]


def finite_mean(values) -> float:
    """Mean of finite(values); NaN when none is defined."""
    v = finite(values)
    return statistics.fmean(v) if v else float("nan")


def hf_fraction(x01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B,): the share of the grey image's spectral energy (mean removed) at |f| > HF_CUTOFF."""
    from deepvis.tasks.param import frequencies

    grey = x01.double().mean(1)
    grey = grey - grey.mean(dim=(1, 2), keepdim=True)
    p = torch.fft.rfft2(grey).abs() ** 2
    p[..., 1:-1] *= 2            # rfft halves: count the mirrored columns (all but DC and Nyquist)
    hi = frequencies(*grey.shape[-2:]).to(p.device) > HF_CUTOFF
    total = p.sum(dim=(1, 2)).clamp(min=1e-20)
    return (p * hi).sum(dim=(1, 2)) / total


@functools.lru_cache(maxsize=1)
def natural_hf_median() -> float:
    from deepvis.tasks.param import DATA
    with np.load(DATA / "natural_spectrum.npz") as z:
        return float(z["hf_fraction_median"])


def unit_activation(out: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """FORMAT.md's activation: max over (h, w) of channel units[i] of out[i] (or the value, for N x C)."""
    rows = torch.arange(out.shape[0], device=out.device)
    o = out[rows, units]
    return o.flatten(1).amax(1) if o.dim() > 1 else o


@torch.no_grad()
def activations(run, layer: str, x01: torch.Tensor, units: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """unit_activation of images in [0, 1] (the model's own normalisation applied), through `run`
    (tasks.hooks.hooked)."""
    from deepvis.tasks.preprocess import normalize
    return unit_activation(run(normalize(x01, preprocessing))[layer], units)


@torch.no_grad()
def robustness(run, layer: str, x01: torch.Tensor, units: torch.Tensor, preprocessing: dict, gens, n: int = 8,
               base: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of activation(T(x)) / activation(x) over n random transforms (per-image generators)."""
    from deepvis.tasks.transforms import ROBUSTNESS

    base = activations(run, layer, x01, units, preprocessing) if base is None else base
    ratios = []
    for _ in range(n):
        ratios.append(activations(run, layer, ROBUSTNESS(x01, gens), units, preprocessing) / base)
    r = torch.stack(ratios).mean(0)
    return torch.where(base > 0, r, torch.full_like(r, float("nan")))


def measure(model, preprocessing: dict, layer: str, results, model_name: str, device="cpu",
            n: int = 8) -> list[dict]:
    """For optimization results (tasks.optimize.UnitResult, image in [0, 1]): {"act", "hf", "robust"}
    each: FORMAT.md's activation of the image, its high-frequency fraction relative to natural
    photos, and its robustness. The transforms are seeded per (unit, preset, index): batch-free."""
    from deepvis.tasks.hooks import as_module, hooked
    from deepvis.tasks.units import unit_seed

    if not results:
        return []
    module = as_module(model)
    dtype = next(module.parameters()).dtype
    x = torch.stack([r.image for r in results]).to(dtype).to(device)
    units = torch.tensor([r.unit for r in results], device=device)
    gens = [torch.Generator().manual_seed(unit_seed(model_name, layer, r.unit, f"robust:{r.preset}#{r.index}"))
            for r in results]
    with hooked(module, [layer]) as run:
        act = activations(run, layer, x, units, preprocessing)
        rob = robustness(run, layer, x, units, preprocessing, gens, n=n, base=act)
    hf = hf_fraction(x) / natural_hf_median()
    return [{"act": float(a), "hf": float(h), "robust": float(b)} for a, h, b in zip(act.tolist(), hf.tolist(), rob.tolist())]
