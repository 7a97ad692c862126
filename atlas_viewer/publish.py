"""Write the static viewer into an atlas: `publish(store)`.

The build driver calls this last. It copies the viewer's static files (atlas_viewer/static/) to
`viewer/` and writes the compact data the viewer reads to `viewer/data/`:

    viewer/data/model.json                        the model, its layers with completeness counts,
                                                  presets, dataset, failed shards (one request)
    viewer/data/layers/<layer>.json               per layer, columnar: units, stats, optimized
                                                  activations, dead/missing/failed flags, class
                                                  names (output layer), top/bottom-k rows
    viewer/data/sprites/<layer>/<view>-<n>.png    the units' optimized images as tiles of TILE px,
                                                  PER_SHEET tiles a sheet, in the order of the
                                                  layer's `units` list (tile i: sheet i // PER_SHEET);
                                                  a view is a preset, or `top-0`: every unit's
                                                  strongest dataset crop (dataset-only atlases too;
                                                  schema 3: its box cut from the input image)

so a layer page of 1,024 units is 1 JSON + 4 sheets per preset. Every part of the atlas is optional
but the manifest: without index/topk.parquet (optimization-only atlas) the rows are null, without
index/units.parquet the stats are null, without presets there are no sprites. A unit whose image is
absent (a failed shard, a dead unit, a deleted file) has a blank tile and `image[preset][i] == 0`;
the viewer shows it as missing, never as a broken image.

No torch here (runs in the build driver): pyarrow, numpy and PIL only. Writes go through
`store.put` (whole objects, the store sets content types), so it works on any store.
"""
from __future__ import annotations

import functools
import io
import json
import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from deepvis.storage import layout
from deepvis.storage.atlas import CropRef, crop_ref
from deepvis.storage.store import Store

STATIC = Path(__file__).resolve().parent / "static"
VIEWER = "viewer"
DATA = f"{VIEWER}/data"
DATA_VERSION = 1
TILE = 64                 # sprite tile edge, pixels
PER_SHEET = 256           # tiles per sprite sheet (16 x 16 -> 1024 x 1024 px)
HISTORY_POINTS = 48       # optimization curves are downsampled to at most this many points
HISTORY_BUDGET = 64 << 20  # bytes of completion records read for the curves, at most
HEX = "0123456789abcdef"   # first characters of the sha256-named keys (inputs/, crops/): 16 listings


def layer_data_key(layer: str) -> str:
    return f"{DATA}/layers/{layer}.json"


def sprite_key(layer: str, preset: str, n: int) -> str:
    """A sheet of a grid view: PNG for the presets' images, JPEG for the top-0 view, whose tiles are
    JPEG crops already (a 1024 px sheet: 2 ms to encode against 120 ms as PNG, a fifth of the bytes)."""
    return f"{DATA}/sprites/{layer}/{preset}-{n}.{'jpg' if preset == TOP_VIEW else 'png'}"


def _encode_sheet(sheet: Image.Image, view: str) -> bytes:
    buf = io.BytesIO()
    if view == TOP_VIEW:
        sheet.save(buf, format="JPEG", quality=90)
    else:   # level 1: half the time of 6 for 2% more bytes on these sheets
        sheet.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------- small helpers
def _num(v):
    """A float32 value as the shortest decimal that reads back to it; None for NaN/inf/None."""
    if v is None:
        return None
    f = float(v)
    if not math.isfinite(f):
        return None
    return float(str(np.float32(f)))


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def _read_optional(store: Store, key: str):
    """A Parquet index as a pyarrow table, or None when the atlas has none."""
    if not store.exists(key):
        return None
    return layout.read_table(store, key)


def _failed_units(manifest: dict) -> dict[tuple[str, str], set[int]]:
    """(kind, layer) -> unit ids in failed shards ('opt/<layer>/<lo>-<hi>', 'crop/...')."""
    sel = {l["name"]: (l.get("selected") or list(range(l["units"]))) for l in manifest.get("layers", [])}
    out: dict[tuple[str, str], set[int]] = {}
    for f in manifest.get("failed_shards") or []:
        fid = str(f.get("id", ""))
        kind, _, rest = fid.partition("/")
        layer, _, span = rest.rpartition("/")
        if kind not in ("opt", "crop") or layer not in sel:
            continue
        try:
            lo, hi = (int(x) for x in span.split("-"))
        except ValueError:
            continue
        out.setdefault((kind, layer), set()).update(u for u in sel[layer] if lo <= u <= hi)
    return out


