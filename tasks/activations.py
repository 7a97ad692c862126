"""One forward pass of a batch -> every unit's activation (FORMAT.md: the spatial max) and its argmax.

The reduction happens inside the forward hook, as each layer fires: the full N x C x H x W maps are
never kept (a later in-place op cannot change what was measured, and memory stays that of a bare
forward), and the forward stops after the deepest layer asked for (tasks.hooks.hooked). Values and
positions of all layers travel to the host as one int32 tensor (values bit-cast): a single
device->host copy per batch.
"""
from __future__ import annotations

import torch

from deepvis.tasks.hooks import as_module, hooked


def spatial_max(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> (values (N, C) float32, y (N, C) int32, x (N, C) int32), on out's device;
    (N, C) -> (values, 0, 0). Ties: the first position in row-major order (torch.max over one dim
    returns the index of the first maximal value, on CPU and CUDA; NaN counts as the maximum, as
    numpy's argmax)."""
    if out.dim() == 4:
        n, c, h, w = out.shape
        pooled = _pooled_max(out)
        if pooled is not None:
            return pooled
        if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
            # (N, H*W, C) is a view of a channels-last map: no copy; the max over a non-innermost
            # dim breaks ties by the lower index as well
            values, flat = out.permute(0, 2, 3, 1).reshape(n, h * w, c).max(dim=1)
        else:
            values, flat = out.reshape(n, c, h * w).max(dim=2)
        flat = flat.to(torch.int32)
        return values.float(), torch.div(flat, w, rounding_mode="floor"), torch.remainder(flat, w)
    if out.dim() == 2:
        zeros = torch.zeros(out.shape, dtype=torch.int32, device=out.device)
        return out.float(), zeros, zeros
    raise ValueError(f"a unit's activation needs an N x C or N x C x H x W output, got shape "
                     f"{tuple(out.shape)}")


def _pooled_max(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """spatial_max of a float32 CPU map by a global max pool with indices: the same values and the
    same first-occurrence positions in a quarter of the time (the pool's CPU kernels scan row-major
    and replace only on a strictly larger value; vectorized over channels for a channels-last map,
    where max(dim) with indices is not): the hooks of the dataset pass read every map once more for
    this, and on CPU that was 15-20% of the forward (BENCHMARKS.md). None when it does not apply: not
    a float32 CPU map (CUDA keeps max(dim), whose ties are verified there), or a NaN in a map (the
    pool takes the last NaN, the definition the first)."""
    if out.device.type != "cpu" or out.dtype != torch.float32:
        return None
    n, c, h, w = out.shape
    values, flat = torch.nn.functional.adaptive_max_pool2d(out, 1, return_indices=True)
    values = values.reshape(n, c)
    if bool(torch.isnan(values).any()):
        return None
    flat = flat.reshape(n, c).to(torch.int32)
    return values, torch.div(flat, w, rounding_mode="floor"), torch.remainder(flat, w)


@torch.no_grad()
def batch_unit_maxima(model, layers: list[str], x: torch.Tensor, to_cpu: bool = True
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """x: (B, 3, H, W) preprocessed, on the model's device. Returns, per layer (in the order
    given, duplicates dropped), CPU tensors (values (B, C) float32, y (B, C) int32, x (B, C) int32):
    each unit's spatial max and its position (first occurrence in row-major order on ties); for
    N x C outputs y = x = 0. The three are column slices of one host buffer (views).
    to_cpu=False: leave them on the model's device (RunningTopK.add then reduces them there and
    moves only the few candidates that can enter a top/bottom list: on a GPU, what keeps the pass
    from being bound by host-side numpy)."""
    module = as_module(model)
    names = list(dict.fromkeys(layers))
    if not names:
        return {}
    reduced: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def on_output(name: str, out: torch.Tensor) -> None:
        reduced[name] = spatial_max(out)

    with hooked(module, names, on_output=on_output) as run:
        run(x)
    if not to_cpu:
        return {n: reduced[n] for n in names}
    widths = [reduced[n][0].shape[1] for n in names]
    packed = torch.cat([torch.cat([reduced[n][0].view(torch.int32) for n in names], dim=1),
                        torch.cat([reduced[n][1] for n in names], dim=1),
                        torch.cat([reduced[n][2] for n in names], dim=1)], dim=1)
    if packed.device.type == "cuda":
        # into pinned memory (PyTorch's caching host allocator reuses it), then wait for the copy
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(packed.device).synchronize()
    else:
        host = packed.cpu()
    total = sum(widths)
    values = host[:, :total].view(torch.float32)
    ys, xs = host[:, total:2 * total], host[:, 2 * total:]
    result = {}
    start = 0
    for name, width in zip(names, widths):
        sl = slice(start, start + width)
        result[name] = (values[:, sl], ys[:, sl], xs[:, sl])
        start += width
    return result


def _lut(pre: dict) -> torch.Tensor:
    """(3, 256) float32: the normalized value of every 8-bit level of every channel, computed with
    exactly the CPU operations of tasks.preprocess.preprocess (to_tensor's /255, then
    (x - mean) / std)."""
    levels = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255).view(1, 256)
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(3, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(3, 1)
    return (levels - mean) / std


@torch.no_grad()
def to_model_input(batch, pre: dict, device="cpu", channels_last: bool = False) -> torch.Tensor:
    """uint8 crops (B, H, W, 3) (a tensor, or e.g. np.stack of np.asarray(crop_input(img, pre))) or
    (B, 3, H, W) (cluster.decode's batches) -> the normalized model input (B, 3, H, W) float32 on
    `device` (channels-last memory when asked), bit-identical to stacking
    tasks.preprocess.preprocess(img, pre) (a per-channel lookup table built with the same CPU
    operations). A loader then moves 4x fewer bytes and does no float work on its CPUs."""
    b = torch.as_tensor(batch)
    if b.dtype != torch.uint8 or b.dim() != 4 or 3 not in (b.shape[1], b.shape[3]):
        raise ValueError(f"to_model_input needs uint8 (B, H, W, 3) or (B, 3, H, W), got {b.dtype} {tuple(b.shape)}")
    if b.shape[1] != 3:
        b = b.permute(0, 3, 1, 2)                 # a view: (B, 3, H, W) in channels-last memory
    b = b.to(device, non_blocking=True)
    lut = _lut(pre).to(b.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(b.shape, dtype=torch.float32, device=b.device, memory_format=fmt)
    for c in range(3):
        out[:, c] = lut[c][b[:, c].long()]
    return out
