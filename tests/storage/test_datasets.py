"""Dataset listing and decoding: ids, list files, and the bad files a real dataset holds."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from deepvis.storage.datasets import BadImage, check_list_entries, dataset_root, list_images, read_image
from deepvis.storage.errors import StoreError

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "datasets", "imagenet-sample")


def _real_jpeg_bytes() -> bytes:
    """A real photo as JPEG: one from the sample dataset when present, else a synthetic one."""
    if os.path.isdir(SAMPLE):
        d = sorted(os.listdir(SAMPLE))[0]
        f = sorted(os.listdir(os.path.join(SAMPLE, d)))[0]
        with open(os.path.join(SAMPLE, d, f), "rb") as fh:
            return fh.read()
    import io
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path):
    """A folder with good images in every mode and the usual bad files."""
    good = tmp_path / "good"
    bad = tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    data = _real_jpeg_bytes()
    (good / "photo.jpg").write_bytes(data)
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image\n")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 60), dtype=np.uint8), "L").save(good / "gray.png")
    Image.new("CMYK", (50, 30), (0, 255, 255, 0)).save(good / "cmyk.JPG")          # red in CMYK
    rgba = Image.new("RGBA", (20, 10), (0, 0, 255, 0))                             # fully transparent
    rgba.paste((255, 0, 0, 255), (0, 0, 10, 10))                                  # left half opaque red
    rgba.save(good / "alpha.png")
    pal = Image.new("P", (16, 16))
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    pal.save(good / "palette.gif")
    pal_t = Image.new("P", (16, 16), 1)
    pal_t.putpalette([0, 255, 0, 0, 0, 0] + [0, 0, 0] * 254)
    pal_t.save(good / "palette_transparent.png", transparency=1)
    Image.fromarray((np.arange(64 * 32).reshape(32, 64) * 30).astype(np.uint16)).save(good / "deep16.tif")
    Image.new("1", (3000, 3000), 1).save(bad / "bomb.png")                        # 9 Mpx in ~1 kB
    (tmp_path / "notes.txt").write_text("not listed")
    (tmp_path / ".hidden.jpg").write_bytes(data)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.jpg").write_bytes(data)
    (good / "it's a photo.JPEG").write_bytes(data)
    return tmp_path


def decode_all(source, max_pixels=5_000_000):
    root = dataset_root(source)
    ok, skipped = {}, {}
    for i in list_images(source):
        try:
            ok[i] = read_image(root, i, max_pixels=max_pixels)
        except BadImage as e:
            skipped[i] = str(e)
    return ok, skipped


def test_messy_folder_is_listed_then_bad_files_are_skipped_and_named(messy):
    ids = list_images(str(messy))
    assert ids == sorted(ids)
    assert ids == ["bad/bomb.png", "bad/empty.jpg", "bad/text.jpg", "bad/truncated.jpg",
                   "good/alpha.png", "good/cmyk.JPG", "good/deep16.tif", "good/gray.png",
                   "good/it's a photo.JPEG", "good/palette.gif", "good/palette_transparent.png",
                   "good/photo.jpg"]
    ok, skipped = decode_all(str(messy), max_pixels=5_000_000)
    assert set(skipped) == {"bad/bomb.png", "bad/empty.jpg", "bad/text.jpg", "bad/truncated.jpg"}
    assert "empty" in skipped["bad/empty.jpg"]
    assert "not an image" in skipped["bad/text.jpg"]
    assert "truncated" in skipped["bad/truncated.jpg"]
    assert "too large" in skipped["bad/bomb.png"] and "9000000" in skipped["bad/bomb.png"]
    for s in skipped.values():
        assert "\n" not in s and len(s) < 200
    for i, img in ok.items():
        assert img.mode == "RGB", i
        img.getpixel((0, 0))                                       # fully loaded, file closed
    assert ok["good/gray.png"].size == (60, 40)
    r, g, b = ok["good/cmyk.JPG"].getpixel((25, 15))
    assert r > 200 and g < 60 and b < 60                          # CMYK red -> RGB red
    assert ok["good/alpha.png"].getpixel((2, 2)) == (255, 0, 0)   # opaque part
    assert ok["good/alpha.png"].getpixel((15, 5)) == (255, 255, 255)   # transparent -> white
    assert ok["good/palette.gif"].getpixel((3, 3)) == (0, 255, 0)
    assert ok["good/palette_transparent.png"].getpixel((3, 3)) == (255, 255, 255)
    deep = np.asarray(ok["good/deep16.tif"])
    assert deep.max() > 128 and (deep[..., 0] == deep[..., 1]).all()   # 16-bit scaled, not clipped
    # the bomb decodes with the default limit
    assert read_image(dataset_root(str(messy)), "bad/bomb.png").size == (3000, 3000)


def test_read_image_missing_file_and_directory(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    with pytest.raises(BadImage, match="not found"):
        read_image(str(tmp_path), "nope.jpg")
    with pytest.raises(BadImage):
        read_image(str(tmp_path), "d.jpg")


def test_list_file_relative_absolute_comments_and_duplicates(messy, tmp_path):
    lst = messy / "lists" / "val.txt"
    lst.parent.mkdir()
    outside = tmp_path.parent / (tmp_path.name + "_outside.png")
    Image.new("RGB", (4, 4)).save(outside)
    try:
        lst.write_text("# the validation images\n\n../good/photo.jpg\n"
                       f"{messy / 'good' / 'gray.png'}\n  ../bad/empty.jpg  \n../good/photo.jpg\n"
                       f"{outside}\nmissing.jpg\n")
        assert dataset_root(str(lst)) == str(lst.parent)
        ids = list_images(str(lst))
        gray = str(messy / "good" / "gray.png")
        assert ids == sorted([str(outside), gray, "../bad/empty.jpg", "../good/photo.jpg", "missing.jpg"])
        ok, skipped = decode_all(str(lst), max_pixels=10**8)
        assert set(ok) == {str(outside), gray, "../good/photo.jpg"}
        assert set(skipped) == {"../bad/empty.jpg", "missing.jpg"}
    finally:
        outside.unlink()


def test_single_image_source(messy):
    src = str(messy / "good" / "gray.png")
    assert list_images(src) == ["gray.png"]
    assert read_image(dataset_root(src), "gray.png").mode == "RGB"


@pytest.mark.parametrize("make", ["missing", "empty_dir", "empty_list", "no_images", "wrong_base", "s3",
                                  "scheme"])
def test_unusable_sources_raise_one_line_store_errors(tmp_path, make):
    if make == "missing":
        src = str(tmp_path / "nope")
    elif make == "empty_dir":
        src = str(tmp_path)
    elif make == "empty_list":
        (tmp_path / "l.txt").write_text("# nothing\n\n")
        src = str(tmp_path / "l.txt")
    elif make == "no_images":
        (tmp_path / "a.txt").write_text("x")
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "b.csv").write_text("x")
        src = str(tmp_path)
    elif make == "wrong_base":   # paths written relative to the shell's directory, not the list's
        (tmp_path / "img").mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / "a.png")
        (tmp_path / "lists").mkdir()
        (tmp_path / "lists" / "l.txt").write_text("img/a.png\nimg/b.png\n")
        src = str(tmp_path / "lists" / "l.txt")
    elif make == "s3":
        src = "s3://bucket/prefix"
    else:
        src = "ftp://host/x"
    with pytest.raises(StoreError) as e:
        check_list_entries(src, list_images(src))
    assert "\n" not in str(e.value) and str(e.value)
    if make == "wrong_base":
        assert "relative to the list file's directory" in str(e.value) and "lists/img/a.png" in str(e.value)


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_symlink_cycles_are_walked_once(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    ids = list_images(str(tmp_path))
    assert ids[0] == "a/x.png" and len(ids) == len(set(ids)) and len(ids) <= 2


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="../shared/datasets/imagenet-sample is not there")
def test_imagenet_sample_listing():
    ids = list_images(SAMPLE)
    assert len(ids) == 800 and ids == sorted(ids)
    assert all(i.count("/") == 1 and i.endswith(".JPEG") for i in ids)
    assert "n03590841/n03590841_jack-o'-lantern.JPEG" in ids
    root = dataset_root(SAMPLE)
    img = read_image(root, "n03590841/n03590841_jack-o'-lantern.JPEG")
    assert img.mode == "RGB"


def test_list_file_ids_equal_relpath_for_every_kind_of_entry(tmp_path, monkeypatch):
    """The list reader slices the list's directory off absolute entries under it; every id equals
    the os.path.relpath rule (the independent reference) for entries under it, outside it, with
    '..', '.', doubled slashes, the directory itself, and a list given by a relative path."""
    import os
    from deepvis.storage import datasets
    d = tmp_path / "lists"
    d.mkdir()
    root = str(d)
    entries = [f"{root}/a/b.jpg", f"{root}//a/./c.jpg", f"{root}/a/../d.jpg", f"{root}/../out.jpg",
               f"{tmp_path}/listsx/e.jpg", f"{root}x.jpg", "/elsewhere/f.jpg", f"//{root[1:]}/g.jpg",
               f"{root}/h i'j.jpg", "rel/k.jpg", "../up.jpg", root]

    def reference(entry):
        if not os.path.isabs(entry):
            return os.path.normpath(entry)
        rel = os.path.relpath(os.path.normpath(entry), root)
        return os.path.normpath(entry) if rel == ".." or rel.startswith("../") else rel
    (d / "list.txt").write_text("\n".join(entries) + "\n")
    want = sorted(set(reference(e) for e in entries))
    assert datasets.list_images(str(d / "list.txt")) == want
    monkeypatch.chdir(tmp_path)
    assert datasets.list_images("lists/list.txt") == want
