"""The static viewer in a real headless Chromium (Playwright), served by `deepvis serve`'s server:
on the synthetic atlas (a 1,024-unit layer, missing/dead/failed units, hostile names) and on a real
small build. Screenshots go to artifacts/ (git-ignored)."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from deepvis.storage import layout
from tests.atlas_viewer.conftest import (ARTIFACTS, BIG, MID, MISSING_UNIT, OUT, REAL_LAYERS, XSS_FILE, XSS_LABEL,
                                         XSS_LAYER, Served, screenshot, serve)

IMAGE_EXT = (".png", ".jpg", ".jpeg")


def image_requests(pg) -> list[str]:
    """The image URLs the page fetched (resource timing entries; memory-cache hits make none)."""
    return pg.evaluate("""() => performance.getEntriesByType('resource').map(e => e.name)""")


def all_images_loaded(pg) -> list[dict]:
    """Wait until every <img> on the page has finished; return those that failed."""
    pg.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=15000)
    return pg.evaluate("""() => [...document.images].filter(i => !(i.naturalWidth > 0))
                                  .map(i => ({src: i.src, alt: i.alt}))""")


def no_injected_markup(pg):
    """Nothing from data became markup: no <img src=x>, no <b> in labels, no <script> but ours."""
    assert pg.evaluate("() => document.querySelectorAll('img[src=\"x\"], img[src$=\"/x\"]').length") == 0
    assert pg.evaluate("() => document.querySelectorAll('main b b, .label b, script:not([src])').length") == 0


# ---------------------------------------------------------------- synthetic atlas
def test_model_page_lists_every_layer(page, synthetic, synthetic_server):
    page.goto(synthetic_server.url("#/"))
    page.wait_for_selector("#layers tbody tr")
    names = page.eval_on_selector_all("#layers tbody tr td.name a", "els => els.map(e => e.textContent)")
    assert names == [l["name"] for l in synthetic["layers"]]
    assert XSS_LAYER in names                                  # rendered as text
    row = page.locator(f'#layers tr[data-layer="{MID}"]')
    assert row.locator("td").nth(3).text_content() == "8 / 32"
    assert "issue" in page.locator("#issues-link").text_content()
    no_injected_markup(page)
    screenshot(page, "viewer-model.png")


def test_big_layer_loads_fast_in_few_requests(browser, synthetic, synthetic_server):
    """1,024 units: first screen under 1 s, at most 10 image requests for the whole layer."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    try:
        pg.goto(synthetic_server.url(f"#/layer/{BIG}"))
        pg.wait_for_selector("#grid[data-visible-ms]", timeout=15000)
        first_screen_ms = int(pg.get_attribute("#grid", "data-visible-ms"))
        assert pg.locator("#grid .tile").count() == 1024
        screenshot(pg, "viewer-layer.png")
        # scroll through the whole grid: every tile drawn, every sheet fetched once
        for _ in range(60):
            if pg.get_attribute("#grid", "data-ready-ms"):
                break
            pg.mouse.wheel(0, 1600)
            pg.wait_for_timeout(50)
        pg.wait_for_selector("#grid[data-ready-ms]", timeout=15000)
        states = pg.eval_on_selector_all("#grid .tile", "els => els.map(e => e.dataset.state)")
        assert states == ["loaded"] * 1024
        images = [u for u in image_requests(pg) if u.split("?")[0].lower().endswith(IMAGE_EXT)]
        assert len(images) <= 10, images
        assert len(images) == 4                                # 1,024 units / 256 a sheet
    finally:
        ctx.close()

    # the whole layer at once (a viewport tall enough for all 1,024 tiles, cache cold)
    ctx = browser.new_context(viewport={"width": 1280, "height": 4000})
    pg = ctx.new_page()
    try:
        pg.goto(synthetic_server.url(f"#/layer/{BIG}"))
        pg.wait_for_selector("#grid[data-ready-ms]", timeout=15000)
        all_tiles_ms = int(pg.get_attribute("#grid", "data-ready-ms"))
        first_screen_2 = int(pg.get_attribute("#grid", "data-visible-ms"))
        n_images = len([u for u in image_requests(pg) if u.split("?")[0].lower().endswith(IMAGE_EXT)])
        nav = pg.evaluate("() => performance.getEntriesByType('navigation')[0].duration")
    finally:
        ctx.close()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "viewer-bench.json").write_text(json.dumps({
        "units": 1024, "first_screen_ms": first_screen_ms, "all_tiles_ms": all_tiles_ms,
        "image_requests": n_images, "navigation_ms": round(nav), "publish_s": round(synthetic["publish_s"], 2),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    # timing on a shared CPU: the better of the two cold loads must be under 1 s
    assert min(first_screen_ms, first_screen_2) < 1000, \
        f"first screen of a 1,024-unit layer took {first_screen_ms} / {first_screen_2} ms"
    assert n_images == 4


def test_missing_dead_failed_units_are_explicit(page, synthetic_server):
    page.goto(synthetic_server.url(f"#/layer/{MID}"))
    page.wait_for_selector("#grid[data-ready-ms]")
    tiles = page.eval_on_selector_all("#grid .tile", "els => els.map(e => [e.dataset.unit, e.dataset.state, "
                                      "e.textContent, e.classList.contains('dead')])")
    assert tiles[1] == ["1", "missing", "1missing", False]
    assert [t[1] for t in tiles[4:]] == ["failed"] * 4 and tiles[2][1:] == ["loaded", "2", True]
    # the unit page of the missing one: a placeholder, never a broken image
    page.click('#grid .tile[data-unit="1"]')
    page.wait_for_selector("#opt figure")
    assert page.url.endswith(f"#/layer/{MID}/unit/1")
    assert page.get_attribute('#opt figure[data-preset="yosinski-3"] .ph', "data-missing") == "missing"
    assert all_images_loaded(page) == []
    page.goto(synthetic_server.url(f"#/layer/{MID}/unit/0"))
    page.wait_for_selector("#bottom figure")
    assert page.get_attribute('#bottom figure[data-rank="2"] .ph', "data-missing") == "missing"
    assert all_images_loaded(page) == []
    page.goto(synthetic_server.url(f"#/layer/{MID}/unit/5"))
    page.wait_for_selector("#opt figure")
    assert page.eval_on_selector_all("#opt .ph", "els => els.map(e => e.dataset.missing)") == ["failed", "failed"]
    assert "optimization shard failed" in page.text_content(".unit-head")
    page.goto(synthetic_server.url("#/missing"))
    page.wait_for_selector(".problems")
    text = page.text_content("main")
    for chip in (f"{MID}:1", f"{MID}:2", f"{MID}:4", f"{MID}:7", f"{MID}:0"):
        assert chip in text
    assert "<script>alert(4)</script>" in page.text_content("#failed-shards")
    no_injected_markup(page)
    screenshot(page, "viewer-missing.png")


def test_hostile_names_render_as_text(page, synthetic_server):
    page.goto(synthetic_server.url(f"#/layer/{OUT}/unit/0"))
    page.wait_for_selector("#top figure")
    assert page.text_content("#class-name") == XSS_LABEL
    fig = page.locator('#top figure[data-rank="0"]')
    assert fig.get_attribute("data-image") == f"odd/{XSS_FILE}"
    assert fig.locator(".id").text_content() == f"odd/{XSS_FILE}"
    href = fig.locator("a.src").get_attribute("href")
    assert href == "../dataset/odd/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E.jpg"
    resp = page.request.get(page.url.split("#")[0].rsplit("/", 2)[0] + href[2:])
    assert resp.status == 200 and resp.headers["content-type"] == "image/jpeg"
    assert all_images_loaded(page) == []
    screenshot(page, "viewer-unit.png")
    no_injected_markup(page)
    # the layer whose very name is markup: model page link -> layer page -> unit page
    page.goto(synthetic_server.url("#/"))
    page.click(f'#layers tr[data-layer="{XSS_LAYER}"] td.name a')
    page.wait_for_selector("#grid[data-ready-ms]")
    assert page.text_content("h1") == XSS_LAYER
    assert page.eval_on_selector_all("#grid .tile", "els => els.map(e => e.dataset.state)") == ["loaded"] * 3
    page.click('#grid .tile[data-unit="2"]')
    page.wait_for_selector("#opt img")
    assert page.text_content("#unit-title") == f"{XSS_LAYER}:2"
    assert all_images_loaded(page) == []
    no_injected_markup(page)


def test_jump_box_and_arrow_keys(page, synthetic_server):
    page.goto(synthetic_server.url("#/"))
    page.wait_for_selector("#layers")
    page.keyboard.press("/")
    page.keyboard.type(f"{OUT}:3")
    page.keyboard.press("Enter")
    page.wait_for_selector("#unit-title")
    assert page.text_content("#unit-title") == f"{OUT}:3"
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => location.hash.endsWith('/unit/4')")
    page.wait_for_function(f"() => document.querySelector('#unit-title')?.textContent === '{OUT}:4'")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"() => document.querySelector('#unit-title')?.textContent === '{OUT}:2'")
    page.fill("#jump-input", "7")                               # a bare number: the current layer
    page.press("#jump-input", "Enter")
    page.wait_for_function(f"() => document.querySelector('#unit-title')?.textContent === '{OUT}:7'")
    page.fill("#jump-input", "nope:1")
    page.press("#jump-input", "Enter")
    assert "no layer" in page.text_content("#jump-msg")
    page.goto(synthetic_server.url(f"#/layer/{OUT}/unit/99"))  # deep link to a unit not in the atlas
    page.wait_for_selector(".error")
    assert "not in this atlas" in page.text_content(".error")


def test_phone_width(browser, synthetic_server):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    pg = ctx.new_page()
    try:
        for hash_, name in ((f"#/layer/{MID}/unit/0", "viewer-unit-phone.png"), (f"#/layer/{BIG}", "viewer-layer-phone.png")):
            pg.goto(synthetic_server.url(hash_))
            pg.wait_for_selector("#opt figure, #grid[data-visible-ms]")
            pg.wait_for_timeout(100)
            assert pg.evaluate("() => document.documentElement.scrollWidth") <= 390
            screenshot(pg, name)
    finally:
        ctx.close()


def test_optimization_only_and_dataset_only_atlases(page, tmp_path):
    """Atlases without index/topk.parquet / without presets still browse, nothing broken."""
    from deepvis.atlas_viewer.publish import publish
    from tests.atlas_viewer.conftest import make_synthetic_atlas
    opt_only = make_synthetic_atlas(tmp_path / "opt", big_units=20, topk=False)
    (tmp_path / "opt" / layout.UNITS).unlink()
    data_only = make_synthetic_atlas(tmp_path / "data", big_units=20, presets=[])
    for facts in (opt_only, data_only):
        publish(facts["store"])
    # a file deleted after the viewer data was written: still a placeholder, not a broken image
    opt_only["store"].delete(layout.unit_key(BIG, 3, "yosinski-1.png"))
    for facts, layer, unit in ((opt_only, BIG, 3), (data_only, MID, 3)):
        srv = serve(facts["store"])
        try:
            page.goto(srv.url("#/"))
            page.wait_for_selector("#layers tbody tr")
            page.goto(srv.url(f"#/layer/{layer}"))
            page.wait_for_selector("#grid[data-ready-ms]")
            states = page.eval_on_selector_all("#grid .tile", "els => els.map(e => e.dataset.state)")
            assert set(states) == {"loaded"}, states
            page.goto(srv.url(f"#/layer/{layer}/unit/{unit}"))
            page.wait_for_selector("#unit-title")
            page.wait_for_function(f"() => document.querySelector('#unit-title').textContent === '{layer}:{unit}'")
            assert all_images_loaded(page) == []
            text = page.text_content("main")
            if facts is opt_only:
                assert "no dataset pass" in text and page.locator("#opt img").count() == 1
                assert page.get_attribute('#opt figure[data-preset="yosinski-1"] .ph', "data-missing") == "missing"
            else:
                assert "No optimization presets" in text and page.locator("#top img").count() == 3
        finally:
            srv.stop()


def test_modern_presets_quality_and_diversity(page, tmp_path):
    """A maco preset with --diversity 3: the unit page shows its 2 extra images and each preset's
    quality line from index/units.parquet; the paper's preset gets no extra images."""
    import io

    from PIL import Image

    from deepvis.atlas_viewer.publish import publish
    from tests.atlas_viewer.conftest import make_synthetic_atlas
    facts = make_synthetic_atlas(tmp_path / "a", big_units=8, presets=["yosinski-3", "maco"])
    store = facts["store"]
    m = layout.read_manifest(store)
    m["presets"] = [{"name": "yosinski-3", "steps": 10}, {"name": "maco", "kind": "modern", "param": "maco"}]
    m["optimization"]["diversity"] = 3
    layout.put_json(store, layout.MANIFEST, m)
    rows = pq.read_table(tmp_path / "a" / layout.UNITS).to_pylist()
    for r in rows:
        for p in ("yosinski-3", "maco"):
            r.update({f"act_{p}": 2.0 + r["unit"], f"ratio_{p}": 0.5 + r["unit"] / 10, f"hf_{p}": 3.25,
                      f"robust_{p}": 0.875})
    store.put(layout.UNITS, layout.table_bytes(layout.units_table(rows, ["yosinski-3", "maco"])))
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (200, 30, 30, 128)).save(buf, format="PNG")
    for k in (1, 2):
        store.put(layout.unit_key(MID, 0, layout.preset_image("maco", k)), buf.getvalue())
    publish(store)
    srv = serve(store)
    try:
        page.goto(srv.url(f"#/layer/{MID}/unit/0"))
        page.wait_for_function(f"() => document.querySelector('#unit-title')?.textContent === '{MID}:0'")
        page.wait_for_selector('#opt figure[data-preset="maco"] .diverse-row img')
        assert all_images_loaded(page) == []
        srcs = page.eval_on_selector_all('#opt figure[data-preset="maco"] .diverse-row img', "els => els.map(e => e.src)")
        assert [s.rsplit("/", 1)[1].split("?")[0] for s in srcs] == ["maco.1.png", "maco.2.png"]
        assert page.locator('#opt figure[data-preset="yosinski-3"] .diverse-row').count() == 0
        q = page.text_content('#opt figure[data-preset="maco"] .quality')
        assert q == "ratio 0.500 · hf 3.25× · robust 0.875", q     # 3 significant digits
        screenshot(page, "viewer-modern-presets.png")
    finally:
        srv.stop()


def test_real_atlas_pages(page, real_atlas):
    srv, root = real_atlas["server"], real_atlas["root"]
    topk = pq.read_table(root / layout.TOPK).to_pylist()

    page.goto(srv.url("#/"))
    page.wait_for_selector("#layers tbody tr")
    assert page.eval_on_selector_all("#layers td.name a", "els => els.map(e => e.textContent)") == REAL_LAYERS
    screenshot(page, "viewer-real-model.png")

    page.click('#layers tr[data-layer="_blocks.1"] td.name a')
    page.wait_for_selector("#grid[data-ready-ms]")
    tiles = page.eval_on_selector_all("#grid .tile", "els => els.map(e => [e.dataset.unit, e.dataset.state])")
    assert [t[0] for t in tiles] == [str(u) for u in range(6)]
    assert dict(tiles)[str(MISSING_UNIT[1])] == "missing"
    assert {s for u, s in tiles if u != str(MISSING_UNIT[1])} == {"loaded"}
    screenshot(page, "viewer-real-layer.png")

    page.click('#grid .tile[data-unit="0"]')
    for u in range(6):
        if u:
            page.keyboard.press("ArrowRight")
        page.wait_for_function(f"() => document.querySelector('#unit-title')?.textContent === '_blocks.1:{u}'")
        page.wait_for_selector("#top figure")
        assert all_images_loaded(page) == [], u
        if u == 0:
            screenshot(page, "viewer-real-unit.png")
        for kind in ("top", "bottom"):
            shown = page.eval_on_selector_all(f"#{kind} figure", "els => els.map(e => [Number(e.dataset.rank), "
                                              "Number(e.dataset.activation), e.dataset.image, "
                                              "e.querySelector('.act').textContent])")
            want = sorted((r for r in topk if r["layer"] == "_blocks.1" and r["unit"] == u and r["kind"] == kind),
                          key=lambda r: r["rank"])
            assert [s[0] for s in shown] == [r["rank"] for r in want] == [0, 1, 2]
            for s, r in zip(shown, want):
                assert np.float32(s[1]) == np.float32(r["activation"]) and s[2] == r["image"]
                assert float(s[3]) == pytest.approx(r["activation"], rel=2e-3, abs=1e-3)
        missing = page.eval_on_selector_all("#opt .ph", "els => els.map(e => e.dataset.missing)")
        assert missing == (["missing"] if u == MISSING_UNIT[1] else [])
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.querySelector('#unit-title')?.textContent === '_blocks.1:4'")


def test_real_atlas_markup_file_name(page, real_atlas):
    srv, root = real_atlas["server"], real_atlas["root"]
    rows = [r for r in pq.read_table(root / layout.TOPK).to_pylist() if r["image"] == XSS_FILE]
    assert rows, "the copy named like markup is in no top/bottom-k (it duplicates a real image)"
    r = rows[0]
    page.goto(srv.url(f"#/layer/{r['layer']}/unit/{r['unit']}"))
    page.wait_for_selector(f"#{r['kind']} figure")
    fig = page.locator(f'#{r["kind"]} figure[data-rank="{r["rank"]}"]')
    assert fig.locator(".id").text_content() == XSS_FILE
    assert all_images_loaded(page) == []
    no_injected_markup(page)
    # the full source image through the server's read-only dataset route
    href = fig.locator("a.src").get_attribute("href")
    resp = page.request.get(srv.base + "/" + href[3:])
    assert resp.status == 200 and resp.body() == (Path(real_atlas["root"]).parent / "dataset" / XSS_FILE).read_bytes()
    if r["layer"] == "_fc":
        assert page.text_content("#class-name")                # output units show their class name


@pytest.mark.parametrize("schema", [1, 2, 3])
def test_unit_page_crops_of_every_layout(page, tmp_path, schema):
    """Schema 1 (per-unit crops units/<layer>/<u>/<kind>-<r>.jpg, no `crop` column: atlases built
    before schema 2), schema 2 (shared crops/<sha>.jpg named by the `crop` column) and schema 3 (one
    inputs/<sha>.jpg per dataset image named by the `input` column, each crop a box of it) all show
    every crop of a unit page; a row without its object as a placeholder, and so does a crop whose
    object went away after the publish (never a broken image)."""
    from deepvis.atlas_viewer.publish import publish
    from deepvis.storage.atlas import Atlas
    from tests.atlas_viewer.conftest import make_synthetic_atlas

    facts = make_synthetic_atlas(tmp_path / "atlas", big_units=16, schema=schema)
    publish(facts["store"])
    want = Atlas.open(facts["store"]).top_images(MID, 0, 3)
    facts["store"].delete(want[1]["crop"])              # gone since the publish
    srv = serve(facts["store"])
    try:
        page.goto(srv.url(f"#/layer/{MID}/unit/0"))
        page.wait_for_selector("#bottom figure")
        assert all_images_loaded(page) == []
        page.wait_for_selector('#top figure[data-rank="1"] .ph')
        assert page.get_attribute('#bottom figure[data-rank="2"] .ph', "data-missing") == "missing"
        assert page.get_attribute('#top figure[data-rank="1"] .ph', "data-missing") == "missing"
        srcs = page.eval_on_selector_all(".row.crops.top figure img", "els => els.map(e => e.getAttribute('src'))")
        assert [s.split("?")[0] for s in srcs] == [f"../{want[k]['crop']}" for k in (0, 2)]
        prefix = {1: f"units/{MID}/0/top-", 2: "crops/", 3: "inputs/"}[schema]
        assert all(r["crop"].startswith(prefix) for r in want)
        # a schema 3 crop is the input image in a clip; the others the crop object itself
        assert page.locator("#top .clip img").count() == (2 if schema == 3 else 0)
        # served with the dataset: the link goes to the source image either way
        assert page.eval_on_selector_all('#top a.src', "els => els.map(e => e.textContent)") == ["source image"] * 3
    finally:
        srv.stop()


def serve_without_dataset(store) -> Served:
    """`deepvis serve STORE` as users start it by default: no /dataset/ route."""
    import threading

    from deepvis.atlas_viewer.server import make_server
    server = make_server(store, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return Served(server, t, Path(store.uri))


# each clip of a unit page: its box, its size, the image's place in it (px, relative to the clip)
CLIPS = """els => els.map(f => {
  const c = f.querySelector('.clip'), i = c.querySelector('img');
  const cr = c.getBoundingClientRect(), ir = i.getBoundingClientRect();
  return {kind: f.dataset.kind, rank: Number(f.dataset.rank), box: c.dataset.box.split(',').map(Number),
          clip: [cr.width, cr.height], img: [ir.left - cr.left, ir.top - cr.top, ir.width, ir.height],
          src: i.getAttribute('src'), rendering: getComputedStyle(i).imageRendering};
})"""


def _shown_vs_cut(shot: bytes, inp, box, up: bool) -> float:
    """Mean absolute difference (0..255) between a screenshot of a clip and `box` cut from the input
    image with PIL and scaled to the screenshot's size (nearest when the viewer enlarges pixelated)."""
    from PIL import Image
    from PIL import ImageFilter
    got = Image.open(io.BytesIO(shot)).convert("RGB")
    want = inp.crop(box).resize(got.size, Image.NEAREST if up else Image.BILINEAR)
    # a light blur of both: the browser's and PIL's reducing filters differ at the checker's edges
    got, want = (im.filter(ImageFilter.GaussianBlur(1.5)) for im in (got, want))
    return float(np.abs(np.asarray(got, dtype=float) - np.asarray(want, dtype=float)).mean())


def test_schema3_crops_show_exactly_their_box(page, browser, tmp_path):
    """Schema 3: every crop of a unit page is its box of the input image, whatever the box (the whole
    image, enlarged small ones, wide, tall, a 10 x 5 sliver): the clip has the box's aspect at the
    crops' 120 px, the image is scaled and shifted exactly (layout px), and the pixels shown are the
    box's (a screenshot against PIL's cut, far closer than the box shifted by 6 px). Without a
    dataset route, the link goes to the whole input image."""
    from PIL import Image

    from deepvis.atlas_viewer.publish import publish
    from tests.atlas_viewer.conftest import SCHEMA3_BOXES, schema3_atlas

    facts = schema3_atlas(tmp_path / "atlas")
    store, root = facts["store"], facts["root"]
    publish(store)
    rows = {(r["unit"], r["kind"], r["rank"]): r for r in pq.read_table(root / layout.TOPK).to_pylist()
            if r["layer"] == MID}
    seen = set()
    srv = serve_without_dataset(store)
    try:
        for unit in (0, 2):                      # between them, every box of SCHEMA3_BOXES
            page.goto(srv.url(f"#/layer/{MID}/unit/{unit}"))
            page.wait_for_function(f"() => document.querySelector('#unit-title')?.textContent === '{MID}:{unit}'")
            page.wait_for_selector("#bottom figure")
            assert all_images_loaded(page) == []
            clips = page.eval_on_selector_all("#top figure, #bottom figure", f"els => ({CLIPS})(els.filter(f => f.querySelector('.clip')))")
            for c in clips:
                r = rows[(unit, c["kind"], c["rank"])]
                box = (r["x0"], r["y0"], r["x1"], r["y1"])
                seen.add(box)
                _check_clip(page, c, r, box, Image.open(root / r["input"]).convert("RGB"))
            if unit == 0:                        # the row whose input was never written
                assert page.get_attribute('#bottom figure[data-rank="2"] .ph', "data-missing") == "missing"
                assert len(clips) == 5
                screenshot(page, "viewer-unit-schema3.png")
        assert seen == set(SCHEMA3_BOXES)
        _phone_clips(browser, srv)
    finally:
        srv.stop()


def _phone_clips(browser, srv):
    """At a phone's width the crops are 96 px, clips included (box aspect kept), and nothing overflows."""
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    pg = ctx.new_page()
    try:
        pg.goto(srv.url(f"#/layer/{MID}/unit/0"))
        pg.wait_for_selector("#bottom figure .crop-frame")
        frames = pg.eval_on_selector_all(".crop-frame", """els => els.map(e => [e.getBoundingClientRect().width,
            e.getBoundingClientRect().height, ...e.querySelector('.clip').dataset.box.split(',').map(Number),
            e.querySelector('.clip').getBoundingClientRect().width])""")
        assert len(frames) == 5
        for w, h, x0, y0, x1, y1, clip_w in frames:
            assert (w, h) == (96, 96) and clip_w == pytest.approx(96 * min(1, (x1 - x0) / (y1 - y0)), abs=0.05)
        assert pg.evaluate("() => document.documentElement.scrollWidth") <= 390
        screenshot(pg, "viewer-unit-schema3-phone.png")
    finally:
        ctx.close()


def _check_clip(page, c, r, box, inp):
    """One clip of the unit page (CLIPS) against its topk row."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    s = min(120 / bw, 120 / bh)                 # fitted in the 120 px crop size, aspect kept
    assert c["box"] == list(box) and c["src"].split("?")[0] == f"../{r['input']}"
    assert c["clip"] == pytest.approx([bw * s, bh * s], abs=0.05), c
    # layout rounds the clip to 1/64 px, and the image is a percentage of it: 5e-4 relative
    assert c["img"] == pytest.approx([-x0 * s, -y0 * s, 224 * s, 224 * s], rel=5e-4, abs=0.05), c
    up = max(bw, bh) < 120
    assert c["rendering"] == ("pixelated" if up else "auto"), c
    fig = page.locator(f'#{c["kind"]} figure[data-rank="{c["rank"]}"]')
    shot = fig.locator(".clip").screenshot()
    right = _shown_vs_cut(shot, inp, box, up)
    # (a shifted box may leave the image: PIL pads it black, as wrong as any)
    shifted = min(_shown_vs_cut(shot, inp, (x0 + dx, y0 + dy, x1 + dx, y1 + dy), up)
                  for dx, dy in ((6, 0), (-6, 0), (0, 6), (0, -6)))
    assert right < 10 and shifted > 3 * right, (box, right, shifted)    # measured: 0.6..5.5 against 2.9..32
    link = fig.locator("a.src")
    assert link.text_content() == "input image"
    href = link.get_attribute("href")
    assert href.split("?")[0] == f"../{r['input']}"
    resp = page.request.get(page.url.split("#")[0].rsplit("/", 2)[0] + href[2:])
    assert resp.status == 200 and resp.headers["content-type"] == "image/jpeg"
