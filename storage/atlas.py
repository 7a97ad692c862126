"""Read side of an atlas: `Atlas.open(uri).top_images(layer, unit, k)`. (The notebook API,
deepvis.open, wraps this class; it stays torch-free.)"""
from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa

from deepvis.storage import layout
from deepvis.storage.errors import StoreError
from deepvis.storage.store import Store, open_store


@dataclass(frozen=True)
class CropRef:
    """Where the crop of a topk row is: the object `key` (None: none was written, its source image was
    unreadable during the build), and the `box` (x0, y0, x1, y1) to cut from it, or None when the
    object is the crop itself (schemas 1 and 2)."""
    key: str | None
    box: tuple[int, int, int, int] | None = None


def crop_ref(row: dict, schema_version: int = layout.SCHEMA_VERSION) -> CropRef:
    """The crop of a topk row (a dict with layer, unit, kind, rank, the box x0..y1 and the columns of
    its schema), for atlases of every layout: version 3 names the row's preprocessed input image in
    its `input` column (inputs/<sha>.jpg) and the crop is the box cut from it; version 2 names the
    crop object in its `crop` column (crops/<sha>.jpg); version 1 kept it at
    units/<layer>/<unit>/<kind>-<rank>.jpg."""
    version = int(schema_version)
    if version >= 3 and "input" in row:
        return CropRef(row["input"], tuple(int(row[c]) for c in ("x0", "y0", "x1", "y1")))
    if version >= 2 and "crop" in row:
        return CropRef(row["crop"])
    return CropRef(layout.unit_key(row["layer"], row["unit"], layout.crop_name(row["kind"], row["rank"])))


def cut_crop(data: bytes, box: tuple[int, int, int, int] | None, name: str):
    """A PIL image of the crop: the object's bytes decoded (through storage.images' limits), then the
    box cut from it when there is one. A damaged object is a StoreError naming it."""
    from deepvis.storage.images import BadImage, decode
    try:
        img = decode(data)
    except BadImage as e:
        raise StoreError(f"{name} is not a readable image ({e}); re-run the build to rewrite it") from None
    return img.crop(box) if box is not None else img


def crop_jpeg(data: bytes, box: tuple[int, int, int, int] | None, name: str) -> bytes:
    """The crop as JPEG bytes: the stored object as it is when it is the crop itself (schemas 1, 2),
    else the box cut from the input image and encoded (quality 95: one more lossy pass, kept light)."""
    if box is None:
        return data
    buf = io.BytesIO()
    cut_crop(data, box, name).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def layer_status(store: Store) -> tuple[dict, list[dict]]:
    """(manifest, per layer: expected / done / dead / failed units), from the manifest and, for a
    finished build, its units index (a few MB), else the optimization shards' completion records
    (`deepvis status`, deepvis.Atlas.status). A whole-network build's records hold every step of
    every unit: hundreds of MB that a status of a finished atlas need not fetch."""
    m = layout.read_manifest(store)
    rows = {l["name"]: {"layer": l["name"], "expected": len(l.get("selected") or range(l["units"])),
                        "done": 0, "dead": 0, "failed": 0} for l in m["layers"]}
    presets = [p["name"] if isinstance(p, dict) else str(p) for p in m.get("presets") or []]
    counts = _index_counts(store, presets) if m.get("status") != "running" and presets else None
    for layer, (done, dead) in (counts if counts is not None else _record_counts(store)).items():
        if layer in rows:
            rows[layer]["done"] += done
            rows[layer]["dead"] += dead
    for f in m.get("failed_shards", []):
        parts = f["id"].split("/")
        if len(parts) == 3 and parts[0] in ("opt", "crop") and parts[1] in rows:
            lo, hi = map(int, parts[2].split("-"))
            sel = [u for u in (next(l for l in m["layers"] if l["name"] == parts[1]).get("selected") or [])
                   if lo <= u <= hi]
            rows[parts[1]]["failed"] += len(sel)
    if not presets:  # dataset-only atlas: "done" = units with top-k rows
        for r in rows.values():
            r["done"] = r["expected"] if m["status"] == "complete" else 0
    return m, list(rows.values())


