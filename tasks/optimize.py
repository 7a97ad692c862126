"""Regularized activation maximization (Yosinski et al. 2015, "Understanding Neural Networks Through
Deep Visualization"), batched over units. Pure PyTorch: no Ray, no storage.

For each (unit, preset) pair one image x is optimized; all pairs go through the network in ONE batch,
and the forward pass stops at the target layer (tasks.hooks.hooked). Per step t (FORMAT.md, the
operator order of the paper's own code, deep-visualization-toolbox `optimize/gradient_optimizer.py`):

  1. x <- clip(x, valid pixel range)
  2. a = objective(x)  (conv layer: the channel at the spatial centre (H//2, W//2); N x C: the value)
     g = da/dx; the best iterate (highest a) is kept; a unit whose g is 0 on every step is "dead"
  3. x <- x + lr * g                 lr: "constant" (= preset.lr) or "progress" (min(preset.lr, 2/|g|^2))
  4. x <- (1 - decay) * x            L2 decay
  5. if t % blur_every == 0: Gaussian blur of each channel, sigma = blur_width (pixels)
  6. norm clip: zero the pixels whose RGB norm is below the norm_pct percentile
  7. contribution clip: zero the pixels whose |sum_c x * g| is below the contrib_pct percentile
  Steps 3-7 are skipped on the last step (its forward only evaluates the final image).

Pixel space. The paper's hyperparameters (lr, clip range, decay, blur sigma, percentiles, the
progress policy) are in Caffe's input scale: pixels 0..255 with the mean subtracted. We optimize a
variable in exactly that space,
      x_c = 255 * pixel01 - 255 * mean          (per channel; "zero" = the mean image)
and map it to the model's input by
      x_model = (pixel01 - mean) / std = x_c / (255 * std)
so every hyperparameter applies verbatim: the valid range is [-255*mean, 255*(1-mean)], decay and the
clips shrink towards the mean image, g = da/dx_c is the gradient in that space (autograd through the
division), and the progress policy 2/|g|^2 uses that g.

Batching. Images are independent in the batch (eval mode), so the gradient of sum_i a_i is the
per-image gradient; blur, percentiles, norms and lr are computed per image, and each image starts
from its own noise, seeded by (model, layer, unit, preset): the math of an image does not depend on
how units are batched. Numerically, batched and one-at-a-time runs agree bit for bit in float64 and
with PyTorch's native CPU kernels; oneDNN (CPU) and cuDNN may round differently for different batch
sizes (~1e-6 relative), and the paper's large steps (lr 100 on 0..255 pixels) amplify such rounding
over tens of steps, so long float32 runs agree in what they show, not to the last digit. A run with
the same batch on the same machine is deterministic (CPU).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepvis.tasks.errors import UserError
from deepvis.tasks.hooks import hooked
# shared with tasks.modern; imported here too so callers find them beside optimize_units
from deepvis.tasks.units import (UnitResult, check_model_device, check_output, history_steps,  # noqa: F401
                                 model_dtype, unit_seed)

NOISE_STD = 10.0          # start image: mean image + N(0, 10^2) in Caffe pixels (the toolbox's start)
LR_POLICIES = ("constant", "progress")
PROGRESS_TARGET = 2.0     # "progress" policy: lr = min(cap, PROGRESS_TARGET / |g|^2)


# --------------------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Preset:
    """Regularization hyperparameters (Table 1 of the paper), in Caffe pixel scale (see module doc).
    lr is the constant learning rate, or the cap of the "progress" policy."""
    name: str
    decay: float = 0.0          # theta_decay: x <- (1 - decay) x
    blur_width: float = 0.0     # theta_b_width: Gaussian sigma in pixels (0 = no blur)
    blur_every: int = 0         # theta_b_every: blur when step % blur_every == 0 (0 = no blur)
    norm_pct: float = 0.0       # theta_n_pct: zero pixels with RGB norm below this percentile
    contrib_pct: float = 0.0    # theta_c_pct: zero pixels with |sum_c x*g| below this percentile
    steps: int = 1000
    lr: float = 100.0
    lr_policy: str = "constant"  # "constant" | "progress"

    def __post_init__(self):
        try:
            for k in ("decay", "blur_width", "norm_pct", "contrib_pct", "lr"):
                object.__setattr__(self, k, float(getattr(self, k)))
            for k in ("blur_every", "steps"):
                object.__setattr__(self, k, int(getattr(self, k)))
        except (TypeError, ValueError) as e:
            raise UserError(f"preset {self.name!r}: {k} must be a number ({e})") from None
        bad = []
        if not (0.0 <= self.decay < 1.0):
            bad.append(f"decay={self.decay} (need 0 <= decay < 1)")
        if self.blur_width < 0 or self.blur_every < 0:
            bad.append(f"blur_width={self.blur_width}, blur_every={self.blur_every} (need >= 0)")
        for k in ("norm_pct", "contrib_pct"):
            if not (0.0 <= getattr(self, k) < 100.0):
                bad.append(f"{k}={getattr(self, k)} (need 0 <= pct < 100)")
        if self.steps < 1:
            bad.append(f"steps={self.steps} (need >= 1)")
        if not self.lr > 0:
            bad.append(f"lr={self.lr} (need > 0)")
        if self.lr_policy not in LR_POLICIES:
            bad.append(f"lr_policy={self.lr_policy!r} (need one of {', '.join(LR_POLICIES)})")
        if bad:
            raise UserError(f"preset {self.name!r}: invalid " + "; ".join(bad))

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("yosinski-1", decay=0.0, blur_width=0.5, blur_every=4, norm_pct=50, contrib_pct=0,
           steps=500, lr=100.0, lr_policy="progress"),
    Preset("yosinski-2", decay=0.3, blur_width=0.0, blur_every=0, norm_pct=20, contrib_pct=0,
           steps=750, lr=100.0, lr_policy="constant"),
    Preset("yosinski-3", decay=0.0001, blur_width=1.0, blur_every=4, norm_pct=0, contrib_pct=0,
           steps=1000, lr=100.0, lr_policy="constant"),
    Preset("yosinski-4", decay=0.0, blur_width=0.5, blur_every=4, norm_pct=0, contrib_pct=90,
           steps=1000, lr=1e8, lr_policy="progress"),
)}


def all_presets() -> dict:
    """The built-in presets: the paper's four (Preset) and the modern ones (tasks.modern.ModernPreset)."""
    from deepvis.tasks.modern import MODERN_PRESETS
    return {**PRESETS, **MODERN_PRESETS}


