"""What every activation-maximization loop shares (the paper's in tasks.optimize, the modern presets'
in tasks.modern): the result record, the start-noise seed, the history steps and the checks of a
model and its hooked output. Kept apart so neither loop imports the other."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from deepvis.tasks.errors import UserError

HISTORY_EVERY = 10        # UnitResult.history: activation at steps 0, 10, 20, ... and the last step


@dataclass
class UnitResult:
    unit: int
    preset: str
    image: torch.Tensor          # (3, S, S) float in [0, 1], CPU: the best iterate as displayable RGB
    activation: float            # objective value of the best iterate
    dead: bool                   # the gradient was zero on every step
    history: list[float]         # activation at steps 0, 10, 20, ... and at the last step
    steps: int
    size: int
    seed: int = 0                # the start-noise seed (unit_seed)
    history_steps: list[int] = field(default_factory=list)   # the steps `history` was taken at
    alpha: torch.Tensor | None = None   # (S, S) in [0, 1]: transparency (MaCo's attribution map)
    index: int = 0                      # which of the `diversity` images of (unit, preset)


def history_steps(steps: int) -> list[int]:
    """The steps at which UnitResult.history records the activation."""
    return sorted(set(range(0, steps, HISTORY_EVERY)) | {steps - 1})


def unit_seed(model_name: str, layer: str, unit: int, preset: str) -> int:
    """Stable seed of the start noise of one (model, layer, unit, preset): same on every machine,
    process and batching (hashlib, not Python's randomized hash())."""
    key = "\x1f".join((str(model_name), str(layer), str(int(unit)), str(preset))).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_model_device(model: nn.Module, device: torch.device) -> None:
    for p in model.parameters():
        if p.device.type != device.type or (device.index is not None and p.device != device):
            raise ValueError(f"the model is on {p.device} but device={device}; load it with "
                             f"load_model(..., device={str(device)!r})")
        return


def check_output(out, layer: str, units: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"layer {layer!r} cannot be optimized: its output must be N x C or "
                        f"N x C x H x W (got {shape})")
    c = out.shape[1]
    bad = sorted({u for u in units.tolist() if not 0 <= u < c})
    if bad:
        raise UserError(f"unit {bad[0]} out of range for layer {layer!r}: it has {c} units (0..{c - 1})")
