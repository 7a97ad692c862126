"""Receptive-field boxes against hand-computed geometry, and against the real model's gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepvis.tasks.receptive as receptive
from deepvis.tasks.receptive import receptive_boxes, receptive_field_maps


def interval(lo, hi, size):
    return max(lo, 0), min(hi, size)


def assert_map(rf, size, fy, fx=None):
    """rf: RFMap; fy(i) -> (lo, hi) unclamped input interval of map row i (fx for columns)."""
    fx = fx or fy
    h, w = rf.shape
    for i in range(h):
        for j in range(w):
            y0, y1 = interval(*fy(i), size)
            x0, x1 = interval(*fx(j), size)
            assert rf.box(i, j) == (x0, y0, x1, y1), (i, j)


def stack(dead: bool = False) -> nn.Module:
    m = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3))
    if dead:                                  # every ReLU input negative: the real gradient is 0
        with torch.no_grad():
            m[0].weight.fill_(-1.0)
            m[0].bias.fill_(-10.0)
    return m.eval()


@pytest.mark.parametrize("dead", [False, True])
def test_conv_pool_conv_stack_matches_hand_computation(dead):
    maps = receptive_field_maps(stack(dead), ["0", "2", "3"], 16)
    assert maps["0"].shape == (16, 16) and maps["2"].shape == (8, 8) and maps["3"].shape == (6, 6)
    assert_map(maps["0"], 16, lambda i: (i - 1, i + 2))                # k3 s1 p1
    assert_map(maps["2"], 16, lambda p: (2 * p - 1, 2 * p + 3))        # then max pool 2
    assert_map(maps["3"], 16, lambda q: (2 * q - 1, 2 * q + 7))        # then k3 s1 p0


def test_strided_valid_conv_never_sees_the_last_column():
    m = nn.Sequential(nn.Conv2d(3, 2, 3, stride=2), nn.Conv2d(2, 2, 1)).eval()
    maps = receptive_field_maps(m, ["1"], 16)
    assert maps["1"].shape == (7, 7)
    assert_map(maps["1"], 16, lambda q: (2 * q, 2 * q + 3))
    assert maps["1"].box(6, 6) == (12, 12, 15, 15)


def test_dilated_asymmetric_and_functional_ceil_max_pool():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, (1, 7), padding=(0, 3))           # wide in x only
            self.b = nn.Conv2d(3, 3, 3, padding=2, dilation=2)
            self.c = nn.Identity()

        def forward(self, x):
            x = self.b(self.a(x))
            return self.c(F.max_pool2d(x, 3, 2, ceil_mode=True))       # functional, not a module

    n = 20
    maps = receptive_field_maps(Net().eval(), ["a", "b", "c"], n)

    def span(sets):
        u = set().union(*sets)
        return min(u), max(u) + 1

    inside = lambda ts: [t for t in ts if 0 <= t < n]                   # noqa: E731 - zero padding
    a_rows = lambda i: {i}                                              # noqa: E731
    a_cols = lambda j: set(range(j - 3, j + 4))                         # noqa: E731
    b_rows = lambda i: set().union(*(a_rows(t) for t in inside([i - 2, i, i + 2])))  # noqa: E731
    b_cols = lambda j: set().union(*(a_cols(t) for t in inside([j - 2, j, j + 2])))  # noqa: E731
    c_rows = lambda p: set().union(*(b_rows(t) for t in inside(range(2 * p, 2 * p + 3))))  # noqa: E731
    c_cols = lambda p: set().union(*(b_cols(t) for t in inside(range(2 * p, 2 * p + 3))))  # noqa: E731
    assert_map(maps["a"], n, lambda i: span([a_rows(i)]), lambda j: span([a_cols(j)]))
    # the dilated conv's taps are a comb: row 1 sees rows 1 and 3 only (row -1 is padding)
    assert maps["b"].box(1, 5) == (0, 1, 11, 4)
    assert_map(maps["b"], n, lambda i: span([b_rows(i)]), lambda j: span([b_cols(j)]))
    assert maps["c"].shape == (10, 10)                                 # ceil mode: 10, not 9
    assert_map(maps["c"], n, lambda p: span([c_rows(p)]), lambda p: span([c_cols(p)]))


def test_linear_layer_sees_everything():
    m = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 10 * 10, 4)).eval()
    maps = receptive_field_maps(m, ["2"], 12)
    assert maps["2"].shape == (1, 1) and maps["2"].box(0, 0) == (0, 0, 12, 12)


def test_vector_layer_box_by_one_backward_pass():
    """receptive_boxes on an N x C layer: one reverse-mode pass, same answer as the sweep, and a linear
    head over a crop of the map sees only that crop."""
    m = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 10 * 10, 4)).eval()
    assert receptive_boxes(m, "2", 12, [(0, 0)]) == [receptive_field_maps(m, ["2"], 12)["2"].box(0, 0)]

    class Corner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)            # 12 -> 10
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(self.conv(x)[:, :, 2:6, 5:9].flatten(1))
    # rows 2..5 and columns 5..8 of the map see input rows 2..7, columns 5..10
    assert receptive_boxes(Corner().eval(), "fc", 12, [(0, 0)]) == [(5, 2, 11, 8)]


class Gated(nn.Module):
    """Nonlinear surrogates (the forward-mode AD path): a squeeze-excitation gate (global) and a
    square (local)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.sq = nn.Identity()
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.gate = nn.Identity()

    def forward(self, x):
        x = self.sq(self.a(x) ** 2)
        x = self.b(x)
        return self.gate(x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True)))


