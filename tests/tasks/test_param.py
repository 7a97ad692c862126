"""tasks.param (parameterizations), tasks.transforms, tasks.quality: each against an independent
computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepvis.tasks import param as P
from deepvis.tasks import transforms as T
from deepvis.tasks.quality import HF_CUTOFF, hf_fraction, natural_hf_median, unit_activation


def gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


# ---------------------------------------------------------------- parameterizations
@pytest.mark.parametrize("name", ["pixel", "fourier", "maco"])
def test_image_fn_is_differentiable_and_valid(name):
    params, image_fn = P.PARAMETERIZATIONS[name](gens(2), 32)
    img = image_fn()
    assert img.shape == (2, 3, 32, 32) and float(img.detach().min()) >= 0 and float(img.detach().max()) <= 1
    (img[:, 0].mean() - img[:, 2].mean()).backward()
    for p in params:
        assert p.grad is not None and float(p.grad.abs().max()) > 0
    # the batch is made of independent images: image 1 of a batch equals the same seed alone
    _, alone = P.PARAMETERIZATIONS[name](gens(1, base=1), 32)
    assert torch.allclose(image_fn()[1], alone()[0], atol=1e-6)


def test_fourier_inverse_round_trips():
    """spectrum_of inverts the linear part of fourier's image_fn: a given image comes back (float64)."""
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    params, image_fn = P.fourier(gens(2), 24, decorrelate_colors=False, dtype=torch.float64)
    with torch.no_grad():
        params[0].copy_(P.spectrum_of(x))
    back = torch.logit(image_fn().detach())
    assert torch.allclose(back, x, atol=1e-8)
    # the 1/f scale: a unit step in the parameter moves a low frequency more than a high one
    s = P.spectrum_scale(24, 24)
    assert float(s[1, 0]) == pytest.approx(24.0) and float(s[12, 12]) == pytest.approx(1 / math.sqrt(0.5 ** 2 * 2))


def test_decorrelation_matrix_applied_and_inverted():
    x = torch.randn(1, 3, 5, 7, dtype=torch.float64)
    m = P.COLOR_MATRIX.numpy()
    want = np.einsum("ij,jhw->ihw", m, x[0].numpy())          # every pixel's RGB = M @ channels
    assert np.allclose(P.decorrelate(x)[0].numpy(), want)
    assert torch.allclose(P.correlate(P.decorrelate(x)), x, atol=1e-12)
    assert float(P.COLOR_MATRIX.norm(dim=0).max()) == pytest.approx(1.0)
    raw = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    assert np.allclose(m, raw / np.linalg.norm(raw, axis=0).max())


def test_maco_keeps_the_natural_magnitude_through_optimization():
    """Measured: the image's spectrum (decorrelated space, DC excluded) stays M times one scalar
    per image after Adam steps that change the phase a lot."""
    params, image_fn = P.maco(gens(2), 32, dtype=torch.float64)
    M = image_fn.magnitude
    phase0 = params[0].detach().clone()
    opt = torch.optim.Adam(params, lr=0.2)
    target = torch.zeros(2, 3, 32, 32, dtype=torch.float64)
    target[:, :, 8:16, 8:16] = 1.0
    for _ in range(15):
        loss = -(image_fn() * target).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float((params[0].detach() - phase0).abs().mean()) > 0.05     # the phase moved

    lin = image_fn.linear(params[0].detach())
    spec = torch.fft.rfft2(P.correlate(lin - 0.5), norm="ortho").abs()
    ratio = spec / M
    ratio[..., 0, 0] = float("nan")                          # DC: the standardisation's mean shift
    for i in range(2):
        r = ratio[i][~torch.isnan(ratio[i])]
        assert float(r.std() / r.mean()) < 1e-8, i
    # and the objective improved: the square got brighter than the rest
    img = image_fn().detach()
    assert float(img[:, :, 8:16, 8:16].mean()) > float(img.mean()) + 0.05


def test_natural_magnitude_falls_with_frequency():
    m = P.natural_magnitude(224)
    assert m.shape == (3, 224, 113)
    f = P.frequencies(224, 224)
    low = m[:, (f > 0.01) & (f < 0.05)].mean()
    high = m[:, f > 0.35].mean()
    assert float(low / high) > 10       # natural images: roughly 1/f
    m64 = P.natural_magnitude(64)
    assert m64.shape == (3, 64, 33) and torch.isfinite(m64).all()


# ---------------------------------------------------------------- transforms
def test_jitter_takes_the_drawn_crop():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float64).view(2, 3, 10, 10)
    out = T.jitter(4)(x, gens(2))
    for i, g in enumerate(gens(2)):
        dy, dx = (int(v) for v in torch.randint(5, (2,), generator=g))
        assert torch.equal(out[i], x[i, :, dy:dy + 6, dx:dx + 6])


def test_identity_transforms_and_pad():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(T.random_scale([1.0])(x, gens(2)), x, atol=1e-12)
    assert torch.allclose(T.random_rotate([0])(x, gens(2)), x, atol=1e-12)
    p = T.pad(3, 0.5)(x, gens(2))
    assert p.shape == (2, 3, 22, 22) and float(p[:, :, 0].sub(0.5).abs().max()) == 0
    # a 90-degree rotation moves pixels exactly (bilinear at pixel centres)
    r = T.random_rotate([90])(x, gens(2))
    assert torch.allclose(r, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-6) or \
        torch.allclose(r, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-6)


@pytest.mark.parametrize("name", ["STANDARD", "MACO", "ROBUSTNESS"])
def test_transforms_are_per_image(name):
    """Image i of a batch is transformed exactly as it would be alone with its own generator."""
    fn = getattr(T, name)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    batch = fn(x, gens(3))
    for i in range(3):
        alone = fn(x[i:i + 1], gens(1, base=i))
        assert torch.allclose(batch[i], alone[0], atol=1e-12), i
    assert not torch.allclose(batch[0], batch[1])


def test_crop_resize_is_a_zoom_inside_the_image():
    x = torch.rand(1, 3, 40, 40, dtype=torch.float64)
    out = T.crop_resize(0.5, 0.5)(x, gens(1))
    assert out.shape == x.shape
    # half-side crop, resized x2: each output pixel pair comes from one input pixel's neighbourhood
    assert float(out.min()) >= float(x.min()) - 1e-9 and float(out.max()) <= float(x.max()) + 1e-9


# ---------------------------------------------------------------- quality
def test_hf_fraction_of_white_noise_and_smooth_images():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(4, 3, 128, 128, generator=g, dtype=torch.float64)
    want = 1 - math.pi * HF_CUTOFF ** 2        # white noise: energy spread evenly over [-.5, .5]^2
    assert hf_fraction(noise).mean().item() == pytest.approx(want, abs=0.02)
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    smooth = (torch.sin(xx / 10) * torch.cos(yy / 7)).expand(1, 3, 128, 128) * 0.5 + 0.5
    assert hf_fraction(smooth).item() < 1e-3       # edge leakage only
    assert 0.001 < natural_hf_median() < 0.2


def test_unit_activation_is_the_spatial_max():
    out = torch.randn(3, 5, 4, 4)
    units = torch.tensor([0, 4, 2])
    want = torch.stack([out[i, u].max() for i, u in enumerate(units.tolist())])
    assert torch.equal(unit_activation(out, units), want)
    flat = torch.randn(3, 5)
    assert torch.equal(unit_activation(flat, units), flat[torch.arange(3), units])
