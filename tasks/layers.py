"""Enumerate the hookable layers of a model and select them by name or glob.

The default set ("every layer") is, in forward order:
  - every nn.Conv2d output            (kind "conv", N x C x H x W)
  - every nn.Linear output            (kind "linear", N x C)
  - every named block output: a module with children of its own that is neither a container
    (Sequential/ModuleList/ModuleDict) nor the model itself, e.g. ResNet's `layer1.0`,
    EfficientNet's `_blocks.3`, GoogLeNet's `inception3a`   (kind "block")
whose output is a 2-D or 4-D tensor and which runs exactly once per forward pass. Activation
modules (ReLU, ...) are not in the default set (they are often shared or in-place), but any module
can be selected by its exact name.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from deepvis.tasks.errors import UserError
from deepvis.tasks.hooks import get_layer

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str            # conv | linear | block | <module type, lower case> for explicit picks
    shape: tuple         # output shape without the batch dimension: (C, H, W) or (C,)
    units: int

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "units": self.units}


def _kind(name: str, module: nn.Module, root: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if module is not root and not isinstance(module, _CONTAINERS) and any(True for _ in module.children()):
        return "block"
    return None


def enumerate_layers(model: nn.Module, input_size: int, extra: list[str] | None = None,
                     device: str | torch.device = "cpu") -> list[LayerInfo]:
    """Probe one forward pass of a zero image; return the default layer set (plus `extra` names)
    in forward order with their output shapes."""
    candidates = {}
    for name, module in model.named_modules():
        kind = _kind(name, module, model)
        if kind:
            candidates[name] = (module, kind)
    for name in extra or []:
        if name not in candidates:
            candidates[name] = (get_layer(model, name), None)
    fired: dict[str, list] = {}
    order: list[str] = []

    def make_hook(name):
        def hook(_m, _i, out):
            if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                out = out[0]
            if name not in fired:
                order.append(name)
            fired.setdefault(name, []).append(tuple(out.shape) if isinstance(out, torch.Tensor) else None)
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, (m, _) in candidates.items()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    infos = []
    for name in order:
        shapes = fired[name]
        shape = shapes[0]
        if len(shapes) != 1 or shape is None or len(shape) not in (2, 4):
            if name in (extra or []):
                raise UserError(f"layer {name!r} cannot be visualized: it must run once per forward pass "
                                f"and output N x C or N x C x H x W (got {shapes})")
            continue
        kind = candidates[name][1] or type(candidates[name][0]).__name__.lower()
        infos.append(LayerInfo(name, kind, tuple(shape[1:]), int(shape[1])))
    return infos


def is_pattern(s: str) -> bool:
    return any(c in s for c in "*?[")


def split_patterns(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() for s in items if s.strip() and s.strip() not in ("all", "*")] if items else []


def resolve_layers(model: nn.Module, input_size: int, spec: str | list[str] | None,
                   device: str | torch.device = "cpu") -> list[LayerInfo]:
    """Layers selected by comma-separated names or globs ("all"/None = the default set), in forward
    order. An exact name may be any module; a glob matches the default set. Unknown -> UserError."""
    patterns = split_patterns(spec)
    exact = [p for p in patterns if not is_pattern(p)]
    infos = enumerate_layers(model, input_size, extra=exact, device=device)
    if not patterns:
        return [i for i in infos if i.kind in ("conv", "linear", "block")]
    chosen = set()
    for p in patterns:
        hits = [i.name for i in infos if (i.name == p if not is_pattern(p) else fnmatch.fnmatchcase(i.name, p))]
        if not hits:
            raise UserError(f"layer pattern {p!r} matches no layer; run `deepvis layers MODEL` to list them")
        chosen.update(hits)
    return [i for i in infos if i.name in chosen]
