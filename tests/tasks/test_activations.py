"""batch_unit_maxima: spatial max + first-occurrence argmax per unit, reduced inside the hooks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deepvis.tasks.activations import batch_unit_maxima, spatial_max
from deepvis.tasks.errors import UserError


class Probe(nn.Module):
    """feat: returns a fixed map per image (the input selects it); head: linear; tail must never
    run when only feat/head are asked for."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.register_buffer("maps", maps)               # (N, C, H, W)
        self.feat = nn.Identity()
        self.head = nn.Linear(maps.shape[1], 3)
        self.tail = nn.Linear(3, 2)
        self.tail_calls = 0

        def count(*_):
            self.tail_calls += 1
        self.tail.register_forward_pre_hook(count)

    def forward(self, x):
        f = self.feat(self.maps[: x.shape[0]] + 0 * x.sum())
        h = self.head(f.mean(dim=(2, 3)))
        return self.tail(h)


def test_max_and_first_occurrence_argmax_with_ties():
    maps = torch.zeros(2, 3, 4, 5)
    maps[0, 0, 1, 2] = 5.0
    maps[0, 0, 3, 4] = 5.0                 # tie, later in row-major order
    maps[0, 1] = -1.0                      # constant map: first position
    maps[0, 2, 2, 0] = 1.0
    maps[0, 2, 0, 3] = 1.0                 # tie, earlier in row-major order -> wins
    maps[1, 0, 3, 4] = 2.0
    maps[1, 1, 0, 0] = float("nan")        # NaN counts as the maximum (as numpy)
    maps[1, 2] = torch.arange(20.0).view(4, 5).flip(0)
    m = Probe(maps).eval()
    out = batch_unit_maxima(m, ["feat", "head"], torch.zeros(2, 3, 8, 8))
    v, y, x = out["feat"]
    assert v.dtype == torch.float32 and y.dtype == torch.int32 and x.dtype == torch.int32
    assert v.device.type == "cpu" and v.shape == (2, 3)
    assert v[0].tolist() == [5.0, -1.0, 1.0]
    assert y[0].tolist() == [1, 0, 0] and x[0].tolist() == [2, 0, 3]
    assert v[1, 0] == 2.0 and (y[1, 0], x[1, 0]) == (3, 4)
    assert torch.isnan(v[1, 1]) and (y[1, 1], x[1, 1]) == (0, 0)
    assert v[1, 2] == 19.0 and (y[1, 2], x[1, 2]) == (0, 4)
    hv, hy, hx = out["head"]
    assert hv.shape == (2, 3) and (hy == 0).all() and (hx == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(hv, m.head(maps.mean(dim=(2, 3))), equal_nan=True)
    assert m.tail_calls == 0                               # stopped after the deepest layer asked for


def test_order_of_layers_and_duplicates_and_empty():
    maps = torch.randn(3, 4, 6, 6)
    m = Probe(maps).eval()
    out = batch_unit_maxima(m, ["head", "feat", "head"], torch.zeros(3, 3, 4, 4))
    assert list(out) == ["head", "feat"]
    flat = maps.flatten(2)
    torch.testing.assert_close(out["feat"][0], flat.amax(2))
    assert torch.equal(out["feat"][1].long() * 6 + out["feat"][2].long(), flat.argmax(2))
    assert batch_unit_maxima(m, [], torch.zeros(1, 3, 4, 4)) == {}
    with pytest.raises(UserError):
        batch_unit_maxima(m, ["nope"], torch.zeros(1, 3, 4, 4))


def test_reduction_happens_in_the_hook_before_in_place_changes():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1, bias=False)
            nn.init.ones_(self.conv.weight)
            self.after = nn.Identity()

        def forward(self, x):
            y = self.conv(x)
            y.mul_(-1)                     # a later in-place op rewrites the hooked output
            return self.after(y)

    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 2, 1] = 7.0
    out = batch_unit_maxima(InPlace().eval(), ["conv", "after"], x)
    v, y, xx = out["conv"]
    assert v.tolist() == [[7.0, 7.0]] and y.tolist() == [[2, 2]] and xx.tolist() == [[1, 1]]
    assert out["after"][0].tolist() == [[0.0, 0.0]]


def test_bad_shapes():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Flatten(0)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(ValueError, match="N x C"):
        batch_unit_maxima(Seq(), ["a"], torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError):
        spatial_max(torch.zeros(2, 3, 4))


def test_efficientnet_matches_full_maps():
    from deepvis.tasks.models import load_model

    lm = load_model("efficientnet_lite0")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    layers = ["_conv_stem", "_blocks.0._depthwise_conv", "_blocks.5", "_conv_head", "_fc"]
    from deepvis.tasks.hooks import hooked
    with torch.no_grad(), hooked(lm.module, layers) as run:
        full = {k: v.clone() for k, v in run(x).items()}
    out = batch_unit_maxima(lm, layers, x)                   # a LoadedModel works too
    for name in layers:
        f = full[name]
        v, y, xx = out[name]
        if f.dim() == 2:
            torch.testing.assert_close(v, f)
            continue
        flat = f.flatten(2)
        assert torch.equal(v, flat.amax(2))
        assert torch.equal(y.long() * f.shape[3] + xx.long(), flat.argmax(2))


