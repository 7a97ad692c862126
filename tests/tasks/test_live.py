"""tasks.live: one frame -> top-5, the layer's grid, a unit's map and its gradient, each checked
against an independent computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepvis.tasks.errors import UserError
from deepvis.tasks.grid import layer_activations, normalize_layer, tile_grid
from deepvis.tasks.live import LiveModel, gradient_image
from deepvis.tasks.preprocess import preprocess


@pytest.fixture(scope="module")
def coffee(lite0):
    from skimage import data
    return preprocess(Image.fromarray(data.coffee()), lite0.preprocessing)


def test_frame_matches_plain_forward(lite0, coffee):
    live = LiveModel(lite0)
    res = live.frame(coffee, "_blocks.3", unit=7)
    acts = layer_activations(lite0.module, "_blocks.3", coffee).numpy()          # stops at the layer
    with torch.no_grad():
        p = lite0.module(coffee[None])[0].softmax(0)                             # a separate full pass
    want = torch.topk(p, 5)
    assert [t["index"] for t in res.top5] == want.indices.tolist()
    assert np.allclose([t["p"] for t in res.top5], want.values.numpy(), atol=1e-6)
    assert res.top5[0]["label"] == "espresso"
    assert res.shape == acts.shape == (40, 28, 28) and (res.rows, res.cols) == (6, 7)
    assert (res.grid == tile_grid(acts)).all()
    assert res.range == pytest.approx((acts.min(), acts.max()), abs=1e-6)
    assert res.unit_max == pytest.approx(float(acts[7].max()), abs=1e-6)
    assert (res.unit_map == normalize_layer(acts, (acts.min(), acts.max()))[7]).all()
    assert res.unit_argmax == int(acts.reshape(40, -1).max(1).argmax())


def test_frame_linear_layer_and_errors(lite0, coffee):
    live = LiveModel(lite0)
    res = live.frame(coffee, "_fc", unit=967)
    assert res.shape == (1000,) and (res.rows, res.cols) == (32, 32)
    assert res.unit_argmax == 967 == res.top5[0]["index"]     # the logits layer: its argmax is top-1
    assert res.unit_map.shape == (1, 1)
    with pytest.raises(UserError, match="unit 40 is out of range"):
        live.frame(coffee, "_blocks.3", unit=40)
    with pytest.raises(UserError, match="unknown layer 'nope'"):
        live.frame(coffee, "nope")
    with pytest.raises(UserError, match="out of range"):
        live.gradient(coffee, "_blocks.3", 99)


def test_gradient_matches_finite_differences(lite0, coffee):
    """_conv_stem is linear in the input, so a finite difference of its max is exact (float64)
    as long as the argmax stays put; compare the rendered gradient pixel by pixel."""
    import copy
    live = LiveModel(lite0)
    unit = 5
    img = live.gradient(coffee, "_conv_stem", unit)
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8

    m64 = copy.deepcopy(lite0.module).double()
    x = coffee.double()

    def act(x):
        return layer_activations(m64, "_conv_stem", x)[unit].max().item()

    base = act(x)
    g = np.zeros((224, 224, 3))
    rng = np.random.default_rng(0)
    # where the gradient is non-zero: a 3x3 window (stride 2) around the argmax; probe it and elsewhere
    out = layer_activations(m64, "_conv_stem", x)[unit]
    ay, ax = divmod(int(out.argmax()), out.shape[1])
    probes = [(c, 2 * ay + dy, 2 * ax + dx) for c in range(3) for dy in range(-1, 3) for dx in range(-1, 3)]
    probes += [(int(rng.integers(3)), int(rng.integers(224)), int(rng.integers(224))) for _ in range(10)]
    eps = 1e-3
    for c, i, j in probes:
        if not (0 <= i < 224 and 0 <= j < 224):
            continue
        xp = x.clone()
        xp[c, i, j] += eps
        g[i, j, c] = (act(xp) - base) / eps
    assert np.abs(g).max() > 0
    want = gradient_image(g)           # g is complete: every other pixel's derivative is 0
    seen = np.zeros(g.shape, bool)
    for c, i, j in probes:
        if 0 <= i < 224 and 0 <= j < 224:
            seen[i, j, c] = True
    assert np.abs(img.astype(int) - want.astype(int))[seen].max() <= 1
    assert (img[~seen] == 128).mean() > 0.999    # far from the window the gradient is zero


def test_gradient_image_zero_and_scale():
    assert (gradient_image(np.zeros((4, 4, 3))) == 128).all()
    g = np.array([[[-2.0, 0.0, 1.0]]])
    assert gradient_image(g).tolist() == [[[1, 128, 192]]]