def _opt_histories(store: Store) -> dict[tuple[str, int, str], list]:
    """(layer, unit, preset) -> the optimization curve (activation per step), downsampled, from the
    build's completion records. Empty when the records are gone (an atlas copied without _build/)."""
    out: dict = {}
    keys = store.list(layout.RECORDS + "/opt/")
    if not keys:
        return out
    # a whole-model build has many large records (every step of every unit): estimate the total
    # from the first one and skip the curves when reading them all would cost too much
    first = store.get_or_none(keys[0]) or b""
    if len(first) * len(keys) > HISTORY_BUDGET:
        return out
    for _, rec in layout.get_json_many(store, keys):
        s = (rec or {}).get("summary") or {}
        layer = s.get("layer")
        for r in s.get("rows") or []:
            h = r.get("history")
            if layer is None or not h:
                continue
            if len(h) > HISTORY_POINTS:
                idx = np.unique(np.linspace(0, len(h) - 1, HISTORY_POINTS).round().astype(int))
                h = [h[i] for i in idx]
            out[(layer, int(r["unit"]), str(r["preset"]))] = [_num(v) for v in h]
    return out


# ---------------------------------------------------------------- sprites
_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="publish")
    return _POOL


TOP_VIEW = "top-0"        # a grid view of every unit's strongest dataset crop (besides the presets)


def _view_refs(layer: str, view: str, units: list[int], topk_rows: list[dict] | None,
               schema: int) -> list[CropRef | None]:
    """Where each unit's tile of a grid view comes from: units/<layer>/<u>/<preset>.png, or the rank-0
    top crop (storage.atlas.crop_ref: an object that is the crop, or schema 3's box of an input image)."""
    if view != TOP_VIEW:
        return [CropRef(layout.unit_key(layer, u, f"{view}.png")) for u in units]
    first = {r["unit"]: crop_ref(r, schema) for r in topk_rows or [] if r["kind"] == "top" and r["rank"] == 0}
    return [first.get(u) for u in units]


def _fit(im: Image.Image, tile: int) -> Image.Image:
    """An image as a tile x tile RGB tile (aspect not kept: a tile is square, like the grid)."""
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (tile, tile):
        # smaller images are enlarged pixel by pixel (crisp); larger ones averaged down
        up = im.width < tile and im.height < tile
        im = im.resize((tile, tile), Image.NEAREST if up else Image.BOX)
    return im


def _tile(data: bytes, tile: int) -> Image.Image | None:
    try:
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (tile, tile))   # a JPEG decodes at 1/2..1/8 scale when that still covers the tile
        im.load()
    except Exception:  # a damaged image is shown as missing, it does not stop the publish
        return None
    return _fit(im, tile)


def _cut_tile(im: Image.Image | None, box: tuple[int, int, int, int], tile: int) -> Image.Image | None:
    """Schema 3: the tile of a box cut from a decoded input image (None: no image, or an empty box)."""
    x0, y0, x1, y1 = box
    if im is None or x1 <= x0 or y1 <= y0:
        return None
    return _fit(im.crop(box), tile)


def _decode_input(data: bytes | None) -> Image.Image | None:
    from deepvis.storage.images import BadImage, decode
    if data is None:
        return None
    try:
        return decode(data)     # the project's decoder: header limits checked before the pixels
    except BadImage:            # a damaged input is shown as missing, it does not stop the publish
        return None


INPUT_BATCH = 64          # input images decoded at a time for their boxes (~10 MB at 224 px)


