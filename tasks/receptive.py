"""Receptive fields: the region of the preprocessed model input that a unit at (y, x) sees.

Measured, not derived from a table of layer geometries: the box of the unit at (y, x) is the bounding
box of the input pixels its value depends on, read off derivatives, which is exact for any
architecture (asymmetric 'same' padding, depthwise and dilated convs, strided convs that skip the
last input rows, residual branches, pooling, upsampling, concatenations...).

How. Plain gradients of the real network miss pixels wherever the derivative happens to vanish (a
ReLU below zero or ReLU6 above six, the non-maximal inputs of a max pool, a zero weight), so the
derivatives are taken of a *surrogate* with the same structure: a copy of the model whose conv/linear
weights are random positive values (scaled by 1/fan-in), biases 0, batch norms identity, every
activation function the identity and every max pool an average pool with the same window
(intercepted with a TorchFunctionMode, so functional calls in a model's forward are covered too).
Along every path its coefficients are positive, so the derivative of an output with respect to an
input pixel is nonzero exactly when the pixel is structurally connected to it. One tangent per input
column (then per input row), 2 * input_size in all, tells for every output position whether it
depends on that column (row); the box is the first and last such column (row), over all channels of
the layer. The rows are not swept when the network has the same geometry along x and y (the
surrogate's kernels are symmetric, and transposed inputs give transposed outputs, checked at random
points): the row extents are then the column extents transposed, input_size tangents in all.
For a plain conv net the surrogate is linear (checked numerically at random points:
f(a + b) = f(a) + f(b), f(2a) = 2 f(a)), so the tangents are simply run through it, in float32 (in
float64 when the smallest derivative seen comes within 1e-30 of underflow); otherwise (multiplicative
gates, norms over channels) forward-mode AD (jvp) in float64. All positions of all layers asked for
come out of one sweep to the deepest of them (`all_layer_maps`, N x C layers included: what a build
computes once and ships to its crop tasks); `receptive_boxes` caches per (model, input size,
device) and, on a miss, sweeps the whole default layer set at once. Cost of that sweep for
efficientnet_lite0 at 224 (all 66 default layers): see BENCHMARKS.md, "Receptive fields: one sweep".

Limits: operations that mix signs inside (layer/group norm, softmax attention) are generically but
not provably cancellation-free; a global operation (squeeze-excitation, attention, global pooling)
makes the box the whole input, which is what the unit sees. The box (x0, y0, x1, y1) is in pixels of
the preprocessed input, x1/y1 exclusive, within [0, input_size] by construction.
"""
from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from deepvis.tasks.hooks import as_module, hooked


@dataclass
class RFMap:
    """Per layer: the box of every position of its map, arrays (H, W) (1 x 1 for N x C layers)."""
    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.x0.shape

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        return int(self.x0[y, x]), int(self.y0[y, x]), int(self.x1[y, x]), int(self.y1[y, x])


_IDENTITY = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_",
    "selu", "selu_", "celu", "celu_", "gelu", "silu", "silu_", "mish", "mish_", "hardswish",
    "hardswish_", "hardsigmoid", "hardsigmoid_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus",
    "prelu", "rrelu", "rrelu_", "threshold", "threshold_", "logsigmoid", "softsign", "tanhshrink",
    "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_",
}
_MAX_POOL = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "_max_pool1d": 1, "_max_pool2d": 2,
             "_max_pool3d": 3}
_ADAPTIVE_MAX = {"adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3,
                 "_adaptive_max_pool1d": 1, "_adaptive_max_pool2d": 2, "_adaptive_max_pool3d": 3}
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _all_ones(v) -> bool:
    return all(int(d) == 1 for d in (v if isinstance(v, (tuple, list)) else [v]))