def test_nonlinear_models_use_forward_ad():
    m = Gated().eval()
    assert not receptive._is_linear(receptive._surrogate(m, "cpu"), ["sq", "gate"], 10, "cpu", torch.float32)
    maps = receptive_field_maps(m, ["sq", "b", "gate"], 10)
    assert_map(maps["sq"], 10, lambda i: (i - 1, i + 2))
    assert_map(maps["b"], 10, lambda i: (i - 2, i + 3))
    assert maps["gate"].box(0, 0) == (0, 0, 10, 10)                    # the gate sees everything


def test_receptive_boxes_api_and_cache(monkeypatch):
    m = stack()
    boxes = receptive_boxes(m, "3", 16, [(0, 0), (1, 2), (5, 5)])
    assert boxes == [(0, 0, 7, 7), (3, 1, 11, 9), (9, 9, 16, 16)]
    assert all(isinstance(v, int) for b in boxes for v in b)
    calls = []
    monkeypatch.setattr(receptive, "receptive_field_maps", lambda *a, **k: calls.append(a) or {})
    assert receptive_boxes(m, "0", 16, [(15, 0)]) == [(0, 14, 2, 16)]   # cached by the first sweep
    assert receptive_boxes(m, "3", 16, []) == []
    assert calls == []
    with pytest.raises(ValueError, match="outside"):
        receptive_boxes(m, "3", 16, [(6, 0)])


def real_gradient_box(module, layer, size, y, x, seeds=3):
    """Bounding box of nonzero input gradient of the real model (union over random inputs)."""
    from deepvis.tasks.hooks import hooked
    hit = torch.zeros(size, size, dtype=torch.bool)
    for s in range(seeds):
        torch.manual_seed(s)
        inp = torch.randn(1, 3, size, size, requires_grad=True)
        with hooked(module, [layer]) as run:
            out = run(inp)[layer]
        out[0, :, y, x].sum().backward()
        hit |= inp.grad[0].abs().sum(0) != 0
    rows, cols = torch.nonzero(hit.any(1)).flatten(), torch.nonzero(hit.any(0)).flatten()
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def test_efficientnet_same_padding_and_depthwise_blocks():
    from deepvis.tasks.models import load_model
    lm = load_model("efficientnet_lite0")
    maps = receptive_field_maps(lm.module, ["_conv_stem", "_blocks.3"], 96)
    # TF 'same' padding on even inputs pads right/bottom only for stride 2; worked out by hand:
    # stem k3 s2, dw k3 s1, dw k3 s2, dw k3 s1, dw k5 s2 (pad 1 | 2)
    assert_map(maps["_conv_stem"], 96, lambda i: (2 * i, 2 * i + 3))
    assert_map(maps["_blocks.3"], 96, lambda i: (8 * i - 10, 8 * i + 25))
    for y, x in [(0, 0), (5, 7), (11, 11)]:
        gx0, gy0, gx1, gy1 = real_gradient_box(lm.module, "_blocks.3", 96, y, x)
        x0, y0, x1, y1 = maps["_blocks.3"].box(y, x)
        assert x0 <= gx0 and y0 <= gy0 and gx1 <= x1 and gy1 <= y1     # measured box covers it


