"""Beyond the paper: Lucid-style and MaCo feature visualization, batched over units like
tasks.optimize, from small pieces: a parameterization (tasks.param) -> transforms (tasks.transforms)
-> an objective -> a short Adam loop.

  lucid  Fourier (1/f) + decorrelated colour + Lucid's standard transforms, Adam 0.05, 512 steps,
         objective: the channel's mean over (h, w) (Lucid's `channel`)
  maco   MaCo (Fel et al. 2023): phase-only Fourier with natural images' magnitude, a random crop and
         noise on every step, Adam; a transparency map (the accumulated |d objective / d pixel|, the
         attribution of the unit over the image) comes with the image
Each image has its own seeds (start and transforms, from deepvis.tasks.optimize.unit_seed), so an image
does not depend on the batch it is in. `diversity=n` makes n images per (unit, preset), pushed
apart by the cosine similarity of their Gram matrices at a layer (Lucid's `diversity`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from deepvis.tasks.errors import UserError
from deepvis.tasks.hooks import hooked
from deepvis.tasks.units import UnitResult, check_model_device, check_output, history_steps, model_dtype, unit_seed
from deepvis.tasks.param import PARAMETERIZATIONS
from deepvis.tasks.preprocess import normalize
from deepvis.tasks.transforms import MACO, STANDARD

TRANSFORMS = {"none": None, "standard": STANDARD, "maco": MACO}
DIVERSITY_WEIGHT = 10.0    # penalty per unit of mean Gram cosine similarity (Lucid's examples use 1e2 with
#                            activations ~10x larger than this model's logits)


@dataclass(frozen=True)
class ModernPreset:
    name: str
    param: str = "fourier"          # pixel | fourier | maco
    decorrelate: bool = True
    transforms: str = "standard"    # none | standard | maco
    lr: float = 0.05
    steps: int = 512
    transparency: bool = False      # accumulate the attribution map (saved as the PNG's alpha)

    def __post_init__(self):
        if self.param not in PARAMETERIZATIONS:
            raise UserError(f"preset {self.name!r}: param must be one of {', '.join(PARAMETERIZATIONS)}")
        if self.transforms not in TRANSFORMS:
            raise UserError(f"preset {self.name!r}: transforms must be one of {', '.join(TRANSFORMS)}")

    def to_dict(self) -> dict:
        return {"kind": "modern", **asdict(self)}


MODERN_PRESETS = {p.name: p for p in (
    ModernPreset("lucid", param="fourier", decorrelate=True, transforms="standard", lr=0.05, steps=512),
    ModernPreset("maco", param="maco", decorrelate=True, transforms="maco", lr=0.1, steps=256, transparency=True),
)}


def objective_mean(out: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Lucid's channel objective: the channel's mean over (h, w) (the value for N x C outputs)."""
    rows = torch.arange(out.shape[0], device=out.device)
    o = out[rows, units]
    return o.flatten(1).mean(1) if o.dim() > 1 else o


