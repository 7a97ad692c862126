"""Image parameterizations for feature visualization (Lucid/Lucent's split): each returns
`(params, image_fn)`; `params` are the leaf tensors an optimizer updates, `image_fn()` the batch of
images (B, 3, H, W) in [0, 1], differentiable in `params`.

  pixel     the image itself (through a sigmoid, so any value of the parameter is a valid image)
  fourier   a spectrum scaled by 1/f^decay (Lucid's fft_image): steps in all frequencies are equal
            in the scaled space, so low frequencies, which carry natural images' energy, move first
  maco      MaCo (Fel et al. 2023): the magnitude spectrum is FIXED to natural images' (measured from
            ImageNet photos, tasks/data/natural_spectrum.npz) and only the phase is optimized
Each works in a decorrelated colour space when decorrelate=True: channels are mixed by the square
root of ImageNet's colour covariance (Lucid's color_correlation_svd_sqrt), so the optimizer's steps
are decorrelated in colour as the spectrum makes them in space.

Every generator takes a list of per-image seeds (one torch.Generator each): an image's start does not
depend on the batch it is in."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"

# sqrt of ImageNet's RGB colour covariance (Lucid: color_correlation_svd_sqrt), normalised by the
# largest column norm, as Lucid does
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                            [0.27, 0.00, -0.05],
                            [0.27, -0.09, 0.03]], dtype=torch.float64)
COLOR_MATRIX = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


def decorrelate(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in the decorrelated space -> RGB (linear): every pixel's channels times COLOR_MATRIX."""
    m = COLOR_MATRIX.to(x.dtype).to(x.device)
    return torch.einsum("ij,bjhw->bihw", m, x)


def correlate(rgb: torch.Tensor) -> torch.Tensor:
    """The inverse of decorrelate."""
    m = torch.linalg.inv(COLOR_MATRIX).to(rgb.dtype).to(rgb.device)
    return torch.einsum("ij,bjhw->bihw", m, rgb)


def _normal(gens, shape, scale, dtype):
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) * scale for g in gens]).to(dtype)


def pixel(gens: list[torch.Generator], size: int, sd: float = 0.01, decorrelate_colors: bool = True,
          device="cpu", dtype=torch.float32):
    """Pixels (through a sigmoid). Returns (params, image_fn)."""
    p = _normal(gens, (3, size, size), sd, dtype).to(device).requires_grad_(True)

    def image_fn():
        x = decorrelate(p) if decorrelate_colors else p
        return torch.sigmoid(x)
    return [p], image_fn


def frequencies(h: int, w: int) -> torch.Tensor:
    """|f| in cycles per pixel on the rfft2 grid (h, w // 2 + 1)."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def spectrum_scale(h: int, w: int, decay: float = 1.0) -> torch.Tensor:
    """Lucid's 1/f^decay scale on the rfft2 grid (the DC term uses the lowest frequency, 1/max(h, w))."""
    f = frequencies(h, w).clamp(min=1.0 / max(h, w))
    return 1.0 / f ** decay


def fourier(gens: list[torch.Generator], size: int, sd: float = 0.01, decay: float = 1.0,
            decorrelate_colors: bool = True, device="cpu", dtype=torch.float32):
    """Lucid's fft_image: params are the real and imaginary parts of an rfft2 spectrum, scaled by
    1/f^decay (and by 1/sqrt(h*w), so the image's scale does not depend on its size) before the
    inverse transform; then colours (decorrelate) and a sigmoid. Returns (params, image_fn)."""
    h = w = size
    fh, fw = h, w // 2 + 1
    spec = _normal(gens, (3, fh, fw, 2), sd, dtype).to(device).requires_grad_(True)
    scale = (spectrum_scale(h, w, decay) / np.sqrt(h * w)).to(dtype).to(device)

    def image_fn():
        s = torch.view_as_complex(spec.contiguous()) * scale
        x = torch.fft.irfft2(s, s=(h, w), norm="ortho")
        x = decorrelate(x) if decorrelate_colors else x
        return torch.sigmoid(x)
    image_fn.spectrum = spec             # for tests: the raw parameter
    image_fn.scale = scale
    return [spec], image_fn