def get_preset(name: str, presets: dict | None = None):
    """The preset called `name` (from `presets`, default every built-in preset)."""
    known = all_presets() if presets is None else presets
    try:
        return known[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(known)}") from None


_PRESET_FIELDS = {f.name: f for f in fields(Preset)}


_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_preset_name(name: str, origin: str) -> None:
    """A preset's name becomes part of object keys (units/<layer>/<unit>/<preset>.png): letters,
    digits, '-', '_', '.', no '..', so it can never name a path outside the unit's folder."""
    if not isinstance(name, str) or not _PRESET_NAME.match(name) or ".." in name:
        raise UserError(f"preset name {str(name)[:80]!r} in {origin!r} is not allowed; use letters, digits, "
                        f"'-', '_' and '.' (no '/' or '..'), at most 64 characters")


def load_presets(path: str | Path) -> dict[str, Preset]:
    """Presets from a TOML or JSON file: one table per preset, keyed by its name, with any of the
    Preset fields (missing ones take the Preset defaults, i.e. no regularization), or `base = "<a
    built-in preset>"` to start from one. A top-level "presets" table holding them is accepted too.

        [my-blur]                       {"my-blur": {"base": "yosinski-3", "blur_width": 2.0}}
        base = "yosinski-3"
        blur_width = 2.0
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read presets file {str(path)!r}: {e.strerror}") from None
    data = None
    errors = []
    parsers = ("toml", "json") if path.suffix.lower() != ".json" else ("json", "toml")
    for kind in parsers:
        try:
            if kind == "toml":
                import tomllib
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
            break
        except ValueError as e:   # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
            errors.append(f"{kind}: {str(e).splitlines()[0]}")
    if data is None:
        raise UserError(f"presets file {str(path)!r} is neither TOML nor JSON ({'; '.join(errors)})")
    if isinstance(data, dict) and set(data) == {"presets"} and isinstance(data["presets"], dict):
        data = data["presets"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"presets file {str(path)!r} must hold one table per preset, e.g. "
                        f"[my-preset] with decay, blur_width, blur_every, norm_pct, contrib_pct, "
                        f"steps, lr, lr_policy")
    out: dict[str, Preset] = {}
    for name, table in data.items():
        check_preset_name(name, str(path))
        table = dict(table)
        base = table.pop("base", None)
        table.pop("name", None)
        unknown = sorted(set(table) - set(_PRESET_FIELDS))
        if unknown:
            raise UserError(f"preset {name!r} in {str(path)!r}: unknown field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(k for k in _PRESET_FIELDS if k != 'name')}, base")
        try:
            vals = {k: (int(v) if k in ("steps", "blur_every") else str(v) if k == "lr_policy" else float(v))
                    for k, v in table.items()}
        except (TypeError, ValueError) as e:
            raise UserError(f"preset {name!r} in {str(path)!r}: bad value ({e})") from None
        if base is not None:
            base_p = get_preset(str(base), {**all_presets(), **out})
            if not isinstance(base_p, Preset):
                raise UserError(f"preset {name!r} in {str(path)!r}: base {base!r} is not one of the paper's "
                                f"presets; tables tune the paper's regularizers")
            out[name] = replace(base_p, name=str(name), **vals)
        else:
            out[name] = Preset(name=str(name), **vals)
    return out


# ----------------------------------------------------------------------------------- regularizers
# All act on a batch x (B, 3, H, W) in Caffe pixel space; per-image parameters may be floats or
# tensors of shape (B,). Each is usable alone.

def _per_image(v, x: torch.Tensor) -> torch.Tensor:
    """float or (B,) -> (B,) tensor on x's device."""
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def clip_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Clip to the valid pixel range; lo/hi broadcast against x (e.g. (1, 3, 1, 1))."""
    return torch.maximum(torch.minimum(x, hi), lo)


def decay(x: torch.Tensor, amount) -> torch.Tensor:
    """L2 decay: x <- (1 - amount) * x (towards the mean image)."""
    return x * (1.0 - _per_image(amount, x)).view(-1, 1, 1, 1)


def _gaussian_kernel(sigma: float, radius: int, dtype, device) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _pad_symmetric(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad by r (<= size) on both sides of `dim`, mirroring with the edge repeated (d c b a | a b c d |
    d c b a): scipy.ndimage's mode "reflect" (the paper's code blurs with scipy's gaussian_filter)."""
    n = x.shape[dim]
    idx = torch.cat([torch.arange(r - 1, -1, -1), torch.arange(n), torch.arange(n - 1, n - r - 1, -1)])
    return x.index_select(dim, idx.to(x.device))


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of each channel with std `sigma` pixels: a separable depthwise conv2d, kernel
    truncated at 4 sigma and edges mirrored as scipy.ndimage.gaussian_filter does (its defaults,
    which the paper's code used). sigma <= 0: x unchanged."""
    if sigma <= 0:
        return x
    _, c, h, w = x.shape
    radius = min(max(1, int(4.0 * sigma + 0.5)), h, w)
    k = _gaussian_kernel(float(sigma), radius, x.dtype, x.device)
    y = _pad_symmetric(x, radius, 3)
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    y = _pad_symmetric(y, radius, 2)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def percentile(v: torch.Tensor, pct) -> torch.Tensor:
    """Per-row percentile of v (B, N) at pct (float or (B,), 0..100), numpy's default "linear" method."""
    n = v.shape[1]
    s, _ = v.sort(dim=1)
    pos = (_per_image(pct, v).to(torch.float64) / 100.0 * (n - 1)).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(torch.float64)).to(v.dtype)
    a = s.gather(1, lo[:, None])[:, 0]
    b = s.gather(1, hi[:, None])[:, 0]
    return a + (b - a) * frac