def _record_counts(store: Store) -> dict[str, tuple[int, int]]:
    """layer -> (units optimized, units dead), from the completion records (a running build's)."""
    out: dict[str, list[int]] = {}
    for _, rec in layout.get_json_many(store, store.list(layout.RECORDS + "/opt/")):
        if not rec:
            continue
        s = rec["summary"]
        c = out.setdefault(s["layer"], [0, 0])
        c[0] += len({x["unit"] for x in s["rows"]})
        c[1] += len({x["unit"] for x in s["rows"] if x["dead"]})
    return {k: (v[0], v[1]) for k, v in out.items()}


def _index_counts(store: Store, presets: list[str]) -> dict[str, tuple[int, int]] | None:
    """layer -> (units optimized, units dead) from index/units.parquet (a unit is optimized when a
    preset has its dead flag, null where no record was); None when the index is missing, damaged or
    older than these columns: the records are read instead."""
    cols = [f"dead_{p}" for p in presets]
    try:
        t = layout.read_table(store, layout.UNITS, columns=["layer", *cols])
    except (StoreError, KeyError, ValueError, OSError, pa.ArrowException):
        return None
    out: dict[str, list[int]] = {}
    flags = [t.column(c).to_pylist() for c in cols]
    for i, layer in enumerate(t.column("layer").to_pylist()):
        seen = [f[i] for f in flags if f[i] is not None]
        if seen:
            c = out.setdefault(layer, [0, 0])
            c[0] += 1
            c[1] += any(seen)
    return {k: (v[0], v[1]) for k, v in out.items()}


class Atlas:
    def __init__(self, store: Store, manifest: dict):
        self.store = store
        self.manifest = manifest
        self.layers = {l["name"]: l for l in manifest.get("layers", [])}

    @classmethod
    def open(cls, uri: str | Store, endpoint_url: str | None = None) -> "Atlas":
        store = uri if isinstance(uri, Store) else open_store(uri, endpoint_url, must_exist=True)
        return cls(store, layout.read_manifest(store))

    def check_unit(self, layer: str, unit: int) -> None:
        if layer not in self.layers:
            names = ", ".join(list(self.layers)[:8])
            raise StoreError(f"layer {layer!r} is not in this atlas (layers: {names}"
                             f"{', ...' if len(self.layers) > 8 else ''}); `deepvis status` lists them")
        n = self.layers[layer]["units"]
        if not 0 <= unit < n:
            raise StoreError(f"unit {unit} out of range for layer {layer!r} (0..{n - 1})")

    def top_images(self, layer: str, unit: int, k: int = 9, kind: str = "top") -> list[dict]:
        """Rows of index/topk.parquet for one unit, rank 0 first, each with where its crop is:
        `crop`, the key of the object holding it (None: not written), and `crop_box`, the box to cut
        from that object (schema 3: the row's input image), or None when the object is the crop."""
        if kind not in ("top", "bottom"):
            raise ValueError("kind must be 'top' or 'bottom'")
        self.check_unit(layer, unit)
        table = layout.read_table(self.store, layout.TOPK, filters=[
            ("layer", "=", layer), ("unit", "=", int(unit)), ("kind", "=", kind), ("rank", "<", int(k))])
        rows = sorted(table.to_pylist(), key=lambda r: r["rank"])
        version = int(self.manifest.get("schema_version") or 1)
        for r in rows:
            ref = crop_ref(r, version)
            r["crop"], r["crop_box"] = ref.key, (list(ref.box) if ref.box else None)
        return rows

    def units_table(self, layer: str | None = None) -> pa.Table:
        """index/units.parquet (one row per built unit: dataset stats, per-preset measures), or
        only one layer's rows."""
        if layer is not None and layer not in self.layers:
            self.check_unit(layer, 0)   # the one-line "layer ... is not in this atlas" error
        filters = [("layer", "=", layer)] if layer else None
        return layout.read_table(self.store, layout.UNITS, filters=filters)

    def read_object(self, key: str | None, what: str) -> bytes:
        """An object's bytes; a missing one is a StoreError naming it (`what`: e.g. "crop")."""
        if key is None:   # schemas 2, 3: the build could not read the source image, so wrote no crop
            raise StoreError(f"no {what} was written for this row of {self.store.uri!r} (its source "
                             f"image was unreadable during the build)")
        data = self.store.get_or_none(key)
        if data is None:
            raise StoreError(f"{what} {key} missing in {self.store.uri!r}; re-run the build that made "
                             f"this atlas to fill it in (finished shards are skipped)")
        return data

    def unit_stats(self, layer: str | None = None) -> list[dict]:
        return self.units_table(layer).to_pylist()