def spectrum_of(x: torch.Tensor, decay: float = 1.0) -> torch.Tensor:
    """The `fourier` parameter that reproduces the pre-sigmoid, pre-colour image x (B, 3, H, W):
    the inverse of image_fn's linear part (used by tests, and to start from a given image)."""
    h, w = x.shape[-2:]
    s = torch.fft.rfft2(x.double(), norm="ortho") / (spectrum_scale(h, w, decay) / np.sqrt(h * w))
    return torch.view_as_real(s).to(x.dtype)


@functools.lru_cache(maxsize=8)
def natural_magnitude(size: int) -> torch.Tensor:
    """The mean magnitude spectrum of natural images (3, size, size // 2 + 1), in the decorrelated
    colour space, measured from ImageNet photos at 224 px (scripts/natural_spectrum.py) and resampled
    to `size` at equal frequencies (cycles per pixel). Its overall scale does not matter: maco()
    standardises the image."""
    with np.load(DATA / "natural_spectrum.npz") as z:
        mag = torch.from_numpy(z["magnitude"].astype(np.float64))       # (3, 224, 113), fftshift-free
    if size == mag.shape[1]:
        return _hermitian_magnitude(mag, size)
    # resample |F| at equal frequencies (cycles per pixel); the spectrum is periodic in fy: shift it
    # to centre, interpolate, shift back
    centred = torch.fft.fftshift(mag, dim=1)[None]
    out = torch.nn.functional.interpolate(centred, size=(size, size // 2 + 1), mode="bilinear",
                                          align_corners=True)[0]
    return _hermitian_magnitude(torch.fft.ifftshift(out, dim=1), size)


def _mirror_columns(x: torch.Tensor, w: int, sign: float) -> torch.Tensor:
    """x (..., h, w // 2 + 1) on the rfft2 grid, with x[-k] = sign * x[k] imposed (by averaging) in
    the columns that hold both k and -k: column 0, and w/2 for even w."""
    h = x.shape[-2]
    neg = (-torch.arange(h, device=x.device)) % h
    out = x.clone()
    for c in [0] + ([w // 2] if w % 2 == 0 else []):
        out[..., :, c] = (x[..., :, c] + sign * x[..., neg, c]) / 2
    return out


def _hermitian_magnitude(mag: torch.Tensor, w: int) -> torch.Tensor:
    """|F(-k)| = |F(k)| in the rfft columns that hold both (a real image's spectrum must)."""
    return _mirror_columns(mag, w, 1.0)


def hermitian_phase(ph: torch.Tensor, w: int) -> torch.Tensor:
    """The phase (..., h, w // 2 + 1) made consistent with a REAL image: in the rfft columns that hold
    both k and -k (column 0, and w/2 for even w) the phase must be odd, phase[-k] = -phase[k] (and 0 at
    the self-conjugate bins). Without this irfft2 would silently symmetrize those columns and change
    their magnitudes; with it the magnitude spectrum is exactly the one given."""
    return _mirror_columns(ph, w, -1.0)


def maco(gens: list[torch.Generator], size: int, device="cpu", dtype=torch.float32, std: float = 0.18):
    """MaCo: image = irfft2(M * exp(i * phase)) with M the natural magnitude spectrum (fixed) and only
    the phase optimized; then colours (decorrelate), standardised per image and mapped to
    0.5 + std * x (clamped to [0, 1]). Returns (params, image_fn); image_fn.linear(phase) is the
    image before the clamp (its spectrum, in the decorrelated space, is M up to the standardisation)."""
    h = w = size
    mag = natural_magnitude(size).to(dtype).to(device)
    phase = torch.stack([(torch.rand((3, h, w // 2 + 1), generator=g, dtype=torch.float64) * 2 - 1) * np.pi
                         for g in gens]).to(dtype).to(device).requires_grad_(True)

    def linear(ph):
        buf = torch.polar(mag.expand_as(ph), hermitian_phase(ph, w))
        x = torch.fft.irfft2(buf, s=(h, w), norm="ortho")
        x = decorrelate(x)
        x = x - x.mean(dim=(1, 2, 3), keepdim=True)
        return 0.5 + std * x / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-8)

    def image_fn():
        return linear(phase).clamp(0, 1)
    image_fn.linear = linear
    image_fn.magnitude = mag
    return [phase], image_fn


PARAMETERIZATIONS = {"pixel": pixel, "fourier": fourier, "maco": maco}