def _zero_small(x: torch.Tensor, score: torch.Tensor, pct) -> torch.Tensor:
    """Zero the pixels (all channels) of each image whose score (B, H, W) is below that image's
    pct-th percentile of the score."""
    b = x.shape[0]
    thr = percentile(score.reshape(b, -1), pct)
    keep = score >= thr.view(b, 1, 1)
    return x * keep.unsqueeze(1).to(x.dtype)


def norm_clip(x: torch.Tensor, pct) -> torch.Tensor:
    """Zero the pixels whose RGB norm is below the pct-th percentile of the image's pixel norms."""
    return _zero_small(x, x.norm(dim=1), pct)


def contrib_clip(x: torch.Tensor, g: torch.Tensor, pct) -> torch.Tensor:
    """Zero the pixels whose contribution |sum_c x * g| (the first-order change of the activation
    if the pixel were set to the mean) is below the pct-th percentile of the image's contributions."""
    return _zero_small(x, (x * g).sum(dim=1).abs(), pct)


# ------------------------------------------------------------------------------------ start image

def start_image(seed: int, size: int, dtype=torch.float32) -> torch.Tensor:
    """Mean image (0 in Caffe space) + N(0, NOISE_STD^2), drawn on the CPU so every device starts
    from the same pixels. Shape (3, size, size)."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randn(3, size, size, generator=g, dtype=torch.float64) * NOISE_STD).to(dtype)


# ------------------------------------------------------------------------------------ one update

class Hyper:
    """The presets of a batch of images as per-image columns on the device (image i: presets[i])."""

    def __init__(self, presets: list[Preset], device, dtype):
        def col(attr):
            return torch.tensor([float(getattr(p, attr)) for p in presets], dtype=dtype, device=device)
        self.n = len(presets)
        self.lr, self.decay = col("lr"), col("decay")
        self.norm_pct, self.contrib_pct = col("norm_pct"), col("contrib_pct")
        self.progress = torch.tensor([p.lr_policy == "progress" for p in presets], device=device)
        self.any_progress = any(p.lr_policy == "progress" for p in presets)
        self.any_decay = any(p.decay > 0 for p in presets)
        self.norm_rows = [i for i, p in enumerate(presets) if p.norm_pct > 0]
        self.contrib_rows = [i for i, p in enumerate(presets) if p.contrib_pct > 0]
        self.blur_rows: dict[tuple[float, int], list[int]] = {}     # (sigma, every) -> rows
        for i, p in enumerate(presets):
            if p.blur_width > 0 and p.blur_every > 0:
                self.blur_rows.setdefault((p.blur_width, p.blur_every), []).append(i)


def regularize(x: torch.Tensor, g: torch.Tensor, t: int, hp: Hyper) -> torch.Tensor:
    """Steps 3-7 of the update for a batch (x, its gradient g, step t), every image with its own
    preset: gradient step, L2 decay, blur (every blur_every steps), norm clip, contribution clip."""
    lr = hp.lr
    if hp.any_progress:   # "progress": min(cap, 2 / |g|^2), per image (|g| = 0 gives the cap; g is 0 then)
        lr = torch.where(hp.progress, torch.minimum(lr, PROGRESS_TARGET / g.flatten(1).square().sum(1)), lr)
    x = x + lr.view(-1, 1, 1, 1) * g                                              # 3.
    if hp.any_decay:
        x = decay(x, hp.decay)                                                   # 4.
    for (sigma, every), rows in hp.blur_rows.items():                            # 5.
        if t % every == 0:
            x = _apply_rows(x, rows, lambda v, r, s=sigma: blur(v, s))
    if hp.norm_rows:                                                             # 6.
        x = _apply_rows(x, hp.norm_rows, lambda v, r: norm_clip(v, hp.norm_pct[r]))
    if hp.contrib_rows:                                                          # 7.
        x = _apply_rows(x, hp.contrib_rows, lambda v, r: contrib_clip(v, g[r], hp.contrib_pct[r]))
    return x


def _apply_rows(x: torch.Tensor, rows: list[int], fn) -> torch.Tensor:
    """x with fn(x[rows], rows) in the given rows (all rows: fn(x, slice(None)))."""
    if len(rows) == x.shape[0]:
        return fn(x, slice(None))
    r = torch.tensor(rows, device=x.device)
    out = x.clone()
    out[r] = fn(x[r], r)
    return out


# ------------------------------------------------------------------------------------ optimization

def objective(out: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Per-image value to maximize: unit c's value at the spatial centre (H//2, W//2) for N x C x H x W
    outputs (as in the paper), the value itself for N x C outputs. out: (B, ...), units: (B,)."""
    rows = torch.arange(out.shape[0], device=out.device)
    if out.dim() == 4:
        return out[rows, units, out.shape[2] // 2, out.shape[3] // 2]
    return out[rows, units]


def optimize_units(model: nn.Module, preprocessing: dict, layer: str, units: list[int],
                   presets: list, *, model_name: str, steps: int | None = None,
                   size: int | None = None, device="cpu", progress: bool = False,
                   diversity: int = 1, diversity_layer: str | None = None) -> list[UnitResult]:
    """Every preset, the paper's (Preset: the loop below) and the modern ones (tasks.modern), for
    `units`; results unit-major, then in the order of `presets`, then by diversity index. diversity=n
    gives n images per (unit, modern preset); the paper's presets always give one."""
    from deepvis.tasks.modern import is_modern, optimize_modern

    paper = [p for p in presets if not is_modern(p)]
    modern = [p for p in presets if is_modern(p)]
    got: dict = {}
    if paper:
        for r in _optimize_paper(model, preprocessing, layer, units, paper, model_name=model_name, steps=steps,
                                 size=size, device=device, progress=progress):
            got.setdefault((r.unit, r.preset), []).append(r)
    if modern:
        for r in optimize_modern(model, preprocessing, layer, units, modern, model_name=model_name, steps=steps,
                                 size=size, device=device, diversity=diversity, diversity_layer=diversity_layer):
            got.setdefault((r.unit, r.preset), []).append(r)
    return [r for u in units for p in presets for r in got.get((int(u), p.name), [])]


def _optimize_paper(model: nn.Module, preprocessing: dict, layer: str, units: list[int],
                    presets: list[Preset], *, model_name: str, steps: int | None = None,
                    size: int | None = None, device="cpu", progress: bool = False) -> list[UnitResult]:
    """Optimize one image per (unit, preset) pair, all in one batch; results unit-major, then preset.

    steps/size override every preset's step count and the model's input size (CPU-scale runs, e.g.
    64 px and 50 steps); both are recorded in the results. The model must be in eval mode on
    `device`. Unknown layer, unit out of range, or a layer output that is not N x C (x H x W):
    UserError. A unit whose gradient is zero on every step is returned with dead=True.
    progress: a tqdm bar over the steps (shown on a terminal)."""
    device = torch.device(device)
    pairs = [(int(u), p) for u in units for p in presets]
    if not pairs:
        return []
    if steps is not None and int(steps) < 1:
        raise UserError(f"steps must be >= 1 (got {steps})")
    if size is not None and int(size) < 8:
        raise UserError(f"image size must be >= 8 pixels (got {size})")
    check_model_device(model, device)
    S, dtype = int(size or preprocessing["crop"]), model_dtype(model)
    n_steps = [int(steps) if steps is not None else p.steps for _, p in pairs]
    seeds = [unit_seed(model_name, layer, u, p.name) for u, p in pairs]
    space = _CaffeSpace.of(preprocessing, dtype, device)
    st = _PaperBatch.start(torch.stack([start_image(s, S, dtype) for s in seeds]).to(device),
                           n_steps, [p for _, p in pairs])
    unit_idx = torch.tensor([u for u, _ in pairs], device=device)
    bar = _progress_bar(max(n_steps), layer) if progress else None
    try:
        with hooked(model, [layer]) as run, torch.enable_grad():
            for t in range(max(n_steps)):
                _paper_step(run, layer, t, st, space, unit_idx)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    images = ((st.best_x + 255.0 * space.mean) / 255.0).clamp(0, 1).float().cpu()
    best, dead = st.best_a.tolist(), (~st.ever_grad).tolist()
    return [UnitResult(unit=u, preset=p.name, image=images[i], activation=float(best[i]), dead=bool(dead[i]),
                       history=st.history[i], steps=n_steps[i], size=S, seed=seeds[i],
                       history_steps=history_steps(n_steps[i]))
            for i, (u, p) in enumerate(pairs)]


@dataclass
class _CaffeSpace:
    """Caffe pixel space (module doc): x_model = x_c / (255 std); valid x_c in [-255 mean, 255 (1 - mean)]."""
    mean: torch.Tensor
    to_model: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def of(cls, preprocessing: dict, dtype, device) -> "_CaffeSpace":
        mean = torch.tensor(preprocessing["mean"], dtype=dtype, device=device).view(1, 3, 1, 1)
        std = torch.tensor(preprocessing["std"], dtype=dtype, device=device).view(1, 3, 1, 1)
        return cls(mean, 1.0 / (255.0 * std), -255.0 * mean, 255.0 * (1.0 - mean))


@dataclass
class _PaperBatch:
    """One batch of (unit, preset) images through the paper's loop. Images stop at their own step
    counts, so a step works on the rows still running (`idx`, None when all are)."""
    x: torch.Tensor
    best_x: torch.Tensor
    best_a: torch.Tensor
    ever_grad: torch.Tensor
    n_steps: list[int]
    presets: list[Preset]
    history: list[list[float]]
    record_at: list[set[int]]
    hypers: dict[tuple[int, ...], Hyper]   # the images still updated -> their presets' columns

    @classmethod
    def start(cls, x: torch.Tensor, n_steps: list[int], presets: list[Preset]) -> "_PaperBatch":
        B = x.shape[0]
        return cls(x, x.clone(), torch.full((B,), -math.inf, dtype=x.dtype, device=x.device),
                   torch.zeros(B, dtype=torch.bool, device=x.device), n_steps, presets,
                   [[] for _ in range(B)], [set(history_steps(n)) for n in n_steps], {})

    def keep_best(self, idx, take, xa: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> None:
        """Keep the best iterate (the image of this forward) and note live gradients."""
        better = a > take(self.best_a)
        new_a = torch.where(better, a, take(self.best_a))
        new_x = torch.where(better.view(-1, 1, 1, 1), xa, take(self.best_x))
        live = take(self.ever_grad) | (g.flatten(1).abs().amax(1) > 0)
        if idx is None:
            self.best_a, self.best_x, self.ever_grad = new_a, new_x, live
        else:
            self.best_a[idx], self.best_x[idx], self.ever_grad[idx] = new_a, new_x, live

    def record(self, t: int, rows: list[int], a: torch.Tensor) -> None:
        if any(t in self.record_at[i] for i in rows):
            vals = a.tolist()
            for j, i in enumerate(rows):
                if t in self.record_at[i]:
                    self.history[i].append(float(vals[j]))

    def update(self, t: int, rows: list[int], xa: torch.Tensor, g: torch.Tensor) -> None:
        """Steps 3-7 for the images with steps left (no regularization on an image's last step)."""
        going = [j for j, i in enumerate(rows) if self.n_steps[i] > t + 1]
        if not going:
            return
        key = tuple(rows[j] for j in going)
        if key not in self.hypers:
            self.hypers[key] = Hyper([self.presets[i] for i in key], xa.device, xa.dtype)
        if len(going) == len(rows):
            xn = regularize(xa, g, t, self.hypers[key])
        else:
            sub = torch.tensor(going, device=xa.device)
            xn = regularize(xa[sub], g[sub], t, self.hypers[key])
        if len(key) == len(self.n_steps):
            self.x = xn
        else:
            self.x[torch.tensor(key, device=xa.device)] = xn


def _paper_step(run, layer: str, t: int, st: _PaperBatch, space: _CaffeSpace, unit_idx: torch.Tensor) -> None:
    """One step of the paper's update for every image still running (the numbers are the module doc's)."""
    B = len(st.n_steps)
    rows = [i for i in range(B) if st.n_steps[i] > t]
    idx = None if len(rows) == B else torch.tensor(rows, device=st.x.device)
    take = (lambda v: v) if idx is None else (lambda v: v[idx])
    xa = clip_range(take(st.x), space.lo, space.hi).requires_grad_(True)           # 1.
    out = run(xa * space.to_model)[layer]                                           # 2.
    if t == 0:
        check_output(out, layer, unit_idx)
    a = objective(out, take(unit_idx))
    g = torch.autograd.grad(a.sum(), xa, allow_unused=True)[0] if a.requires_grad else None
    xa, a = xa.detach(), a.detach()
    g = torch.zeros_like(xa) if g is None else g   # the layer does not depend on the input
    st.keep_best(idx, take, xa, a, g)
    st.record(t, rows, a)
    st.update(t, rows, xa, g)


def display_image(image: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """Contrast-stretched view of a result image (3, S, S) in [0, 1], as the paper's toolbox saves its
    images (saveimagescc(x, 0) / norm01c): the difference from the mean image scaled so that its
    largest excursion reaches 0 or 1, the mean at 0.5. For display only: the activation belongs to
    the unstretched image."""
    d = image.double() - torch.tensor(preprocessing["mean"], dtype=torch.float64).view(3, 1, 1)
    scale = max(2.0 * float(d.max()), -2.0 * float(d.min())) + 1e-10
    return (d / scale + 0.5).clamp(0, 1).to(image.dtype)


def result_image(r: UnitResult, preprocessing: dict, stretch: bool):
    """A result as an 8-bit PIL image: contrast-stretched (display_image) when `stretch`, with its
    transparency map (MaCo's attribution) as the alpha channel when it has one."""
    from deepvis.tasks.preprocess import to_pil

    img = to_pil(display_image(r.image, preprocessing) if stretch else r.image)
    if r.alpha is not None:
        img.putalpha(to_pil(r.alpha.expand(3, -1, -1)).convert("L"))
    return img


def _progress_bar(total: int, layer: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=f"optimize {layer}", unit="step", disable=None, leave=False)
