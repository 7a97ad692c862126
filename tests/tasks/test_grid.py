"""tasks.grid (tile layout, per-layer normalisation, upscaling) and `deepvis activations`."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from deepvis.tasks.grid import SEPARATOR, grid_shape, layer_activations, tile_grid


def _const_channels(c, h, w):
    """Channel i is the constant i."""
    return torch.arange(c, dtype=torch.float32).view(c, 1, 1).expand(c, h, w).clone()


def _expected(i, c):
    return int(np.rint(i / (c - 1) * 255))


@pytest.mark.parametrize("c,rows,cols", [(1, 1, 1), (2, 1, 2), (4, 2, 2), (10, 3, 4), (16, 4, 4), (17, 4, 5)])
def test_grid_shape_default_cols(c, rows, cols):
    assert grid_shape(c) == (rows, cols)
    assert cols == math.ceil(math.sqrt(c))


def test_tile_layout_values_and_separators():
    c, h, w, sep = 10, 3, 5, 2
    img = tile_grid(_const_channels(c, h, w), sep=sep)
    rows, cols = 3, 4
    assert img.dtype == np.uint8
    assert img.shape == (rows * h + (rows - 1) * sep, cols * w + (cols - 1) * sep)
    covered = np.zeros(img.shape, bool)
    for i in range(c):
        y, x = (i // cols) * (h + sep), (i % cols) * (w + sep)
        tile = img[y:y + h, x:x + w]
        assert (tile == _expected(i, c)).all(), i
        covered[y:y + h, x:x + w] = True
    # everything else (separators, the 2 empty cells of the last row) is the separator value
    assert (img[~covered] == SEPARATOR).all()
    # separator rows/columns explicitly
    assert (img[h:h + sep, :] == SEPARATOR).all()
    assert (img[:, w:w + sep] == SEPARATOR).all()
    # empty cells: last row, columns 2 and 3
    y = 2 * (h + sep)
    assert (img[y:y + h, 2 * (w + sep):] == SEPARATOR).all()
    assert img.min() == 0 and img.max() == 255


def test_normalisation_is_per_layer_not_per_tile():
    # two channels with very different ranges: per-tile normalisation would stretch both to 0..255
    acts = torch.zeros(2, 2, 2)
    acts[0] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    acts[1] = torch.tensor([[0.0, 10.0], [5.0, 10.0]])
    img = tile_grid(acts, sep=1)
    assert img.shape == (2, 5)
    t0, t1 = img[:, 0:2], img[:, 3:5]
    assert t0.tolist() == [[0, 26], [0, 26]]          # 1/10 * 255 = 25.5 -> 26
    assert t1.tolist() == [[0, 255], [128, 255]]      # 5/10 * 255 = 127.5 -> 128
    assert (img[:, 2] == SEPARATOR).all()


def test_constant_layer_is_black_and_fixed_norm():
    img = tile_grid(torch.full((4, 2, 2), 3.0), sep=0)
    assert img.shape == (4, 4) and (img == 0).all()
    img = tile_grid(torch.tensor([-1.0, 0.0, 1.0, 2.0]), sep=0, norm=(0.0, 1.0))
    assert img.tolist() == [[0, 0], [255, 255]]        # clipped to the given range


def test_linear_layer_is_one_by_one_tiles():
    acts = torch.arange(10, dtype=torch.float32)
    img = tile_grid(acts, sep=1)
    assert img.shape == (3 * 1 + 2, 4 * 1 + 3)
    for i in range(10):
        assert img[(i // 4) * 2, (i % 4) * 2] == _expected(i, 10)
    assert (img[1, :] == SEPARATOR).all() and (img[:, 1] == SEPARATOR).all()
    # numpy input and explicit cols
    img2 = tile_grid(acts.numpy(), cols=5, sep=0)
    assert img2.shape == (2, 5)
    assert img2[1, 0] == _expected(5, 10)


def test_upscaling_is_nearest_neighbour():
    acts = torch.rand(5, 2, 3)
    small = tile_grid(acts, sep=1)
    big = tile_grid(acts, sep=1, scale=3)
    rows, cols = 2, 3
    assert big.shape == (rows * 2 * 3 + (rows - 1), cols * 3 * 3 + (cols - 1))
    for i in range(5):
        ys, xs = (i // cols) * 3, (i % cols) * 4
        yb, xb = (i // cols) * 7, (i % cols) * 10
        tile = small[ys:ys + 2, xs:xs + 3]
        assert (big[yb:yb + 6, xb:xb + 9] == tile.repeat(3, 0).repeat(3, 1)).all()


def test_bad_shapes():
    with pytest.raises(ValueError):
        tile_grid(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError):
        tile_grid(torch.zeros(2, 2, 2), scale=0)


def test_layer_activations_match_forward_hook(lite0, sample_dir):
    from deepvis.tasks.preprocess import preprocess

    img = Image.open(next(iter(sorted(sample_dir.rglob("*.JPEG"))))).convert("RGB")
    x = preprocess(img, lite0.preprocessing)
    captured = {}
    layer = "_blocks.3"
    h = lite0.module.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.setdefault("o", o.clone()))
    try:
        with torch.no_grad():
            lite0.module(x.unsqueeze(0))
    finally:
        h.remove()
    acts = layer_activations(lite0.module, layer, x)
    assert acts.shape == (40, 28, 28)
    assert not acts.requires_grad
    torch.testing.assert_close(acts, captured["o"][0])
    fc = layer_activations(lite0, "_fc", x.unsqueeze(0))
    assert fc.shape == (1000,)


# ---- the CLI ---------------------------------------------------------------------------------

def _images(sample_dir, n=2):
    return sorted(sample_dir.rglob("*.JPEG"))[:n]


@pytest.fixture
def cli():
    import deepvis.cli as cli_mod
    assert "activations" in cli_mod.COMMANDS  # listed in `deepvis --help`
    return cli_mod.main


def _size(c, h, w, scale=1, sep=1):
    rows, cols = grid_shape(c)
    return cols * w * scale + (cols - 1) * sep, rows * h * scale + (rows - 1) * sep  # PIL (W, H)


def test_cli_image_file_and_folder(cli, sample_dir, tmp_path, capsys):
    a, b = _images(sample_dir)
    out = tmp_path / "out"
    assert cli(["activations", "--model", "efficientnet_lite0", str(a), "--layer", "_blocks.3",
                "-o", str(out), "--scale", "2"]) == 0
    png = out / f"{a.stem}.png"
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.mode == "L"
        assert im.size == _size(40, 28, 28, scale=2) == (7 * 56 + 6, 6 * 56 + 5)
        written = np.asarray(im)
    # the PNG is exactly the grid of the layer's output for the preprocessed image
    from deepvis.tasks.models import load_model
    from deepvis.tasks.preprocess import preprocess
    lm = load_model("efficientnet_lite0")
    with Image.open(a) as src:
        acts = layer_activations(lm.module, "_blocks.3", preprocess(src.convert("RGB"), lm.preprocessing))
    assert (written == tile_grid(acts, scale=2)).all()

    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in (a, b):
        shutil.copy(f, folder / f.name)
    (folder / "notes.txt").write_text("not an image")   # skipped in a folder
    out2 = tmp_path / "out2"
    assert cli(["activations", "--model", "efficientnet_lite0", str(folder), "--layer", "_conv_stem",
                "-o", str(out2)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out2.iterdir()) == sorted(f"{f.stem}.png" for f in (a, b))
    for f in (a, b):
        assert str(out2 / f"{f.stem}.png") in printed
        with Image.open(out2 / f"{f.stem}.png") as im:
            assert im.size == _size(32, 112, 112) == (6 * 112 + 5, 6 * 112 + 5)
    # linear layer via run() with our own argparse
    import argparse

    from deepvis.cli.activations import add_parser, run
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["activations", "--model", "efficientnet_lite0", str(a), "--layer", "_fc",
                              "-o", str(tmp_path / "fc")])
    assert run(args) == 0
    with Image.open(tmp_path / "fc" / f"{a.stem}.png") as im:
        assert im.size == (32 + 31, 32 + 31)


def _one_line_error(cli, argv, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("deepvis activations: error: ")
    return err


def test_cli_errors(cli, sample_dir, tmp_path, capsys):
    (a,) = _images(sample_dir, 1)
    err = _one_line_error(cli, ["activations", "--model", "efficientnet_lite0", str(a), "--layer", "nope",
                                "-o", str(tmp_path / "o")], capsys)
    assert "unknown layer 'nope'" in err
    bad = tmp_path / "bad.jpg"
    bad.write_text("definitely not a jpeg")
    err = _one_line_error(cli, ["activations", "--model", "efficientnet_lite0", str(bad), "--layer",
                                "_conv_stem", "-o", str(tmp_path / "o")], capsys)
    assert "cannot read" in err and "bad.jpg" in err
    err = _one_line_error(cli, ["activations", "--model", "efficientnet_lite0", str(tmp_path / "missing.png"),
                                "--layer", "_conv_stem"], capsys)
    assert "not found" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _one_line_error(cli, ["activations", "--model", "efficientnet_lite0", str(empty),
                                "--layer", "_conv_stem"], capsys)
    assert "no image" in err
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)   # named like a video, holds nothing decodable
    err = _one_line_error(cli, ["activations", "--model", "efficientnet_lite0", str(video),
                                "--layer", "_conv_stem", "-o", str(tmp_path / "o")], capsys)
    assert "cannot decode video" in err and "clip.mp4" in err


def _write_video(path, frames, codec="png", pix_fmt="rgb24", fps=5, bit_rate=None):
    import av
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if bit_rate:
            s.bit_rate = bit_rate
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def test_cli_video_frames(cli, sample_dir, tmp_path, capsys, lite0):
    """A lossless video (PNG in .mov) of three real photos: one PNG per frame, each exactly the grid of
    its photo; a lossy MPEG-4 .mp4 decodes to as many frames with grids close to the photos'."""
    from deepvis.tasks.preprocess import crop_input, preprocess
    photos = []
    for f in _images(sample_dir, 3):
        with Image.open(f) as im:
            photos.append(np.asarray(crop_input(im, lite0.preprocessing)))
    clip = tmp_path / "clip.mov"
    _write_video(clip, photos)
    out = tmp_path / "frames"
    assert cli(["activations", "--model", "efficientnet_lite0", str(clip), "--layer", "_blocks.3",
                "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"clip-{i:05d}.png" for i in range(3)]
    assert capsys.readouterr().out.count("from ") == 3
    grids = []
    for i, photo in enumerate(photos):
        want = tile_grid(layer_activations(lite0.module, "_blocks.3",
                                           preprocess(Image.fromarray(photo), lite0.preprocessing)))
        grids.append(want)
        with Image.open(out / f"clip-{i:05d}.png") as im:
            assert (np.asarray(im) == want).all(), i
    lossy = tmp_path / "lossy.mp4"
    _write_video(lossy, photos, codec="mpeg4", pix_fmt="yuv420p", bit_rate=8_000_000)
    out2 = tmp_path / "lossy"
    assert cli(["activations", "--model", "efficientnet_lite0", str(lossy), "--layer", "_blocks.3",
                "-o", str(out2)]) == 0
    got = [np.asarray(Image.open(out2 / f"lossy-{i:05d}.png"), dtype=np.float64) for i in range(3)]
    assert len(list(out2.iterdir())) == 3
    for i, g in enumerate(got):   # each decoded frame is closest to its own photo
        corr = [np.corrcoef(g.ravel(), w.ravel())[0, 1] for w in grids]
        assert int(np.argmax(corr)) == i and corr[i] > 0.9, corr