class _Transparent(TorchFunctionMode):
    """Activations -> identity, max pools -> average pools of the same window (the same output
    shape and the same structural connections, but every input of a window passes a derivative)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _IDENTITY and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if name in _MAX_POOL and args:
            a = dict(zip(_POOL_ARGS, args), **kwargs)
            dim = _MAX_POOL[name]
            ks = a["kernel_size"]
            stride = a.get("stride") or ks
            if not a.get("return_indices") and _all_ones(a.get("dilation", 1)):
                avg = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dim - 1]
                return avg(a["input"], ks, stride, a.get("padding", 0), bool(a.get("ceil_mode", False)), True)
        if name in _ADAPTIVE_MAX and args:
            a = dict(zip(("input", "output_size", "return_indices"), args), **kwargs)
            if not a.get("return_indices"):
                avg = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[_ADAPTIVE_MAX[name] - 1]
                return avg(a["input"], a["output_size"])
        return func(*args, **kwargs)


def _surrogate(module: nn.Module, device, dtype=torch.float32, seed: int = 0) -> nn.Module:
    """A copy of `module` with the same structure and positive, generic coefficients."""
    m = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)

    def positive(shape, scale=1.0):
        return ((torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5) * scale).to(device, dtype)

    with torch.no_grad():
        for sub in m.modules():
            is_bn = isinstance(sub, nn.modules.batchnorm._NormBase)
            for pname, p in sub.named_parameters(recurse=False):
                if not p.is_floating_point():
                    continue
                if pname == "bias" or (is_bn and pname != "weight"):
                    p.zero_()
                elif is_bn:
                    p.fill_(1.0)
                elif p.dim() >= 2:
                    w = positive(p.shape, 1.0 / max(1, p[0].numel()))
                    if p.dim() == 4 and p.shape[-1] == p.shape[-2]:
                        # symmetric square kernels (still positive: the same support), so a network
                        # whose structure is the same along x and y maps transposed inputs to
                        # transposed outputs, and one axis' sweep gives the other (_is_transposable)
                        w = (w + w.transpose(-1, -2)) / 2
                    p.copy_(w)
                else:
                    p.copy_(positive(p.shape))
            if is_bn:
                if getattr(sub, "running_mean", None) is not None:
                    sub.running_mean.zero_()
                if getattr(sub, "running_var", None) is not None:
                    sub.running_var.fill_(1.0)
    return m


def _default_chunk(device) -> int:
    return 64 if torch.device(device).type == "cuda" else 32


class _Extents:
    """Running first/last input column (row) of every output position of every layer."""

    def __init__(self, size: int, device):
        self.size = size
        self.device = device
        self.lo: dict[tuple[str, str], torch.Tensor] = {}
        self.hi: dict[tuple[str, str], torch.Tensor] = {}
        self.tiny = float("inf")           # smallest nonzero |derivative| seen (underflow guard)
        self.axis = "x"
        self.start = 0

    def update(self, name: str, deriv: torch.Tensor | None, shape) -> None:
        n = shape[0]
        if deriv is None:                  # the output does not depend on the input at all
            nz = torch.zeros((n, *shape[2:]), dtype=torch.bool, device=self.device)
        else:
            # "some channel nonzero" as "channel max of |d| > 0": one reduction instead of compare,
            # index and any over the whole map (those took 2/3 of the sweep's time). The smallest
            # nonzero |d| (the float32 underflow guard) is read on each axis' first chunk only:
            # magnitudes depend on the depth, not on which columns a chunk holds
            a = deriv.abs()
            if self.start == 0:
                pos = a[a > 0]
                if pos.numel():
                    self.tiny = min(self.tiny, float(pos.min()))
            nz = (a.amax(dim=1) if a.dim() > 1 else a) > 0   # over channels -> (n, H, W) or (n,)
        if nz.dim() == 1:
            nz = nz.view(n, 1, 1)
        elif nz.dim() != 3:
            raise ValueError(f"layer {name!r}: receptive fields need an N x C or N x C x H x W output, "
                             f"got shape {tuple(shape)}")
        idx = torch.arange(self.start, self.start + n, device=nz.device).view(n, 1, 1)
        first = torch.where(nz, idx, torch.full_like(idx, self.size)).amin(dim=0)
        last = torch.where(nz, idx + 1, torch.zeros_like(idx)).amax(dim=0)
        key = (self.axis, name)
        if key in self.lo:
            first, last = torch.minimum(self.lo[key], first), torch.maximum(self.hi[key], last)
        self.lo[key], self.hi[key] = first, last

    def transpose_x_to_y(self, names: list[str]) -> None:
        """The y extents from the x sweep of a transposable network (see _is_transposable): the rows
        the unit at (y, x) sees are the columns the unit at (x, y) sees."""
        for name in names:
            self.lo[("y", name)] = self.lo[("x", name)].transpose(-1, -2)
            self.hi[("y", name)] = self.hi[("x", name)].transpose(-1, -2)

    def maps(self, names: list[str]) -> dict[str, RFMap]:
        s = self.size
        out = {}
        for name in names:
            x0, x1 = self.lo[("x", name)].cpu().numpy(), self.hi[("x", name)].cpu().numpy()
            y0, y1 = self.lo[("y", name)].cpu().numpy(), self.hi[("y", name)].cpu().numpy()
            empty = (x1 <= x0) | (y1 <= y0)              # sees no pixel: give the whole input
            x0, y0 = np.where(empty, 0, x0), np.where(empty, 0, y0)
            x1, y1 = np.where(empty, s, x1), np.where(empty, s, y1)
            out[name] = RFMap(*(a.astype(np.int32) for a in (x0, y0, x1, y1)))
        return out


def _tangents(axis: str, start: int, n: int, size: int, device, dtype) -> torch.Tensor:
    """n one-hot columns (axis 'x') or rows ('y') of an input of size x size, all channels."""
    t = torch.zeros(n, 3, size, size, device=device, dtype=dtype)
    rows = torch.arange(n, device=device)
    if axis == "x":
        t[rows, :, :, start + rows] = 1.0
    else:
        t[rows, :, start + rows, :] = 1.0
    return t


def _is_linear(sur: nn.Module, names: list[str], size: int, device, dtype) -> bool:
    """Is the surrogate (in the transparent mode) linear in its input at every layer asked for?
    (it is for conv/pool/residual/concat networks; not with multiplicative gates, norms over
    channels or max-type reductions). Checked at random points: f(a + b) = f(a) + f(b), f(2a) = 2 f(a)."""
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(1, 3, size, size, generator=gen, dtype=torch.float64) + 0.5
    b = torch.rand(1, 3, size, size, generator=gen, dtype=torch.float64) + 0.5
    x = torch.cat([a, b, a + b, 2 * a]).to(device, dtype)
    outs = {}
    with torch.no_grad(), _Transparent(), hooked(sur, names) as run:
        outs = run(x)
    tol = 1e-3 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    for out in outs.values():
        o = out.double()
        scale = o.abs().amax().clamp_min(1e-300)
        if not (torch.isfinite(o).all() and (o[2] - o[0] - o[1]).abs().max() <= tol * scale
                and (o[3] - 2 * o[0]).abs().max() <= tol * scale):
            return False
    return True


def receptive_field_maps(model, layers: list[str], input_size: int, device="cpu",
                         chunk: int | None = None) -> dict[str, RFMap]:
    """The boxes of every position of every layer in `layers`, in one sweep (see module doc).
    Not cached; `receptive_boxes` caches.

    Linear surrogates (plain conv nets) are evaluated directly on the one-hot tangents, in float32
    unless the smallest derivative seen comes near float32's underflow, then in float64; the others
    with forward-mode AD (jvp) in float64."""
    module = as_module(model)
    names = list(dict.fromkeys(layers))
    if not names:
        return {}
    s = int(input_size)
    chunk = int(chunk or _default_chunk(device))
    sur = _surrogate(module, device, torch.float32)
    if _is_linear(sur, names, s, device, torch.float32):
        axes = ("x",) if _is_transposable(sur, names, s, device) else ("x", "y")
        ext = _sweep_linear(sur, names, s, device, torch.float32, chunk, axes)
        if ext.tiny < 1e-30:
            ext = _sweep_linear(sur.to(torch.float64), names, s, device, torch.float64, chunk, axes)
        if axes == ("x",):
            ext.transpose_x_to_y(names)
        return ext.maps(names)
    return _sweep_jvp(sur.to(torch.float64), names, s, device, chunk).maps(names)


def _is_transposable(sur: nn.Module, names: list[str], size: int, device) -> bool:
    """Does the (linear) surrogate map a transposed input to transposed outputs at every layer asked
    for? Then the unit at (y, x) depends on input row r exactly as the unit at (x, y) depends on input
    column r, and the y sweep is the x sweep transposed: half the work. True for networks built of
    square kernels, equal strides/paddings along both axes and pools alike (with the surrogate's
    symmetric kernels); false e.g. with 1 x 7 convolutions, one-sided padding or non-square maps.
    Checked at random points in float64, element by element (relative 1e-9): a linear map that
    commutes with the transpose on random inputs does on all, and an asymmetry anywhere shows at
    the outputs whose receptive field it lies in the middle of, at a relative size far above 1e-9."""
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, size, size, generator=gen, dtype=torch.float64) + 0.5
    x = torch.cat([a, a.transpose(-1, -2)]).to(device)
    with torch.no_grad(), _Transparent(), hooked(copy.deepcopy(sur).double(), names) as run:
        outs = run(x)
    for out in outs.values():
        if out.dim() != 4 or out.shape[-1] != out.shape[-2]:
            return False
        ref = out[:2].transpose(-1, -2)
        if not (torch.isfinite(out).all() and ((out[2:] - ref).abs() <= 1e-9 * ref.abs() + 1e-300).all()):
            return False
    return True


def _sweep_linear(sur, names, s, device, dtype, chunk, axes=("x", "y")) -> _Extents:
    ext = _Extents(s, device)
    # channels_last: the same values, about 1.4x faster convolutions on CPU (BENCHMARKS.md)
    fmt = torch.channels_last
    sur = sur.to(memory_format=fmt)

    def on_output(name, out):
        ext.update(name, out, out.shape)

    with torch.no_grad(), _Transparent(), hooked(sur, names, on_output) as run:
        for axis in axes:
            for start in range(0, s, chunk):
                n = min(chunk, s - start)
                ext.axis, ext.start = axis, start
                run(_tangents(axis, start, n, s, device, dtype).contiguous(memory_format=fmt))
    return ext


def _sweep_jvp(sur, names, s, device, chunk) -> _Extents:
    ext = _Extents(s, device)
    dtype = torch.float64
    gen = torch.Generator().manual_seed(1)
    primal = (torch.rand(1, 3, s, s, generator=gen, dtype=torch.float64) + 0.5).to(device, dtype)

    def on_output(name, out):
        ext.update(name, fwAD.unpack_dual(out).tangent, out.shape)

    with torch.no_grad(), fwAD.dual_level(), _Transparent(), hooked(sur, names, on_output) as run:
        for axis in ("x", "y"):
            for start in range(0, s, chunk):
                n = min(chunk, s - start)
                ext.axis, ext.start = axis, start
                run(fwAD.make_dual(primal.expand(n, -1, -1, -1).contiguous(),
                                   _tangents(axis, start, n, s, device, dtype)))
    return ext


_cache: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def all_layer_maps(model, layers: list[str], input_size: int, device="cpu",
                   chunk: int | None = None) -> dict[str, RFMap]:
    """Every layer asked for: the N x C x H x W ones in ONE sweep to the deepest of them, each
    N x C layer (one position) by one reverse-mode pass, which costs one forward and backward
    instead of a sweep through the whole network. What a build computes once and ships to its crop
    work (cluster.crops): receptive fields depend only on the architecture and the input size."""
    module = as_module(model)
    names = list(dict.fromkeys(layers))
    with torch.no_grad(), hooked(module, names) as run:   # output ranks, from one zero image
        dims = {n: o.dim() for n, o in run(torch.zeros(1, 3, int(input_size), int(input_size),
                                                        device=device)).items()}
    maps = receptive_field_maps(module, [n for n in names if dims[n] != 2], input_size, device, chunk)
    for n in names:
        if dims[n] == 2:
            maps[n] = _vector_layer_map(module, n, int(input_size), device)
    return {n: maps[n] for n in names}


def _vector_layer_map(module: nn.Module, layer: str, input_size: int, device) -> RFMap:
    """The box of an N x C layer: the input pixels with a nonzero derivative of the sum of its
    outputs, through the same positive surrogate (so no derivative vanishes by chance)."""
    sur = _surrogate(module, device, torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(1, 3, input_size, input_size, generator=gen, dtype=torch.float64) + 0.5).to(device)
    x.requires_grad_(True)
    with _Transparent(), hooked(sur, [layer]) as run:
        out = run(x)[layer]
    (g,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
    nz = torch.zeros(input_size, input_size, dtype=torch.bool) if g is None else (g[0] != 0).any(dim=0).cpu()
    cols, rows = nz.any(dim=0).nonzero().flatten(), nz.any(dim=1).nonzero().flatten()
    if len(cols) == 0:
        box = (0, 0, input_size, input_size)   # sees no pixel: give the whole input
    else:
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    one = lambda v: np.full((1, 1), v, dtype=np.int32)  # noqa: E731
    return RFMap(one(box[0]), one(box[1]), one(box[2]), one(box[3]))




def _cached_map(module: nn.Module, layer: str, input_size: int, device) -> RFMap:
    key = (int(input_size), str(torch.device(device)))
    with _lock:
        per_model = _cache.setdefault(module, {})
        maps = per_model.setdefault(key, {})
        if layer not in maps:
            # a miss sweeps the WHOLE default layer set (plus this layer) at once: the old
            # sweep-up-to-this-layer recomputed every earlier layer again for each deeper one
            from deepvis.tasks.layers import resolve_layers
            names = [i.name for i in resolve_layers(module, int(input_size), None, device=device)]
            names = [n for n in names if n not in maps] + ([layer] if layer not in names else [])
            maps.update(all_layer_maps(module, names, input_size, device))
        return maps[layer]


def receptive_boxes(model, layer: str, input_size: int, positions: list[tuple[int, int]],
                    device="cpu") -> list[tuple[int, int, int, int]]:
    """For each (y, x) of the layer's map: (x0, y0, x1, y1), the region of the preprocessed input
    (pixels, x1/y1 exclusive, within [0, input_size]) that the unit at (y, x) sees. For N x C layers
    the single box (every position given maps to it)."""
    module = as_module(model)
    rf = _cached_map(module, layer, input_size, device)
    h, w = rf.shape
    boxes = []
    for y, x in positions:
        y, x = int(y), int(x)
        if (h, w) == (1, 1):
            y = x = 0
        elif not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"position (y={y}, x={x}) is outside layer {layer!r}'s {h} x {w} map")
        boxes.append(rf.box(y, x))
    return boxes
