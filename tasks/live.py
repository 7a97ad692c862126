"""The compute behind `deepvis live`: one frame -> top-5 classes, one layer's tiled grid, one unit's
map, and (on request) the gradient of a unit with respect to the frame (the toolbox's backprop view).

Pure torch/numpy, no I/O and no HTTP: the server (atlas_viewer/live/server.py) decodes and encodes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from deepvis.tasks.errors import UserError
from deepvis.tasks.grid import grid_shape, normalize_layer, tile_grid
from deepvis.tasks.hooks import as_module, get_layer, hooked


@dataclass
class FrameResult:
    layer: str
    shape: tuple[int, ...]           # one image's layer output: (C, H, W) or (C,)
    rows: int
    cols: int
    grid: np.ndarray                 # uint8 (H', W') tile grid, sep=1, scale=1 (tasks.grid)
    top5: list[dict] = field(default_factory=list)   # [{"index", "label", "p"}], best first
    unit: int | None = None
    unit_map: np.ndarray | None = None   # uint8 (H, W) of the unit, on the layer's normalisation
    unit_max: float | None = None        # the unit's activation on the frame (FORMAT.md: max over h, w)
    unit_argmax: int | None = None       # the strongest unit of the layer on this frame
    range: tuple[float, float] = (0.0, 0.0)  # the layer's min, max on this frame


class LiveModel:
    """A loaded model (tasks.models.LoadedModel) ready for frames. Not thread-safe: the server
    serializes calls (one frame at a time; the latest frame wins)."""

    def __init__(self, lm, device: str | torch.device = "cpu"):
        self.lm = lm
        self.module = as_module(lm).eval()
        self.device = torch.device(device)
        self.labels = getattr(lm, "labels", None)

    def _forward(self, x: torch.Tensor, layer: str):
        """Full forward of one preprocessed image (3, H, W); returns (layer output [0], logits [0])."""
        got: list[torch.Tensor] = []

        def hook(_m, _i, out):
            got.append(out[0] if isinstance(out, (tuple, list)) else out)

        h = get_layer(self.module, layer).register_forward_hook(hook)
        try:
            logits = self.module(x.unsqueeze(0).to(self.device))
        finally:
            h.remove()
        if not got:
            raise UserError(f"layer {layer!r} did not run in the forward pass; pick another layer")
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return got[0][0], logits[0]

    @torch.no_grad()
    def frame(self, x: torch.Tensor, layer: str, unit: int | None = None, k: int = 5) -> FrameResult:
        acts, logits = self._forward(x, layer)
        acts = acts.float().cpu()
        if acts.dim() not in (1, 3):
            raise UserError(f"layer {layer!r} outputs shape {tuple(acts.shape)} per image; "
                            f"a grid needs C x H x W or C")
        c = acts.shape[0]
        if unit is not None and not 0 <= unit < c:
            raise UserError(f"unit {unit} is out of range for layer {layer!r} ({c} units: 0..{c - 1})")
        a = acts.numpy()
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        rows, cols = grid_shape(c)
        per_unit = a.reshape(c, -1).max(axis=1)
        res = FrameResult(layer=layer, shape=tuple(acts.shape), rows=rows, cols=cols,
                          grid=tile_grid(a, cols=cols, sep=1, norm=(lo, hi)), range=(lo, hi),
                          unit_argmax=int(per_unit.argmax()))
        if logits.dim() == 1 and logits.numel() > 1:
            p = logits.float().softmax(0).cpu()
            vals, idx = p.topk(min(k, p.numel()))
            res.top5 = [{"index": int(i), "p": float(v),
                         "label": self.labels[int(i)] if self.labels and int(i) < len(self.labels) else str(int(i))}
                        for v, i in zip(vals, idx)]
        if unit is not None:
            m = a[unit] if a.ndim == 3 else a[unit].reshape(1, 1)
            res.unit, res.unit_max = unit, float(per_unit[unit])
            res.unit_map = normalize_layer(m, (lo, hi))
        return res

    def gradient(self, x: torch.Tensor, layer: str, unit: int) -> np.ndarray:
        """d(unit activation)/d(input) for the frame x (3, H, W), the activation being the max over
        (h, w) as FORMAT.md defines it. Returns uint8 (H, W, 3): signed gradient, 128 = 0, scaled
        so the largest |component| is 127 (all 128 when the gradient is zero)."""
        x = x.detach().clone().to(self.device).requires_grad_(True)
        # the forward stops at the layer (tasks.hooks.hooked): the rest of the network is not needed
        with torch.enable_grad(), hooked(self.module, [layer]) as run:
            acts = run(x.unsqueeze(0))[layer][0]
            if not 0 <= unit < acts.shape[0]:
                raise UserError(f"unit {unit} is out of range for layer {layer!r} "
                                f"({acts.shape[0]} units: 0..{acts.shape[0] - 1})")
            acts[unit].max().backward()
        g = x.grad.detach().float().cpu().permute(1, 2, 0).numpy()
        return gradient_image(g)


def gradient_image(g: np.ndarray) -> np.ndarray:
    """A signed gradient (H, W, 3) -> uint8 image, 128 + 127 * g / max|g|."""
    peak = float(np.abs(g).max()) if g.size else 0.0
    if not peak > 0 or not np.isfinite(peak):
        return np.full(g.shape, 128, dtype=np.uint8)
    return np.clip(np.rint(128 + 127 * g / peak), 0, 255).astype(np.uint8)