class _InputCache:
    """Schema 3's decoded input images by key, the least recently used dropped beyond `max_bytes`
    (an S x S RGB image is 150 KB at 224 px: the default holds ~400). A unit's top crop is a box of
    one; the boxes of a deep layer's units mostly come from the same few images."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes, self.bytes, self.images = max_bytes, 0, OrderedDict()

    def get_many(self, store: Store, keys: list[str]) -> dict:
        out = {k: self.images[k] for k in dict.fromkeys(keys) if k in self.images}
        for k in out:
            self.images.move_to_end(k)
        missing = [k for k in dict.fromkeys(keys) if k not in out]
        # fetches overlap (an S3 store is latency-bound), decoding releases the GIL
        for k, im in zip(missing, _pool().map(lambda k: _decode_input(store.get_or_none(k)), missing)):
            out[k] = self.images[k] = im                 # None too: a missing one is not asked for again
            self.bytes += _nbytes(im)
        while self.bytes > self.max_bytes and len(self.images) > 1:
            self.bytes -= _nbytes(self.images.popitem(last=False)[1])
        return out


def _nbytes(im: Image.Image | None) -> int:
    return 0 if im is None else im.width * im.height * len(im.getbands())


class _TileCache:
    """Decoded tiles by CropRef (object key, and the box cut from it for schema 3), the least
    recently used dropped beyond `size` (12 KiB each at 64 px). In a full-network atlas most units of
    the deep layers show the same few whole-image crops: each is fetched and decoded once per
    publish, not once per unit; schema 3's input images once for all their boxes (`inputs`)."""

    def __init__(self, size: int = 4096, input_bytes: int = 64 << 20):
        self.size, self.tiles = size, OrderedDict()
        self.inputs = _InputCache(input_bytes)

    def get_many(self, store: Store, refs: list[CropRef], tile: int) -> dict:
        out = {r: self.tiles[r] for r in dict.fromkeys(refs) if r in self.tiles}
        for r in out:
            self.tiles.move_to_end(r)
        missing = [r for r in dict.fromkeys(refs) if r not in out]
        for r, im in zip(missing, self._load(store, missing, tile)):
            out[r] = self.tiles[r] = im
        while len(self.tiles) > self.size:
            self.tiles.popitem(last=False)
        return out

    def _load(self, store: Store, refs: list[CropRef], tile: int) -> list:
        """The tiles of refs, in order: whole objects fetched and decoded on the pool; the boxes of
        input images grouped by image, each image fetched and decoded once for all its boxes."""
        def load(key: str):
            data = store.get_or_none(key)
            return _tile(data, tile) if data is not None else None
        whole = [r for r in refs if r.box is None]
        tiles = dict(zip(whole, _pool().map(lambda r: load(r.key), whole)))
        boxes: dict[str, list[CropRef]] = {}
        for r in refs:
            if r.box is not None:
                boxes.setdefault(r.key, []).append(r)
        keys = list(boxes)
        for i in range(0, len(keys), INPUT_BATCH):     # at most INPUT_BATCH decoded images held here
            inputs = self.inputs.get_many(store, keys[i:i + INPUT_BATCH])
            # a box cut from a decoded image and resized is ~0.1 ms: on this thread, where the
            # pool's hand-off would cost more than it saves
            tiles.update((r, _cut_tile(inputs[k], r.box, tile)) for k in keys[i:i + INPUT_BATCH] for r in boxes[k])
        return [tiles[r] for r in refs]


