"""tasks.preprocess on the model's device (--decoder nvjpeg): decode_jpegs + crop_tensor give the
CPU path's crops (storage.images.decode + crop_input, PIL) within one 8-bit level, on real sample
images of many sizes, and refuse what they cannot do instead of guessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepvis.storage.images import decode
from deepvis.tasks.preprocess import crop_input, crop_tensor, decode_jpegs, device_geometry

PRE = {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def jpegs(sample_dir) -> list[bytes]:
    """Every 25th sample file that is a JPEG in RGB or grey (the ones the decode processes send on)."""
    out = []
    for p in sorted(sample_dir.glob("*/*.JPEG"))[::25]:
        with Image.open(p) as im:
            if im.mode in ("RGB", "L"):
                out.append(p.read_bytes())
    assert len(out) >= 25
    return out


def test_device_crops_are_the_pil_crops_within_one_level(jpegs):
    decoded = decode_jpegs(jpegs, "cpu")
    assert all(t is not None and t.dtype == torch.uint8 and t.shape[0] == 3 for t in decoded)
    diffs = []
    for data, t in zip(jpegs, decoded):
        ref = np.asarray(crop_input(decode(data), PRE), dtype=np.int16)
        got = crop_tensor(t, PRE).permute(1, 2, 0).numpy().astype(np.int16)
        assert got.shape == ref.shape == (224, 224, 3)
        diffs.append(np.abs(got - ref))
    d = np.stack(diffs)
    assert d.max() <= 1 and d.mean() < 0.5, (d.max(), d.mean())


@pytest.mark.parametrize("size", [(256, 256), (256, 400), (300, 256), (120, 90), (1000, 257)])
def test_crop_geometry_matches_crop_input_on_every_shape(size):
    """Up- and downscaling, no resize at all (shorter side already 256), portrait and landscape, on a
    textured image (a window one pixel off would differ by tens of levels): PIL's pixels to one level."""
    from PIL import ImageFilter
    w, h = size
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").filter(ImageFilter.GaussianBlur(1))
    ref = np.asarray(crop_input(img, PRE), dtype=np.int16)
    got = crop_tensor(torch.from_numpy(np.array(img)).permute(2, 0, 1), PRE).permute(1, 2, 0).numpy()
    assert got.shape == ref.shape
    assert np.abs(got.astype(np.int16) - ref).max() <= 1


def test_undecodable_files_come_back_as_none(jpegs):
    good = jpegs[0]
    out = decode_jpegs([good, good[: len(good) // 2], b"\xff\xd8\xff garbage", good], "cpu")
    assert out[0] is not None and out[3] is not None and out[1] is None and out[2] is None
    assert torch.equal(out[0], out[3])


def test_device_geometry_only_where_it_reproduces_crop_input():
    assert device_geometry(PRE)
    assert not device_geometry({**PRE, "interpolation": "bicubic"})   # torch's upsampling kernel differs
    assert not device_geometry({**PRE, "resize": [256, 256]})        # (h, w) sizes: torchvision's path
    assert not device_geometry({**PRE, "crop": 300})                  # padding
