"""storage.images, the one decoder: limits checked from the header before any pixel is decoded."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deepvis.storage import datasets, images
from deepvis.storage.images import BadImage, ImageLimits, ImageTooLarge, check_size, decode, open_image
from tests.bombs import png


@pytest.mark.parametrize("w,h,what", [
    (400000, 100, "each side"),              # issue #17: 39 KB that decodes to ~1.5 GB after resizing
    (39999999, 1, "each side"),              # issue #17: an OverflowError in PIL, not a clear refusal
    (10_000, 10_000, "pixels"),              # 100 Mpx > PIL's 89 Mpx
    (20_000, 100, "times the shorter"),      # within the pixel and side caps, but 200:1
])
def test_limits_refuse_from_the_header_before_decoding(w, h, what):
    # the pixel stream is garbage: a decoder that read it would say 'corrupt', not 'too large'
    with pytest.raises(ImageTooLarge, match=what) as e:
        decode(png(w, h, pixels=False))
    assert f"{w}x{h}" in str(e.value) and "\n" not in str(e.value)


def test_a_real_wide_bomb_is_refused():
    data = png(400000, 100)
    assert len(data) < 50_000
    with pytest.raises(ImageTooLarge, match="400000x100"):
        decode(data)


def test_check_size_bounds():
    lim = ImageLimits(max_pixels=100, max_side=20, max_aspect=4)
    check_size(10, 10, lim)
    check_size(20, 5, lim)
    for w, h in ((21, 1), (11, 10), (9, 2)):
        with pytest.raises(ImageTooLarge):
            check_size(w, h, lim)
    with pytest.raises(BadImage, match="empty"):
        check_size(0, 5, lim)


def test_garbage_and_good_images(tmp_path):
    with pytest.raises(BadImage, match="not an image"):
        decode(b"GIF89a but not really")
    with pytest.raises(BadImage, match="corrupt"):
        decode(png(30, 20, pixels=False))
    img = decode(png(30, 20))
    assert img.mode == "RGB" and img.size == (30, 20) and np.asarray(img).max() == 0
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert decode(buf.getvalue()).getpixel((1, 1)) == (255, 255, 255)     # alpha on white
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    assert open_image(tmp_path / "a.png").size == (4, 4)
    with pytest.raises(BadImage, match="not found"):
        open_image(tmp_path / "missing.png")


def test_datasets_uses_the_same_decoder(tmp_path):
    """The build's read_image refuses what the decoder refuses (issue #18: one decoding path)."""
    assert datasets.BadImage is images.BadImage
    (tmp_path / "wide.png").write_bytes(png(400000, 100, pixels=False))
    with pytest.raises(ImageTooLarge, match="400000x100"):
        datasets.read_image(str(tmp_path), "wide.png")