def _write_sprites(store: Store, layer: str, view: str, refs: list[CropRef | None], present: list[int],
                   tile: int, per_sheet: int, cache: _TileCache | None = None) -> tuple[list[str | None], list[int]]:
    """Sheets of the units' images of a view (refs: _view_refs; present[i] 0: unit i has none);
    returns (sheet file names or None, present flags after decoding: a damaged image counts as
    missing)."""
    cols = int(math.ceil(math.sqrt(per_sheet)))
    cache = cache or _TileCache()
    names: list[str | None] = []
    writes = []
    ok = list(present)
    # schema 3: the layer's boxes all at once (12 KiB a tile), so that get_many decodes each input
    # image once for all of them, not once for every sheet that shows one of its boxes
    cut = cache.get_many(store, [r for r, f in zip(refs, ok) if f and r.box is not None], tile)
    for n, start in enumerate(range(0, len(refs), per_sheet)):
        chunk = refs[start:start + per_sheet]
        rows = int(math.ceil(len(chunk) / cols))
        sheet = Image.new("RGB", (min(len(chunk), cols) * tile, rows * tile), (0, 0, 0))
        any_tile = False
        todo = [(j, ref) for j, ref in enumerate(chunk) if ok[start + j]]
        tiles = cache.get_many(store, [ref for _, ref in todo if ref not in cut], tile)
        for j, ref in todo:
            im = cut[ref] if ref in cut else tiles[ref]
            if im is None:
                ok[start + j] = 0
                continue
            sheet.paste(im, ((j % cols) * tile, (j // cols) * tile))
            any_tile = True
        if not any_tile:
            names.append(None)
            continue
        key = sprite_key(layer, view, n)
        # encoding releases the GIL: sheets are encoded and written on the pool, side by side
        writes.append(_pool().submit(lambda k=key, im=sheet: store.put(k, _encode_sheet(im, view))))
        names.append(key.rsplit("/", 1)[1])
    for w in writes:
        w.result()
    return names, ok


# ---------------------------------------------------------------- per layer
def _topk_rows(table, units: list[int], present: set[str], images: dict[str, int], schema: int):
    """{"top": [rows per unit], "bottom": ...}; row = [activation, image index, y, x, x0, y0, x1, y1,
    present 0/1 (the object holding the crop exists), rank, key (that object, relative to the atlas
    root; null: none was written), cut 0/1 (1: the crop is the box x0..y1 cut out of the object, an
    input image of the layer data's input_size px: schema 3; 0: the object is the crop)]; rank order."""
    out = {"top": [[] for _ in units], "bottom": [[] for _ in units]}
    if table is None:
        return None
    pos = {u: i for i, u in enumerate(units)}
    for r in table:
        i = pos.get(r["unit"])
        if i is None or r["kind"] not in out:
            continue
        img = r["image"]
        if img not in images:
            images[img] = len(images)
        ref = crop_ref(r, schema)
        out[r["kind"]][i].append((r["rank"], [_num(r["activation"]), images[img], r["y"], r["x"],
                                              r["x0"], r["y0"], r["x1"], r["y1"], int(ref.key in present),
                                              r["rank"], ref.key, int(ref.box is not None)]))
    for kind in out:
        out[kind] = [[row for _, row in sorted(rows, key=lambda t: t[0])] for rows in out[kind]]
    return out


class _AnyOf:
    """`key in _AnyOf(a, b)`: in a or in b."""

    def __init__(self, a: set, b: set):
        self.sets = (a, b)

    def __contains__(self, key) -> bool:
        a, b = self.sets
        return key in a or key in b


def _layer_data(store: Store, manifest: dict, l: dict, presets: list[str], units_rows: dict | None,
                topk_rows: list[dict] | None, failed: dict, histories: dict, tile: int, per_sheet: int,
                version: str, shared_present: set[str], cache: _TileCache | None = None) -> tuple[dict, dict]:
    name = l["name"]
    units = [int(u) for u in (l.get("selected") or range(l["units"]))]
    # a view of both sets, not their union: copying the shared objects' set per layer cost more than the layer
    present = _AnyOf(set(store.list(f"units/{name}/")), shared_present)
    schema = int(manifest.get("schema_version") or 1)
    model = manifest.get("model") or {}
    labels = model.get("labels")
    is_output = bool(labels) and model.get("output_layer") == name
    urows = units_rows.get(name, {}) if units_rows is not None else None

    data: dict = {
        "version": version, "name": name, "kind": l.get("kind"), "shape": l.get("shape"),
        "units_total": l.get("units"), "units": units, "presets": presets,
        "tile": tile, "per_sheet": per_sheet, "cols": int(math.ceil(math.sqrt(per_sheet))),
        "input_size": _input_size(model),
        "views": [], "sheets": {}, "image": {}, "opt": {}, "dead": {}, "history": {}, "quality": {},
        "failed_opt": sorted(failed.get(("opt", name), ())),
        "failed_crop": sorted(failed.get(("crop", name), ())),
        "labels": [labels[u] if 0 <= u < len(labels) else None for u in units] if is_output else None,
        "stats": None, "images": None, "top": None, "bottom": None,
    }
    # grid views: one per preset, and the top dataset crop when there was a dataset pass
    data["views"] = presets + ([TOP_VIEW] if topk_rows else [])
    for v in data["views"]:
        refs = _view_refs(name, v, units, topk_rows, schema)
        flags = [int(r is not None and r.key in present) for r in refs]
        # only the top-0 view's tiles repeat (shared crops); a preset's images are one per unit and
        # would push them out of the cache
        data["sheets"][v], data["image"][v] = _write_sprites(store, name, v, refs, flags, tile, per_sheet,
                                                             cache if v == TOP_VIEW else None)
    for p in presets:
        if urows is not None:
            data["opt"][p] = [_num((urows.get(u) or {}).get(f"opt_{p}")) for u in units]
            data["dead"][p] = [(urows.get(u) or {}).get(f"dead_{p}") for u in units]
            # tasks.quality's measures of the image (absent in atlases built before them: no key)
            q = {k: [_num((urows.get(u) or {}).get(f"{k}_{p}")) for u in units] for k in layout.QUALITY}
            if any(v is not None for vs in q.values() for v in vs):
                data["quality"][p] = q
        else:
            data["opt"][p] = [None] * len(units)
            data["dead"][p] = [None] * len(units)
        hist = [histories.get((name, u, p)) for u in units]
        data["history"][p] = hist if any(h for h in hist) else None
    if urows is not None:
        data["stats"] = _stats(urows, units)
    if topk_rows is not None:
        images: dict[str, int] = {}
        rows = _topk_rows(topk_rows, units, present, images, schema)
        data["images"] = list(images)
        data["top"], data["bottom"] = rows["top"], rows["bottom"]

    return data, _layer_summary(l, data, presets, units)


def _input_size(model: dict) -> int | None:
    """S, the side of schema 3's input images (the model's input: its preprocessing's centre crop),
    which the boxes of the layer data's cut rows are in; None when the manifest does not say."""
    s = (model.get("preprocessing") or {}).get("crop") or model.get("input_size")
    try:
        return int(s) if s else None
    except (TypeError, ValueError):
        return None


def _stats(urows: dict, units: list[int]) -> dict | None:
    """A layer's per-unit dataset statistics, columnar (None when the build had no dataset pass)."""
    stats = {}
    for c in ("mean", "std", "max", "frac_positive"):
        stats[c] = [_num((urows.get(u) or {}).get(c)) for u in units]
    stats["count"] = [int((urows.get(u) or {}).get("count") or 0) for u in units]
    # an optional histogram of the unit's activations over the dataset, when the build records
    # one: columns hist (list of counts), hist_lo, hist_hi (the range the bins split evenly)
    if any("hist" in (urows.get(u) or {}) for u in units):
        stats["hist"] = [(urows.get(u) or {}).get("hist") for u in units]
        stats["hist_lo"] = [_num((urows.get(u) or {}).get("hist_lo")) for u in units]
        stats["hist_hi"] = [_num((urows.get(u) or {}).get("hist_hi")) for u in units]
    return stats if any(v is not None for v in stats["mean"]) or any(stats["count"]) else None


def _layer_summary(l: dict, data: dict, presets: list[str], units: list[int]) -> dict:
    """model.json's entry of a layer: counts and the problem lists, from its layer data."""
    name = l["name"]
    n = len(units)
    dead_any = [any(bool((data["dead"][p] or [None] * n)[i]) for p in presets) for i in range(n)]
    summary = {
        "name": name, "kind": l.get("kind"), "shape": l.get("shape"), "units": l.get("units"),
        "selected": n,
        "images": {p: int(sum(data["image"][p])) for p in presets},
        "dead": int(sum(dead_any)),
        "failed": len(set(data["failed_opt"]) | set(data["failed_crop"])),
        "without_image": int(sum(1 for i in range(n) if any(not data["image"][p][i] for p in presets))),
        "crops": None if data["top"] is None else int(sum(
            1 for i in range(n) for kind in ("top", "bottom") for r in data[kind][i] if r[8])),
        "crops_expected": None if data["top"] is None else int(sum(
            len(data[kind][i]) for i in range(n) for kind in ("top", "bottom"))),
    }
    failed_any = set(data["failed_opt"]) | set(data["failed_crop"])
    summary["problems"] = {
        "failed": sorted(failed_any),
        "dead": [u for i, u in enumerate(units) if dead_any[i]],
        # absent images that neither a failed shard nor a dead unit explains
        "missing": {p: [u for i, u in enumerate(units) if not data["image"][p][i] and u not in failed_any
                        and not (data["dead"][p] or [None] * n)[i]] for p in presets},
        "crops_missing": [] if data["top"] is None else [
            u for i, u in enumerate(units) if u not in failed_any
            and any(not r[8] for kind in ("top", "bottom") for r in data[kind][i])],
    }
    return summary


# ---------------------------------------------------------------- entry point
def copy_static(store: Store) -> list[str]:
    keys = []
    for path in sorted(STATIC.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            key = f"{VIEWER}/{path.relative_to(STATIC).as_posix()}"
            store.put(key, path.read_bytes())
            keys.append(key)
    return keys


def publish(store: Store, tile: int = TILE, per_sheet: int = PER_SHEET) -> dict:
    """Copy the viewer into the atlas and (re)write its data. Idempotent; returns model.json's dict."""
    manifest = layout.read_manifest(store)
    version = f"{int(time.time() * 1000):x}"
    copy_static(store)

    presets = [p["name"] if isinstance(p, dict) else str(p) for p in manifest.get("presets") or []]
    units_t, units_rows = _rows_by_layer(store, layout.UNITS, unit_keyed=True)
    topk_t, topk_by_layer = _rows_by_layer(store, layout.TOPK, unit_keyed=False)
    failed = _failed_units(manifest)
    histories = _opt_histories(store)
    # the objects rows of many units share (schema 2's crops, schema 3's input images), listed once
    # (hundreds of thousands of keys in a full ImageNet atlas, named by sha256: 16 listings side by side)
    shared_present = {k for d in (layout.CROPS, layout.INPUTS) for k in store.list_many(f"{d}/{h}" for h in HEX)}

    old = set(store.list(f"{DATA}/"))
    written = set()
    layers = []
    cache = _TileCache()            # shared by the layers: their top crops repeat across layers too
    # a layer's JSON uploads while the next layer's sheets are made; model.json, which names them,
    # is written after every one of them is in the store
    with store.writer() as w:
        for l in manifest.get("layers", []):
            data, summary = _layer_data(store, manifest, l, presets, units_rows,
                                        None if topk_by_layer is None else topk_by_layer.get(l["name"], []),
                                        failed, histories, tile, per_sheet, version, shared_present, cache)
            key = layer_data_key(l["name"])
            w.put(key, functools.partial(_dumps, data))
            written.add(key)
            for p, names in data["sheets"].items():
                written.update(f"{DATA}/sprites/{l['name']}/{n}" for n in names if n)
            summary["file"] = key[len(DATA) + 1:]
            layers.append(summary)

    out = _model_json(manifest, version, layers, has_topk=topk_t is not None, has_units=units_t is not None,
                      tile=tile, per_sheet=per_sheet)
    store.put(f"{DATA}/model.json", _dumps(out))
    written.add(f"{DATA}/model.json")
    # sheets and layers of an earlier publish that this one did not write (fewer units, a layer gone)
    for key in sorted(old - written):
        if key.startswith((f"{DATA}/sprites/", f"{DATA}/layers/")):
            store.delete(key)
    return out


def _rows_by_layer(store: Store, key: str, unit_keyed: bool):
    """(the table or None, its rows by layer: {layer: {unit: row}} when unit_keyed, else {layer: [rows]}).
    The units table counts as absent when it has no rows (the viewer then has no per-unit stats)."""
    t = _read_optional(store, key)
    if t is None or (unit_keyed and not t.num_rows):
        return t, None
    by_layer: dict = {}
    for r in t.to_pylist():
        if unit_keyed:
            by_layer.setdefault(r["layer"], {})[int(r["unit"])] = r
        else:
            by_layer.setdefault(r["layer"], []).append(r)
    return t, by_layer


def _model_json(manifest: dict, version: str, layers: list[dict], *, has_topk: bool, has_units: bool,
                tile: int, per_sheet: int) -> dict:
    """model.json: what the viewer shows of the manifest, plus the layer summaries."""
    model = manifest.get("model") or {}
    ds = manifest.get("dataset")
    build = manifest.get("build") or {}
    return {
        "version": version, "data_version": DATA_VERSION,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": manifest.get("status"),
        "model": {"name": model.get("name"), "source": model.get("source"), "weights": model.get("weights"),
                  "input_size": model.get("input_size"), "output_layer": model.get("output_layer"),
                  "labels": len(model.get("labels") or []) or None},
        "presets": manifest.get("presets") or [],
        "optimization": manifest.get("optimization"),
        "k": manifest.get("k"),
        "dataset": None if not ds else {
            "uri": ds.get("uri"), "images": ds.get("images"), "images_seen": ds.get("images_seen"),
            "images_skipped": ds.get("images_skipped"), "skipped": (ds.get("skipped") or [])[:1000]},
        "build": {"started": build.get("started"), "finished": build.get("finished"),
                  "seconds": build.get("seconds"), "versions": build.get("versions")},
        "failed_shards": [{"id": f.get("id"), "error": str(f.get("error", ""))[:2000]}
                          for f in manifest.get("failed_shards") or []],
        "has_topk": has_topk, "has_units": has_units,
        "tile": tile, "per_sheet": per_sheet,
        "layers": layers,
    }
