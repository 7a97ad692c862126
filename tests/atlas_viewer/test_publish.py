"""atlas_viewer.publish: the viewer's static files and compact data, written into an atlas."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deepvis.atlas_viewer import publish as pub
from deepvis.storage import layout
from deepvis.storage.atlas import CropRef
from deepvis.storage.store import LocalStore

from tests.atlas_viewer.conftest import (BIG, MID, OUT, ROOT, XSS_FILE, XSS_LABEL, XSS_LAYER, make_synthetic_atlas,
                                         schema3_atlas)


def strict_json(path):
    """JSON as a browser parses it: no NaN/Infinity."""
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=bad)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    facts = make_synthetic_atlas(tmp_path_factory.mktemp("pub") / "atlas", big_units=300)
    facts["model_json"] = pub.publish(facts["store"])
    return facts


def layer_json(facts, name):
    return strict_json(facts["root"] / pub.layer_data_key(name))


def test_static_files_copied(small):
    root = small["root"]
    for name in ("index.html", "app.js", "style.css"):
        assert (root / "viewer" / name).read_bytes() == (pub.STATIC / name).read_bytes()
    html = (root / "viewer/index.html").read_text()
    # everything local: no absolute URLs to other hosts in the viewer
    for f in ("index.html", "app.js", "style.css"):
        text = (root / "viewer" / f).read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, f
    assert 'type="module"' in html and "Content-Security-Policy" in html
    assert "innerHTML" not in (root / "viewer/app.js").read_text().replace("never uses innerHTML", "") \
        .replace("(no innerHTML)", "")


def test_model_json(small):
    m = strict_json(small["root"] / "viewer/data/model.json")
    assert [l["name"] for l in m["layers"]] == [l["name"] for l in small["layers"]]
    assert m["has_topk"] and m["has_units"] and m["status"] == "failed"
    by = {l["name"]: l for l in m["layers"]}
    assert by[BIG]["selected"] == 300 and by[BIG]["images"] == {"yosinski-3": 300, "yosinski-1": 300}
    mid = by[MID]
    assert mid["selected"] == 8 and mid["units"] == 32
    assert mid["problems"]["failed"] == [4, 5, 6, 7]
    assert mid["problems"]["dead"] == [2]
    assert mid["problems"]["missing"] == {"yosinski-3": [1], "yosinski-1": []}
    assert mid["problems"]["crops_missing"] == [0]
    assert mid["dead"] == 1 and mid["failed"] == 4
    assert m["failed_shards"][0]["id"] == f"opt/{MID}/4-7"
    assert by[XSS_LAYER]["file"] == f"layers/{XSS_LAYER}.json"


def test_layer_json_matches_indexes(small):
    store = small["store"]
    topk = pq.read_table(small["root"] / layout.TOPK).to_pylist()
    units = {(r["layer"], r["unit"]): r for r in pq.read_table(small["root"] / layout.UNITS).to_pylist()}
    for l in small["layers"]:
        d = layer_json(small, l["name"])
        assert d["units"] == l["selected"] and d["presets"] == small["presets"]
        for i, u in enumerate(d["units"]):
            r = units[(l["name"], u)]
            for p in small["presets"]:
                want = r[f"opt_{p}"]
                got = d["opt"][p][i]
                assert (got is None and (want is None or math.isnan(want))) or np.float32(got) == np.float32(want)
                assert d["dead"][p][i] == r[f"dead_{p}"]
            assert np.float32(d["stats"]["mean"][i]) == np.float32(r["mean"])
        rows = [r for r in topk if r["layer"] == l["name"]]
        for r in rows:
            i = d["units"].index(r["unit"])
            row = d[r["kind"]][i][r["rank"]]
            assert np.float32(row[0]) == np.float32(r["activation"])     # exact float32 round trip
            assert d["images"][row[1]] == r["image"]
            assert row[2:8] == [r["y"], r["x"], r["x0"], r["y0"], r["x1"], r["y1"]]
            assert row[9] == r["rank"]
            key = layout.unit_key(l["name"], r["unit"], f"{r['kind']}-{r['rank']}.jpg")   # schema 1
            assert row[8] == int(store.exists(key)) and row[10:] == [key, 0] and len(row) == 12
    fc = layer_json(small, OUT)
    assert fc["labels"][0] == XSS_LABEL and fc["labels"][1] == "class_1"
    assert layer_json(small, MID)["labels"] is None
    assert fc["images"][fc["top"][0][0][1]] == f"odd/{XSS_FILE}"
    assert fc["history"]["yosinski-3"][0][-1] == pytest.approx(fc["opt"]["yosinski-3"][0], rel=1e-6)


def test_sprites_hold_every_unit_image(small):
    store, root = small["store"], small["root"]
    d = layer_json(small, BIG)
    tile, cols, per = d["tile"], d["cols"], d["per_sheet"]
    assert d["sheets"]["yosinski-3"] == ["yosinski-3-0.png", "yosinski-3-1.png"]   # 300 units: 256 + 44
    last = Image.open(root / pub.sprite_key(BIG, "yosinski-3", 1))
    assert last.size == (cols * tile, math.ceil(44 / cols) * tile)
    for i in (0, 17, 255, 256, 299):
        sheet = Image.open(root / pub.sprite_key(BIG, "yosinski-3", i // per)).convert("RGB")
        j = i % per
        got = np.asarray(sheet.crop(((j % cols) * tile, (j // cols) * tile, (j % cols + 1) * tile, (j // cols + 1) * tile)))
        src = Image.open(root / layout.unit_key(BIG, i, "yosinski-3.png")).convert("RGB")
        want = np.asarray(src.resize((tile, tile), Image.NEAREST))     # 32 px -> 64 px, pixel-doubled
        assert np.array_equal(got, want), i
    mid = layer_json(small, MID)
    assert mid["image"]["yosinski-3"] == [1, 0, 1, 1, 0, 0, 0, 0]
    assert mid["failed_opt"] == [4, 5, 6, 7]
    assert not store.exists(pub.sprite_key(MID, "yosinski-3", 1))


def test_optimization_only_and_dataset_only(tmp_path):
    opt_only = make_synthetic_atlas(tmp_path / "opt", big_units=5, topk=False)
    (tmp_path / "opt" / layout.UNITS).unlink()
    m = pub.publish(opt_only["store"])
    assert not m["has_topk"] and not m["has_units"] and m["dataset"] is None
    d = strict_json(tmp_path / "opt" / pub.layer_data_key(BIG))
    assert d["top"] is None and d["stats"] is None and d["images"] is None
    assert d["views"] == opt_only["presets"]
    assert d["image"]["yosinski-3"] == [1] * 5 and d["opt"]["yosinski-3"] == [None] * 5

    data_only = make_synthetic_atlas(tmp_path / "data", big_units=5, presets=[])
    m = pub.publish(data_only["store"])
    assert m["has_topk"] and m["presets"] == []
    d = strict_json(tmp_path / "data" / pub.layer_data_key(MID))
    assert len(d["top"]) == 8 and len(d["top"][0]) == 3
    # no presets: the grid shows each unit's strongest dataset crop
    assert d["views"] == [pub.TOP_VIEW] and d["sheets"] == {pub.TOP_VIEW: ["top-0-0.jpg"]}
    assert d["image"][pub.TOP_VIEW] == [1] * 8
    assert strict_json(tmp_path / "data" / pub.layer_data_key(BIG))["views"] == []   # no top-k rows there


def test_republish_removes_stale_sheets_and_damaged_png_is_missing(tmp_path):
    facts = make_synthetic_atlas(tmp_path / "a", big_units=300, topk=False)
    store = facts["store"]
    pub.publish(store)
    assert store.exists(pub.sprite_key(BIG, "yosinski-3", 1))
    m = layout.read_manifest(store)
    m["layers"][0]["selected"] = list(range(10))
    layout.put_json(store, layout.MANIFEST, m)
    store.put(layout.unit_key(BIG, 3, "yosinski-3.png"), b"not a png")
    pub.publish(store)
    assert not store.exists(pub.sprite_key(BIG, "yosinski-3", 1))
    d = strict_json(tmp_path / "a" / pub.layer_data_key(BIG))
    assert d["image"]["yosinski-3"][3] == 0 and sum(d["image"]["yosinski-3"]) == 9


def test_publish_does_not_import_torch(tmp_path):
    facts = make_synthetic_atlas(tmp_path / "a", big_units=3, topk=False)
    code = ("import sys; from deepvis.atlas_viewer.publish import publish; from deepvis.storage.store import LocalStore; "
            f"publish(LocalStore({str(facts['root'])!r})); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert isinstance(facts["store"], LocalStore)


def test_sprites_fetch_and_decode_a_shared_crop_once(tmp_path):
    """Deep layers' top crops are mostly the same whole images: a sheet of 300 units showing 3
    distinct crops reads 3 objects, and a second layer sharing them reads none; the pixels are the
    crops' own."""
    class Counting(LocalStore):
        gets: list = []

        def get_or_none(self, key):
            self.gets.append(key)
            return super().get_or_none(key)

    store = Counting(str(tmp_path))
    colors = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    keys = []
    for i, c in enumerate(colors):
        buf = __import__("io").BytesIO()
        Image.new("RGB", (224, 224), c).save(buf, format="PNG")
        keys.append(f"crops/{i}.png")
        store.put(keys[-1], buf.getvalue())
    view = [CropRef(keys[u % 3]) for u in range(300)]
    cache = pub._TileCache()
    for layer in ("a", "b"):
        names, ok = pub._write_sprites(store, layer, "top-0", view, [1] * 300, 8, 256, cache)
        assert ok == [1] * 300 and len(names) == 2
    assert sorted(Counting.gets) == sorted(keys)
    sheet = Image.open(tmp_path / pub.sprite_key("b", "top-0", 1)).convert("RGB")
    for j in range(300 - 256):                    # the second sheet: units 256.. in 16 columns
        px = sheet.getpixel(((j % 16) * 8 + 4, (j // 16) * 8 + 4))      # a JPEG sheet: near, not equal
        assert max(abs(a - b) for a, b in zip(px, colors[(256 + j) % 3])) <= 12, (j, px)


class Counting(LocalStore):
    """A LocalStore that records the key of every object read through get_or_none."""

    def __init__(self, root):
        super().__init__(root)
        self.gets = []

    def get_or_none(self, key):
        self.gets.append(key)
        return super().get_or_none(key)


@pytest.fixture(scope="module")
def schema3(tmp_path_factory):
    """A schema 3 atlas (conftest.schema3_atlas: boxes of every kind cut from structured input
    images), published through a store that counts its reads."""
    facts = schema3_atlas(tmp_path_factory.mktemp("pub3") / "atlas")
    store = Counting(str(facts["root"]))
    facts["model_json"] = pub.publish(store)
    facts["gets"] = store.gets
    return facts


def test_schema3_rows_name_the_input_and_the_box(schema3):
    """Layer rows of a schema 3 atlas: key = the row's input image (inputs/<sha>.jpg of its dataset
    image), cut = 1, present = that object exists; input_size = the model's input, which the boxes
    are in. The row whose input was never written is present 0 and counted as a missing crop."""
    store, root = schema3["store"], schema3["root"]
    topk = pq.read_table(root / layout.TOPK).to_pylist()
    for l in schema3["layers"]:
        d = layer_json(schema3, l["name"])
        assert d["input_size"] == 224
        for r in (r for r in topk if r["layer"] == l["name"]):
            row = d[r["kind"]][d["units"].index(r["unit"])][r["rank"]]
            assert row[4:8] == [r["x0"], r["y0"], r["x1"], r["y1"]] and row[9] == r["rank"]
            missing = (r["layer"], r["unit"], r["kind"], r["rank"]) == schema3["missing_crop"]
            assert row[10] == r["input"] == layout.input_key(r["image"] + ("#missing" if missing else ""))
            assert row[11] == 1 and row[8] == int(not missing) == int(store.exists(row[10]))
    mid = {l["name"]: l for l in schema3["model_json"]["layers"]}[MID]
    assert mid["problems"]["crops_missing"] == [0] and mid["crops"] == mid["crops_expected"] - 1


def _expected_top_sheet(root, d, n: int, per: int | None = None) -> np.ndarray:
    """Sheet n of a layer's top-0 view (per tiles a sheet; default the layer data's) as it must be:
    each unit's rank-0 box cut from its input image with PIL and made a tile (enlarged pixel by
    pixel when smaller, else averaged down), encoded as publish encodes a top-0 sheet; decoded."""
    per = per or d["per_sheet"]
    tile, cols = d["tile"], math.ceil(math.sqrt(per))
    units = d["units"][n * per:(n + 1) * per]
    sheet = Image.new("RGB", (min(len(units), cols) * tile, math.ceil(len(units) / cols) * tile))
    for j in range(len(units)):
        row = d["top"][n * per + j][0]
        crop = Image.open(root / row[10]).convert("RGB").crop(tuple(row[4:8]))
        up = crop.width < tile and crop.height < tile
        sheet.paste(crop.resize((tile, tile), Image.NEAREST if up else Image.BOX), ((j % cols) * tile, (j // cols) * tile))
    return np.asarray(Image.open(__import__("io").BytesIO(pub._encode_sheet(sheet, pub.TOP_VIEW))).convert("RGB"))


def test_schema3_top_tiles_are_the_boxes_cut_from_the_inputs(schema3):
    """The top-0 grid view of a schema 3 atlas: each unit's tile is its rank-0 box cut out of the
    input image (not the whole image, not another box), pixel for pixel."""
    root = schema3["root"]
    boxes = set()
    for name in (MID, OUT, XSS_LAYER):
        d = layer_json(schema3, name)
        assert d["views"][-1] == pub.TOP_VIEW and d["image"][pub.TOP_VIEW] == [1] * len(d["units"])
        got = np.asarray(Image.open(root / pub.sprite_key(name, pub.TOP_VIEW, 0)).convert("RGB"))
        assert np.array_equal(got, _expected_top_sheet(root, d, 0)), name
        boxes.update(tuple(d["top"][i][0][4:8]) for i in range(len(d["units"])))
    assert len(boxes) >= 5                            # whole, enlarged, reduced, wide and tall boxes


def test_schema3_each_input_is_fetched_once_per_publish(schema3):
    """A publish reads each input image that a top-0 tile is cut from once, however many units and
    layers cut boxes from it, and no input that no tile needs (the layer rows only list them)."""
    from collections import Counter
    topk = pq.read_table(schema3["root"] / layout.TOPK).to_pylist()
    first = [r for r in topk if r["kind"] == "top" and r["rank"] == 0]
    reads = Counter(k for k in schema3["gets"] if k.startswith(f"{layout.INPUTS}/"))
    assert reads == Counter({r["input"]: 1 for r in first})
    # the reuse is real: more (input, box) tiles and more units than inputs
    assert len({(r["input"], r["x0"], r["y0"], r["x1"], r["y1"]) for r in first}) > len(reads) > 1


def test_schema3_tiles_with_an_input_cache_too_small_for_one_image(tmp_path):
    """The decoded-input cache is bounded: at 1 byte it keeps nothing (nor does a tile cache of 0),
    and the tiles stay right; each input is still fetched once for all its boxes in the layer, over
    3 sheets."""
    facts = schema3_atlas(tmp_path / "atlas", big_units=4)
    store = Counting(str(facts["root"]))
    pub.publish(store)
    d = layer_json(facts, OUT)
    refs = [CropRef(d["top"][i][0][10], tuple(d["top"][i][0][4:8])) for i in range(len(d["units"]))]
    cache = pub._TileCache(size=0, input_bytes=1)
    store.gets.clear()
    names, ok = pub._write_sprites(store, OUT, pub.TOP_VIEW, refs, [1] * len(refs), d["tile"], 4, cache)
    assert ok == [1] * len(refs) and len(cache.inputs.images) <= 1 and len(names) == 3
    assert sorted(store.gets) == sorted({r.key for r in refs})
    assert len({r.key for r in refs[:4]} & {r.key for r in refs[4:]}) >= 1   # inputs shared across sheets
    for n in range(3):
        got = np.asarray(Image.open(facts["root"] / pub.sprite_key(OUT, pub.TOP_VIEW, n)).convert("RGB"))
        assert np.array_equal(got, _expected_top_sheet(facts["root"], d, n, per=4)), n


def test_layer_files_upload_concurrently_and_model_json_comes_last(tmp_path):
    """Every layer's JSON is written by the store's writer (upload threads, not one blocking PUT after
    another), and model.json, which names them, only after all of them are in the store."""
    import threading

    facts = make_synthetic_atlas(tmp_path / "atlas", big_units=20)
    order: list[tuple[str, str]] = []

    class Recording(LocalStore):
        def put(self, key, data):
            order.append((key, threading.current_thread().name))
            super().put(key, data)
    store = Recording(facts["root"])
    m = pub.publish(store)
    keys = [k for k, _ in order]
    layer_keys = [pub.layer_data_key(l["name"]) for l in m["layers"]]
    assert set(layer_keys) <= set(keys)
    assert keys.index(f"{pub.DATA}/model.json") > max(keys.index(k) for k in layer_keys)
    assert all(t.startswith("store-put") for k, t in order if k in layer_keys)