def gram_similarity(feats: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Mean pairwise cosine similarity of the flattened Gram matrices within each group of images
    (Lucid's diversity, as a penalty). feats (B, C, H, W) or (B, C)."""
    f = feats.flatten(2) if feats.dim() == 4 else feats[:, :, None]
    gram = torch.bmm(f, f.transpose(1, 2)) / f.shape[2]
    g = torch.nn.functional.normalize(gram.flatten(1), dim=1)
    total = feats.new_zeros(())
    for idx in groups:
        if len(idx) < 2:
            continue
        s = g[idx] @ g[idx].T
        n = len(idx)
        total = total + (s.sum() - s.diagonal().sum()) / (n * (n - 1))
    return total


def _seeds(model_name, layer, unit, preset, d):
    base = unit_seed(model_name, layer, unit, preset if d == 0 else f"{preset}#{d}")
    return torch.Generator().manual_seed(base), torch.Generator().manual_seed(base ^ 0x5DEECE66D)


def optimize_modern(model: nn.Module, preprocessing: dict, layer: str, units: list[int],
                    presets: list[ModernPreset], *, model_name: str, steps: int | None = None,
                    size: int | None = None, device="cpu", diversity: int = 1,
                    diversity_layer: str | None = None) -> list[UnitResult]:
    """One image per (unit, preset, diversity index); results unit-major, then preset, then index.
    The activation of a result is FORMAT.md's (max over h, w) on the final image, untransformed."""
    device = torch.device(device)
    check_model_device(model, device)
    job = _ModernJob(model, preprocessing, layer, model_name, int(size or preprocessing["crop"]), device,
                     model_dtype(model), max(1, int(diversity)), diversity_layer or layer)
    out: dict[tuple[int, str, int], UnitResult] = {}
    for p in presets:
        for r in job.run(p, units, int(steps) if steps is not None else p.steps):
            out[(r.unit, p.name, r.index)] = r
    return [out[(int(u), p.name, d)] for u in units for p in presets for d in range(job.diversity)]


@dataclass
class _ModernJob:
    """What every preset of one optimize_modern call shares."""
    model: nn.Module
    preprocessing: dict
    layer: str
    model_name: str
    size: int
    device: torch.device
    dtype: torch.dtype
    diversity: int
    div_layer: str

    def run(self, p: ModernPreset, units: list[int], n: int) -> list[UnitResult]:
        """One preset: every (unit, diversity index) in one batch, n steps of Adam."""
        trip = [(int(u), d) for u in units for d in range(self.diversity)]
        gens = [_seeds(self.model_name, self.layer, u, p.name, d) for u, d in trip]
        kw = {"size": self.size, "device": self.device, "dtype": self.dtype}
        if p.param != "maco":
            kw["decorrelate_colors"] = p.decorrelate
        params, image_fn = PARAMETERIZATIONS[p.param]([g[0] for g in gens], **kw)
        unit_idx = torch.tensor([u for u, _ in trip], device=self.device)
        hist, attribution, ever_grad, act, final = self._loop(p, n, params, image_fn, [g[1] for g in gens],
                                                             unit_idx, trip)
        images = final.float().clamp(0, 1).cpu()
        alphas = _alpha(attribution) if attribution is not None else None
        return [UnitResult(unit=u, preset=p.name, image=images[i], activation=float(act[i]),
                           dead=not bool(ever_grad[i]), history=hist[i], steps=n, size=self.size,
                           seed=int(gens[i][0].initial_seed()), history_steps=history_steps(n),
                           alpha=None if alphas is None else alphas[i], index=d)
                for i, (u, d) in enumerate(trip)]

    def _loop(self, p: ModernPreset, n: int, params, image_fn, tgens, unit_idx, trip):
        layer, S, B = self.layer, self.size, len(trip)
        opt, tf = torch.optim.Adam(params, lr=p.lr), TRANSFORMS[p.transforms]
        groups = [[i for i, (u2, _) in enumerate(trip) if u2 == u] for u in dict.fromkeys(u for u, _ in trip)]
        names = [layer] + ([self.div_layer] if self.diversity > 1 and self.div_layer != layer else [])
        record, hist = set(history_steps(n)), [[] for _ in trip]
        attribution = torch.zeros(B, S, S, dtype=torch.float64, device=self.device) if p.transparency else None
        ever_grad = torch.zeros(B, dtype=torch.bool, device=self.device)
        with hooked(self.model, names) as run, torch.enable_grad():
            for t in range(n):
                img = image_fn()
                img.retain_grad()
                outs = run(normalize(tf(img, tgens) if tf is not None else img, self.preprocessing))
                if t == 0:
                    check_output(outs[layer], layer, unit_idx)
                a = objective_mean(outs[layer], unit_idx)
                loss = -a.sum()
                if self.diversity > 1:
                    loss = loss + DIVERSITY_WEIGHT * gram_similarity(outs[self.div_layer], groups)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if img.grad is not None:
                    gmag = img.grad.detach().abs().sum(1)
                    ever_grad |= gmag.flatten(1).amax(1) > 0
                    if attribution is not None:
                        attribution += gmag.double()
                if t in record:
                    for i, v in enumerate(a.detach().tolist()):
                        hist[i].append(float(v))
                if t < n - 1:
                    opt.step()
            with torch.no_grad():
                final = image_fn().detach()
                from deepvis.tasks.quality import unit_activation
                act = unit_activation(run(normalize(final, self.preprocessing))[layer], unit_idx).tolist()
        return hist, attribution, ever_grad, act, final


def _alpha(acc: torch.Tensor) -> torch.Tensor:
    """Accumulated attribution (B, H, W) -> transparency in [0, 1]: scaled by its 99th percentile,
    square-rooted (MaCo shows the map with a soft ramp), float32 on the CPU."""
    acc = acc.float().cpu()
    q = torch.quantile(acc.flatten(1), 0.99, dim=1).clamp(min=1e-20).view(-1, 1, 1)
    return (acc / q).clamp(0, 1).sqrt()


def is_modern(p) -> bool:
    return isinstance(p, ModernPreset)

