"""Transformation robustness (Lucid's transforms): each factory returns fn(x, gens) -> x, where x is
a batch (B, 3, H, W) in [0, 1] and gens holds one torch.Generator per image, so every image draws its
own random transform: results do not depend on how images are batched. compose() joins them.

  pad(w, value)       constant border of w pixels (Lucid pads with 0.5 grey)
  jitter(d)           a random crop d pixels smaller (offset 0..d in each direction)
  random_scale(s)     zoom about the centre by one of the factors s (same output size)
  random_rotate(deg)  rotate about the centre by one of the angles deg (degrees)
  crop_resize(lo, hi) MaCo: a random square crop of side lo..hi of the image, resized to the input
  noise(sd)           additive Gaussian noise
STANDARD is Lucid's standard_transforms; MACO the crops + noise of MaCo."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _pick(g: torch.Generator, options):
    return options[int(torch.randint(len(options), (1,), generator=g))]


def compose(*fns):
    def fn(x, gens):
        for f in fns:
            x = f(x, gens)
        return x
    return fn


def pad(w: int, value: float = 0.5):
    def fn(x, gens):
        return F.pad(x, (w, w, w, w), mode="constant", value=value)
    return fn


def jitter(d: int):
    def fn(x, gens):
        h, w = x.shape[-2:]
        out = []
        for i, g in enumerate(gens):
            dy, dx = (int(v) for v in torch.randint(d + 1, (2,), generator=g))
            out.append(x[i, :, dy:dy + h - d, dx:dx + w - d])
        return torch.stack(out)
    return fn


def _affine(x, thetas):
    grid = F.affine_grid(thetas.to(x.dtype).to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_scale(scales):
    def fn(x, gens):
        th = torch.zeros(len(gens), 2, 3, dtype=torch.float64)
        for i, g in enumerate(gens):
            s = float(_pick(g, scales))
            th[i, 0, 0] = th[i, 1, 1] = 1.0 / s
        return _affine(x, th)
    return fn


def random_rotate(degrees):
    def fn(x, gens):
        th = torch.zeros(len(gens), 2, 3, dtype=torch.float64)
        for i, g in enumerate(gens):
            a = math.radians(float(_pick(g, degrees)))
            th[i, :, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        return _affine(x, th)
    return fn


def crop_resize(lo: float, hi: float):
    """A random square crop, side lo..hi of the image's side, anywhere inside it; resized back."""
    def fn(x, gens):
        th = torch.zeros(len(gens), 2, 3, dtype=torch.float64)
        for i, g in enumerate(gens):
            u = torch.rand(3, generator=g, dtype=torch.float64)
            s = lo + (hi - lo) * float(u[0])
            th[i, 0, 0] = th[i, 1, 1] = s
            th[i, 0, 2], th[i, 1, 2] = (2 * u[1] - 1) * (1 - s), (2 * u[2] - 1) * (1 - s)
        return _affine(x, th)
    return fn


def noise(sd: float):
    def fn(x, gens):
        n = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in gens])
        return x + sd * n.to(x.dtype).to(x.device)
    return fn


# Lucid's standard_transforms: pad 12, jitter 8, scale 0.9..1.1, rotate -10..10 (0 more likely), jitter 4
STANDARD = compose(pad(12), jitter(8), random_scale([1 + (i - 5) / 50 for i in range(11)]),
                   random_rotate(list(range(-10, 11)) + 5 * [0]), jitter(4))
# MaCo: a random crop (60% to all of the side) and a little noise on every step (crop range chosen by
# measuring robustness on 5 class units: 0.6-1.0 kept 0.99 of the class probability, 0.4-0.8 only 0.76)
MACO = compose(crop_resize(0.6, 1.0), noise(0.02))
# the perturbations of the robustness metric (tasks.quality): jitter, scale, rotation, same size
ROBUSTNESS = compose(pad(8), jitter(16), random_scale([0.9, 0.95, 1.05, 1.1]), random_rotate(list(range(-10, 11))))