def test_to_model_input_is_bit_identical_to_preprocess():
    import numpy as np
    from PIL import Image

    from deepvis.tasks.activations import to_model_input
    from deepvis.tasks.preprocess import crop_input, preprocess

    rng = np.random.default_rng(0)
    pre = {"resize": 40, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
           "interpolation": "bilinear"}
    imgs = [Image.fromarray(rng.integers(0, 256, (50 + i, 45, 3), dtype=np.uint8)) for i in range(3)]
    imgs.append(Image.fromarray(np.arange(256, dtype=np.uint8).repeat(4).reshape(32, 32, 1).repeat(3, 2)))
    ref = torch.stack([preprocess(im, pre) for im in imgs])
    crops = np.stack([np.asarray(crop_input(im, pre)) for im in imgs])
    got = to_model_input(crops, pre)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.equal(got, ref)
    assert torch.equal(to_model_input(torch.from_numpy(crops), {**pre, "mean": [0.5] * 3, "std": [0.5] * 3}),
                       torch.stack([preprocess(im, {**pre, "mean": [0.5] * 3, "std": [0.5] * 3}) for im in imgs]))
    with pytest.raises(ValueError):
        to_model_input(crops.astype(np.float32), pre)


def test_to_cpu_false_leaves_the_maxima_where_the_model_is():
    maps = torch.randn(2, 3, 4, 5)
    m = Probe(maps).eval()
    on_host = batch_unit_maxima(m, ["feat", "head"], torch.zeros(2, 3, 4, 4))
    on_dev = batch_unit_maxima(m, ["feat", "head"], torch.zeros(2, 3, 4, 4), to_cpu=False)
    for name in ("feat", "head"):
        for a, b in zip(on_host[name], on_dev[name]):
            assert torch.equal(a, b) and a.dtype == b.dtype


def test_channels_first_uint8_and_channels_last_output_are_the_same_input():
    import numpy as np
    from deepvis.tasks.activations import to_model_input
    pre = {"resize": 40, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    crops = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    ref = to_model_input(crops, pre)
    got = to_model_input(crops.permute(0, 3, 1, 2), pre, channels_last=True)   # cluster.decode's batches
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, ref)


def test_spatial_max_of_a_channels_last_map_equals_the_contiguous_one():
    """Ties (a map of few levels) and NaN: the channels-last view gives the same values and the same
    first-occurrence argmax as the contiguous reshape."""
    maps = (torch.randn(4, 6, 5, 7) * 2).round() / 2
    maps[1, 2, 3, 4] = float("nan")
    ref = spatial_max(maps)
    got = spatial_max(maps.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, got):
        assert torch.equal(a.nan_to_num(99), b.nan_to_num(99)) and a.dtype == b.dtype


def test_spatial_max_equals_numpy_brute_force_on_cpu_and_its_pooled_path():
    """spatial_max (on CPU float32 maps: a global max pool with indices, tasks.activations._pooled_max)
    against numpy's max and argmax (first occurrence, NaN counted as the maximum): ties of few levels,
    +-inf, a constant map, a map with two NaNs (the pool would take the last: the fallback), 1 x 1
    maps, both memory formats."""
    import numpy as np

    from deepvis.tasks.activations import _pooled_max

    g = torch.Generator().manual_seed(5)
    cases = [(torch.randn(3, 5, 9, 11, generator=g) * 2).round() / 2, torch.zeros(2, 4, 6, 6),
             torch.randn(4, 3, 1, 1, generator=g), torch.randn(2, 7, 7, 7, generator=g)]
    cases[3][0, 1, 2, 2] = cases[3][0, 1, 5, 6] = float("inf")
    cases[3][1, 2] = float("-inf")
    nan = torch.randn(2, 3, 5, 5, generator=g)
    nan[0, 1, 1, 1] = nan[0, 1, 3, 3] = float("nan")
    for maps in cases + [nan]:
        flat = maps.flatten(2).numpy()
        want_v, want_i = flat.max(2), flat.argmax(2)         # numpy: NaN is the max, first index
        for mf in (torch.contiguous_format, torch.channels_last):
            v, y, x = spatial_max(maps.contiguous(memory_format=mf))
            assert np.array_equal(v.numpy(), want_v, equal_nan=True)
            assert np.array_equal(y.numpy() * maps.shape[3] + x.numpy(), want_i)
            assert y.dtype == x.dtype == torch.int32 and v.dtype == torch.float32
    assert _pooled_max(cases[0]) is not None and _pooled_max(nan) is None   # the fast path is the one tested
    assert _pooled_max(cases[0].double()) is None


def test_crop_input_is_torchvisions_resize_and_center_crop():
    """tasks.preprocess.crop_input (PIL only, for the decode processes) = TF.resize + TF.center_crop,
    pixel for pixel: odd sizes, portrait, landscape, already at size, smaller than the crop (padding)."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from deepvis.tasks.preprocess import crop_input
    rng = np.random.default_rng(2)
    for (h, w) in [(375, 500), (500, 333), (256, 256), (257, 300), (301, 256), (120, 90), (1000, 257)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for interp in ("bilinear", "bicubic", "nearest"):
            for resize, crop in ((256, 224), (232, 224), (200, 224)):
                pre = {"resize": resize, "crop": crop, "interpolation": interp}
                ref = TF.center_crop(TF.resize(img, resize, interpolation=InterpolationMode(interp)), crop)
                assert np.array_equal(np.asarray(crop_input(img, pre)), np.asarray(ref)), (h, w, interp, resize)