def test_resnet_max_pool_is_covered():
    from deepvis.tasks.models import load_model
    lm = load_model("torchvision:resnet18", weights="none")
    maps = receptive_field_maps(lm.module, ["layer1.0"], 64)
    # conv1 k7 s2 p3, max pool k3 s2 p1, two k3 p1 convs (+ residual)
    assert_map(maps["layer1.0"], 64, lambda i: (4 * i - 13, 4 * i + 14))
    g = real_gradient_box(lm.module, "layer1.0", 64, 8, 8)
    b = maps["layer1.0"].box(8, 8)
    assert b[0] <= g[0] and b[1] <= g[1] and g[2] <= b[2] and g[3] <= b[3]


def test_maps_are_int32_within_input():
    maps = receptive_field_maps(stack(), ["3"], 16)
    for a in (maps["3"].x0, maps["3"].y0, maps["3"].x1, maps["3"].y1):
        assert a.dtype == np.int32 and a.min() >= 0 and a.max() <= 16


def test_one_sweep_of_every_layer_equals_each_layer_alone(lite0):
    """all_layer_maps (what a build computes once and ships to its crop tasks) == a sweep of each
    layer alone, N x C layer included (efficientnet_lite0 at 64 px: the same structure, cheaper)."""
    from deepvis.tasks.receptive import all_layer_maps

    layers = ["_blocks.1", "_blocks.5", "_conv_head", "_fc"]
    together = all_layer_maps(lite0.module, layers, 64)
    for name in layers:
        alone = receptive_field_maps(lite0.module, [name], 64)[name]
        for a, b in zip((alone.x0, alone.y0, alone.x1, alone.y1),
                        (together[name].x0, together[name].y0, together[name].x1, together[name].y1)):
            assert np.array_equal(a, b), name
    assert together["_fc"].shape == (1, 1) and together["_fc"].box(0, 0) == (0, 0, 64, 64)
    assert together["_blocks.1"].box(0, 0)[2] < 64          # an early layer sees part of the input


def test_transposed_sweep_equals_sweeping_both_axes(lite0, monkeypatch):
    """A transposable network (square kernels, the same geometry along x and y) is swept along x
    only, its y extents the x extents transposed; that equals sweeping both axes."""
    layers = ["_conv_stem", "_blocks.1", "_blocks.5", "_blocks.10", "_conv_head"]
    assert receptive._is_transposable(receptive._surrogate(lite0.module, "cpu"), layers, 64, "cpu")
    swept = []
    real = receptive._sweep_linear
    monkeypatch.setattr(receptive, "_sweep_linear", lambda *a, **k: swept.append(a[-1]) or real(*a, **k))
    half = receptive_field_maps(lite0.module, layers, 64)
    monkeypatch.setattr(receptive, "_is_transposable", lambda *a: False)
    full = receptive_field_maps(lite0.module, layers, 64)
    assert swept == [("x",), ("x", "y")]
    for name in layers:
        for a, b in zip((half[name].x0, half[name].y0, half[name].x1, half[name].y1),
                        (full[name].x0, full[name].y0, full[name].x1, full[name].y1)):
            assert np.array_equal(a, b), name


@pytest.mark.parametrize("net", ["wide", "one_sided_pad", "strided_x"])
def test_networks_unlike_along_x_and_y_sweep_both_axes(net):
    m = {"wide": nn.Sequential(nn.Conv2d(3, 3, (1, 7), padding=(0, 3)), nn.Conv2d(3, 3, 3, padding=1)),
         "one_sided_pad": nn.Sequential(nn.ZeroPad2d((1, 0, 0, 1)), nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3)),
         "strided_x": nn.Sequential(nn.Conv2d(3, 3, 3, stride=(1, 2)), nn.Conv2d(3, 3, 3))}[net].eval()
    names = [str(len(m) - 1)]
    assert not receptive._is_transposable(receptive._surrogate(m, "cpu"), names, 16, "cpu")
    rf = receptive_field_maps(m, names, 16)[names[0]]
    if net == "one_sided_pad":    # padded left and bottom by one, then two valid k3 convs: 13 x 13
        assert rf.shape == (13, 13)
        assert_map(rf, 16, fy=lambda i: (i, i + 5), fx=lambda j: (j - 1, j + 4))
