"""One image's layer output as a grid of per-channel tiles (the DeepVis "activations" pane).

Pure torch/numpy, no I/O. Conventions (relied on by `deepvis activations` and its tests):
  - tiles in row-major order: channel c at grid row c // cols, column c % cols;
    cols = ceil(sqrt(C)) by default, rows = ceil(C / cols)
  - ONE normalisation for the whole layer: the layer's min -> 0, its max -> 255 (linear in between,
    rounded), so tiles are comparable with each other; a constant layer (max == min) -> all 0
  - `sep` pixels of SEPARATOR (= 64, dark grey) between tiles (not around the border); grid cells
    that hold no channel (the tail of the last row) are SEPARATOR too
  - each tile is upscaled `scale` times by nearest neighbour (pixel repetition)
  - image size: rows*h*scale + (rows-1)*sep  x  cols*w*scale + (cols-1)*sep
A linear layer's output (C,) is treated as C tiles of 1 x 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SEPARATOR = 64  # value of separator pixels and of empty grid cells


def grid_shape(c: int, cols: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the grid for c channels."""
    if c < 1:
        raise ValueError("a grid needs at least one channel")
    cols = int(cols) if cols else math.ceil(math.sqrt(c))
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    cols = min(cols, c)
    return math.ceil(c / cols), cols


def _as_numpy(acts) -> np.ndarray:
    if isinstance(acts, torch.Tensor):
        acts = acts.detach().float().cpu().numpy()
    return np.asarray(acts, dtype=np.float64)


def normalize_layer(acts, norm: tuple[float, float] | None = None) -> np.ndarray:
    """Whole-layer min..max (or the given (lo, hi)) -> uint8 0..255; constant layer -> all 0.
    NaNs become 0; values outside (lo, hi) are clipped."""
    a = _as_numpy(acts)
    finite = a[np.isfinite(a)]
    if norm is not None:
        lo, hi = float(norm[0]), float(norm[1])
    elif finite.size:
        lo, hi = float(finite.min()), float(finite.max())
    else:
        lo = hi = 0.0
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def tile_grid(acts, cols: int | None = None, sep: int = 1, scale: int = 1,
              norm: tuple[float, float] | None = None) -> np.ndarray:
    """acts (C, H, W) or (C,) (torch or numpy) -> uint8 (H', W') grid image; see the module doc.
    norm=(lo, hi) fixes the normalisation range instead of the layer's own min..max."""
    a = _as_numpy(acts)
    if a.ndim == 1:
        a = a.reshape(-1, 1, 1)
    if a.ndim != 3:
        raise ValueError(f"expected one image's layer output (C, H, W) or (C,), got shape {a.shape}")
    scale, sep = int(scale), int(sep)
    if scale < 1 or sep < 0:
        raise ValueError(f"scale must be >= 1 and sep >= 0, got scale={scale} sep={sep}")
    c, h, w = a.shape
    rows, cols = grid_shape(c, cols)
    tiles = normalize_layer(a, norm)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    th, tw = h * scale, w * scale
    img = np.full((rows * th + (rows - 1) * sep, cols * tw + (cols - 1) * sep), SEPARATOR, dtype=np.uint8)
    for i in range(c):
        y, x = (i // cols) * (th + sep), (i % cols) * (tw + sep)
        img[y:y + th, x:x + tw] = tiles[i]
    return img


def tile_origin(c: int, tile_hw: tuple[int, int], cols: int, sep: int = 1, scale: int = 1) -> tuple[int, int]:
    """(y, x) of channel c's tile in the grid image."""
    th, tw = tile_hw[0] * scale, tile_hw[1] * scale
    return (c // cols) * (th + sep), (c % cols) * (tw + sep)


@torch.no_grad()
def layer_activations(model, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of `layer` for one image x (3, H, W) or a batch of one (1, 3, H, W) -> (C, H, W)
    or (C,), on the CPU. `model` is an nn.Module or a tasks.models.LoadedModel. Unknown layer ->
    UserError (tasks.hooks.get_layer)."""
    from deepvis.tasks.hooks import as_module, hooked

    module = as_module(model)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (3, H, W) or (1, 3, H, W), got shape {tuple(x.shape)}")
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = x.device
    with hooked(module, [layer]) as run:
        out = run(x.to(device))[layer]
    return out[0].detach().cpu()
