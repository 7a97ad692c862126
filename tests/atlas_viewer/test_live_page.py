"""`deepvis live` in a real headless Chromium whose webcam is a fake device playing a .y4m made from
two real ImageNet photos: the grid updates across frames, the top-5 names each photo's class, and a
clicked tile shows that unit's entry of a real atlas. Screenshots go to artifacts/."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.atlas_viewer.conftest import REAL_LAYERS, ROOT, launch_chromium, require_playwright, screenshot

LAYER = REAL_LAYERS[0]      # _blocks.1: 24 x 56 x 56


def confident_photos(sample_dir, lm, n=2, scan=60):
    """n sample photos of different classes that the offline model gets right with p > 0.7."""
    from deepvis.tasks.models import imagenet_wnids
    from deepvis.tasks.preprocess import crop_input, preprocess
    wnids = imagenet_wnids()
    picked = []
    for d in sorted(p for p in sample_dir.iterdir() if p.is_dir())[:scan]:
        f = sorted(d.glob("*.JPEG"))[0]
        with Image.open(f) as im:
            im = im.convert("RGB")
            with torch.no_grad():
                p = lm.module(preprocess(im, lm.preprocessing)[None])[0].softmax(0)
            idx = int(p.argmax())
            if wnids[idx] == d.name and float(p[idx]) > 0.7:
                frame = crop_input(im, {**lm.preprocessing, "crop": 256})     # 256 x 256
                picked.append((np.asarray(frame), lm.labels[idx]))
        if len(picked) == n:
            return picked
    pytest.fail(f"fewer than {n} confidently classified photos among the first {scan} classes")


def write_y4m(path, frames, fps=10):
    """YUV4MPEG2 4:2:0 (JPEG full range), what Chromium's fake capture device plays in a loop."""
    h, w = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            ycc = Image.fromarray(rgb).convert("YCbCr")
            y, cb, cr = ycc.split()
            f.write(b"FRAME\n" + y.tobytes() + cb.resize((w // 2, h // 2), Image.BOX).tobytes()
                    + cr.resize((w // 2, h // 2), Image.BOX).tobytes())


@pytest.fixture
def live_server(real_atlas):
    """`deepvis live` as users start it, on a free port, joined to the real atlas."""
    proc = subprocess.Popen([sys.executable, "-m", "deepvis.cli", "live", "--model", "efficientnet_lite0",
                             "--atlas", str(real_atlas["root"]), "--layer", LAYER, "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, lines = None, []
    deadline = time.time() + 120
    while url is None and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        pytest.fail("deepvis live did not start: " + "".join(lines))
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def camera_page(tmp_path, sample_dir, lite0):
    pw_mod = require_playwright()
    photos = confident_photos(sample_dir, lite0)
    y4m = tmp_path / "camera.y4m"
    write_y4m(y4m, [photos[0][0]] * 10 + [photos[1][0]] * 10)     # 1 s of each photo, looped
    with pw_mod.sync_playwright() as pw:
        b = launch_chromium(pw, ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                                 f"--use-file-for-fake-video-capture={y4m}"])
        ctx = b.new_context(viewport={"width": 1280, "height": 800})
        pg = ctx.new_page()
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        yield pg, [label for _, label in photos]
        ctx.close()
        b.close()
    assert pg.errors == [], pg.errors


def _labels(pg):
    return pg.eval_on_selector_all("#top5 .label", "els => els.map(e => e.textContent)")


def test_live_webcam_grid_top5_and_atlas(live_server, camera_page):
    pg, labels = camera_page
    pg.goto(live_server)
    pg.wait_for_function(f"() => document.querySelector('#layer').value === {LAYER!r}")
    pg.click("#src-camera")
    pg.wait_for_function("() => Number(document.querySelector('#grid').dataset.frames) >= 3", timeout=60000)

    grids, seen = set(), set()
    deadline = time.time() + 60
    while time.time() < deadline and not (len(grids) >= 2 and all(l in seen for l in labels)):
        grids.add(pg.get_attribute("#grid", "src"))
        seen.update(_labels(pg)[:5])
        if labels[0] in _labels(pg)[:1]:
            screenshot(pg, "live-webcam.png")
        pg.wait_for_timeout(100)
    assert len(grids) >= 2, "the grid never changed across frames"
    for label in labels:
        assert label in seen, f"{label!r} never in the top-5 (saw {sorted(seen)})"
    fps = float(pg.text_content("#fps").split()[0])
    assert fps > 0
    natural = pg.evaluate("() => [document.querySelector('#grid').naturalWidth, document.querySelector('#grid').naturalHeight]")
    assert natural == [5 * 56 + 4, 5 * 56 + 4]    # 24 tiles of 56 x 56, 5 columns, 1-px separators

    # click the tile of unit 4: row 0, column 4
    z = pg.evaluate("() => document.querySelector('#grid').clientWidth / document.querySelector('#grid').naturalWidth")
    pg.click("#grid", position={"x": (4 * 57 + 28) * z, "y": 28 * z})
    pg.wait_for_function(f"() => document.querySelector('#unit-title').textContent === '{LAYER}:4'")
    pg.wait_for_selector('#atlas[data-state="loaded"]', timeout=30000)
    pg.wait_for_function("() => [...document.querySelectorAll('#atlas img, #unit-map, #gradient')]"
                         ".every(i => i.complete && i.naturalWidth > 0)", timeout=30000)
    assert pg.eval_on_selector_all("#atlas-opt figure", "els => els.map(e => e.dataset.preset)") == ["yosinski-3"]
    assert pg.eval_on_selector_all("#atlas-top figure", "els => els.map(e => e.dataset.rank)") == ["0", "1", "2"]
    assert pg.eval_on_selector_all("#atlas-bottom figure", "els => els.length") == 3
    assert pg.evaluate("() => document.querySelector('#gradient').naturalWidth") == 224
    assert pg.evaluate("() => document.querySelector('#unit-map').naturalWidth") == 56
    _check_atlas_clips(pg, 4)
    box = pg.evaluate("() => { const s = document.querySelector('#sel'); return s.hidden ? null : s.offsetLeft; }")
    assert box is not None and abs(box - 4 * 57 * z) <= 2
    screenshot(pg, "live-unit.png")

    # a unit whose optimized image is missing in the atlas: still its crops, no broken image
    pg.keyboard.press("ArrowLeft")
    pg.wait_for_function(f"() => document.querySelector('#unit-title').textContent === '{LAYER}:3'")
    pg.wait_for_selector('#atlas[data-state="loaded"]', timeout=30000)
    assert pg.eval_on_selector_all("#atlas-opt figure", "els => els.length") == 0
    assert pg.eval_on_selector_all("#atlas-top figure", "els => els.length") == 3

    # a unit the atlas does not hold (the build took units 0..5)
    pg.click("#grid", position={"x": 1 * 57 * z + 28 * z, "y": (2 * 57 + 28) * z})     # unit 11
    pg.wait_for_selector('#atlas[data-state="absent"]', timeout=30000)
    assert "not in the atlas" in pg.text_content("#atlas")


def _check_atlas_clips(pg, unit):
    """The unit's atlas crops as /api/unit gives them: a row with crop_box (a schema 3 atlas, what
    the build writes) is its input image in a clip of the box's aspect at the crops' 64 px, scaled
    and shifted so that exactly the box shows; a row without is the crop object itself."""
    e = pg.evaluate(f"() => fetch('/api/unit?layer={LAYER}&unit={unit}').then(r => r.json())")
    shown = pg.eval_on_selector_all("#atlas-top figure, #atlas-bottom figure", """els => els.map(f => {
      const c = f.querySelector('.clip'), i = f.querySelector('img');
      if (!c) return {src: i.getAttribute('src')};
      const cr = c.getBoundingClientRect(), ir = i.getBoundingClientRect();
      return {src: i.getAttribute('src'), clip: [cr.width, cr.height],
              img: [ir.left - cr.left, ir.top - cr.top, ir.width, ir.height]}; })""")
    rows = e["top"] + e["bottom"]
    assert len(shown) == len(rows) and all(t["url"] for t in rows)
    for t, c in zip(rows, shown):
        assert c["src"] == t["url"]
        if t["crop_box"] is None:
            assert "clip" not in c
            continue
        x0, y0, x1, y1 = t["crop_box"]
        s = min(64 / (x1 - x0), 64 / (y1 - y0))
        assert c["clip"] == pytest.approx([(x1 - x0) * s, (y1 - y0) * s], abs=0.05), (t, c)
        S = e["input_size"]
        # layout rounds the clip to 1/64 px, and the image is a percentage of it: 5e-4 relative
        assert c["img"] == pytest.approx([-x0 * s, -y0 * s, S * s, S * s], rel=5e-4, abs=0.05), (t, c)


def test_live_images_and_bad_upload(live_server, camera_page):
    pg, labels = camera_page
    pg.goto(live_server)
    pg.wait_for_function("() => document.querySelector('#layer').options.length > 10")
    pg.select_option("#layer", "_fc")
    from skimage import data
    import io
    buf = io.BytesIO()
    Image.fromarray(data.coffee()).save(buf, format="JPEG")
    pg.set_input_files("#src-images", files=[
        {"name": "coffee <b>.jpg", "mimeType": "image/jpeg", "buffer": buf.getvalue()},
        {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"this is not an image"}])
    pg.wait_for_function("() => document.querySelector('#top5 .label')?.textContent === 'espresso'", timeout=30000)
    assert pg.evaluate("() => document.querySelector('#grid').naturalWidth") == 32 + 31   # 1000 units, 1x1
    pg.click("#thumbs img:nth-child(2)")
    pg.wait_for_function("() => /not an image/.test(document.querySelector('#status').textContent)", timeout=30000)
    assert pg.get_attribute("#status", "class") == "error"
    # nothing of the previous image's result stays on screen to pass for this one's
    assert pg.eval_on_selector_all("#top5 li", "els => els.length") == 0 and pg.get_attribute("#grid", "src") is None
    assert pg.evaluate("() => document.querySelectorAll('b').length") == 0        # names are text
    screenshot(pg, "live-bad-upload.png")
    # the server still serves: back to the photo
    frames = int(pg.get_attribute("#grid", "data-frames"))
    pg.click("#thumbs img:nth-child(1)")
    pg.wait_for_function(f"() => Number(document.querySelector('#grid').dataset.frames) > {frames}", timeout=30000)
    assert _labels(pg)[0] == "espresso" and pg.get_attribute("#status", "class") != "error"
