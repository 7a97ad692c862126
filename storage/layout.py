"""The atlas layout in a store (FORMAT.md): object keys, the manifest, the two Parquet indexes, and the
build's internal completion records. No torch here."""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepvis.storage.errors import StoreError
from deepvis.storage.store import Store

# 3: one preprocessed input image per distinct dataset image, inputs/<sha>.jpg, named by
#    index/topk.parquet's `input` column (null: none); a row's crop is its box x0..y1 cut from it.
# 2: dataset crops are content-addressed objects crops/<sha>.jpg, one per distinct (image, box), named
#    by index/topk.parquet's `crop` column (null: no crop). 1: units/<layer>/<unit>/<kind>-<rank>.jpg,
#    no `crop` column. Readers handle all three (storage.atlas.crop_ref).
SCHEMA_VERSION = 3
INPUTS = "inputs"
CROPS = "crops"
MANIFEST = "manifest.json"
TOPK = "index/topk.parquet"
UNITS = "index/units.parquet"
RECORDS = "_build/done"          # completion records: _build/done/<shard id>.json, written last
STATES = "_build/state"          # dataset-pass partial reducer states (npz)

TOPK_SCHEMA = pa.schema([
    ("layer", pa.string()), ("unit", pa.int32()), ("kind", pa.string()), ("rank", pa.int16()),
    ("activation", pa.float32()), ("image", pa.string()), ("y", pa.int32()), ("x", pa.int32()),
    ("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()),
    ("input", pa.string()),
])
# older schema_versions' topk: what tests write to check that old atlases still open. 2: a `crop`
# column (the row's own crop object) instead of `input`; 1: neither
TOPK_SCHEMA_V1 = pa.schema([f for f in TOPK_SCHEMA if f.name != "input"])
TOPK_SCHEMA_V2 = TOPK_SCHEMA_V1.append(pa.field("crop", pa.string()))
# rows per Parquet row group of topk: a query for one unit reads one small group (stats pruning)
TOPK_ROW_GROUP = 4096


def unit_key(layer: str, unit: int, name: str) -> str:
    """units/<layer>/<unit>/<name>: name is '<preset>.png', 'top-<rank>.jpg' or 'bottom-<rank>.jpg'."""
    return f"units/{layer}/{int(unit)}/{name}"


def preset_image(preset: str, index: int = 0) -> str:
    """'<preset>.png' for a unit's (first) optimized image; '<preset>.<i>.png' for the i-th of a
    `--diversity n` set (i = 1 .. n-1)."""
    return f"{preset}.png" if not index else f"{preset}.{int(index)}.png"


def crop_name(kind: str, rank: int) -> str:
    """Schema version 1's per-unit crop object name (under unit_key)."""
    return f"{kind}-{int(rank)}.jpg"


def crop_key(image: str, box) -> str:
    """Schema version 2 (written by older deepvis; readers still open it): the one object holding the crop `box` (x0, y0, x1, y1) of dataset image
    `image`, shared by every (layer, unit, kind, rank) with that image and box."""
    x0, y0, x1, y1 = (int(v) for v in box)
    digest = hashlib.sha256(f"{image}\n{x0},{y0},{x1},{y1}".encode()).hexdigest()[:24]
    return f"{CROPS}/{digest}.jpg"


def input_key(image: str) -> str:
    """Schema version 3: the one object holding dataset image `image` preprocessed (resized and
    centre-cropped to the model's input, not normalized), shared by every topk row of that image;
    each row's crop is its box cut from it."""
    return f"{INPUTS}/{hashlib.sha256(image.encode()).hexdigest()[:24]}.jpg"


def record_key(shard_id: str) -> str:
    return f"{RECORDS}/{shard_id}.json"


def state_key(shard_id: str) -> str:
    return f"{STATES}/{shard_id}.npz"


# ---------------------------------------------------------------- JSON objects
def put_json(store: Store, key: str, obj: Any) -> None:
    store.put(key, json.dumps(obj, indent=1, sort_keys=False, default=_json_default).encode())


def get_json(store: Store, key: str) -> Any | None:
    return _loads(store.get_or_none(key))


def get_json_many(store: Store, keys: Iterable[str]) -> Iterator[tuple[str, Any | None]]:
    """(key, get_json's value) for each key, in order, read concurrently (Store.get_many)."""
    for key, data in store.get_many(keys):
        yield key, _loads(data)


def matching_records(store: Store, prefix: str, hashes: dict[str, str]) -> dict[str, dict]:
    """Shard id -> summary of the completion records under `prefix` whose hash is the shard's current
    one (`hashes`: id -> hash); a missing, damaged or stale record is left out (the shard is redone).
    One LIST, then only the present records, read concurrently."""
    present = set(store.list(prefix))
    ids = {record_key(i): i for i in hashes}
    out = {}
    for key, rec in get_json_many(store, [k for k in ids if k in present]):
        if rec and rec.get("hash") == hashes[ids[key]]:
            out[ids[key]] = rec["summary"]
    return out


def _loads(data: bytes | None) -> Any | None:
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None  # a foreign or damaged object: treated as absent (it is rewritten)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_manifest(store: Store) -> dict:
    m = get_json(store, MANIFEST)
    if m is None:
        raise StoreError(f"no atlas at {store.uri!r} (manifest.json missing); build one with `deepvis build --out ...`")
    version = m.get("schema_version", 1) if isinstance(m, dict) else None
    if not isinstance(version, int):
        raise StoreError(f"{store.uri!r}: manifest.json has no valid schema_version ({version!r}); "
                         f"it is not a deepvis atlas or it is damaged")
    # compatibility rule (FORMAT.md): a reader reads every schema_version up to its own, never a newer one
    if version > SCHEMA_VERSION:
        raise StoreError(f"atlas schema_version {version} is newer than this deepvis reads "
                         f"({SCHEMA_VERSION}); upgrade deepvis")
    return m


# ---------------------------------------------------------------- numpy states (npz, no pickle)
def pack_state(state: dict) -> bytes:
    """Nested dict of numpy arrays / numbers / string lists -> npz bytes (loadable without pickle)."""
    flat: dict[str, np.ndarray] = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if "/" in str(k):
                    raise ValueError(f"state key {k!r} contains '/'")
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            arr = np.asarray(obj)
            if arr.dtype == object:
                arr = arr.astype(str)
            flat[prefix] = arr
    walk("", state)
    buf = io.BytesIO()
    np.savez(buf, **flat)
    return buf.getvalue()


def unpack_state(data: bytes) -> dict:
    out: dict = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        for key in z.files:
            node = out
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            arr = z[key]
            node[leaf] = arr.item() if arr.ndim == 0 and arr.dtype.kind in "iufb" else arr
    return out


# ---------------------------------------------------------------- Parquet
def table_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd",
                   write_statistics=True)
    return buf.getvalue().to_pybytes()


def topk_table(rows: dict[str, list], schema: pa.Schema = TOPK_SCHEMA) -> pa.Table:
    """rows: column -> list, in TOPK_SCHEMA order; sorted by the caller (layer, unit, kind, rank)."""
    return pa.table({f.name: pa.array(rows[f.name], type=f.type) for f in schema}, schema=schema)


def write_topk(store: Store, rows: dict[str, list], schema: pa.Schema = TOPK_SCHEMA) -> None:
    store.put(TOPK, table_bytes(topk_table(rows, schema), TOPK_ROW_GROUP))


QUALITY = ("act", "ratio", "hf", "robust")   # per preset: tasks.quality's measures of its image


def units_table(rows: list[dict], presets: list[str]) -> pa.Table:
    """One row per (layer, unit): dataset stats (NaN without a dataset pass), and per preset the
    activation reached (opt_<preset>, the optimizer's own objective), whether its gradient was zero
    (dead_<preset>), and the image's quality (tasks.quality): act_<preset> (FORMAT.md's activation),
    ratio_<preset> (act / the dataset's max; NaN without a dataset pass), hf_<preset> (high-frequency
    energy relative to natural photos), robust_<preset> (activation kept under jitter/scale/rotation)."""
    cols: dict[str, pa.Array] = {
        "layer": pa.array([r["layer"] for r in rows], pa.string()),
        "unit": pa.array([r["unit"] for r in rows], pa.int32()),
    }
    for c in ("mean", "std", "max", "frac_positive"):
        cols[c] = pa.array([r.get(c, float("nan")) for r in rows], pa.float32())
    cols["count"] = pa.array([r.get("count", 0) for r in rows], pa.int64())
    for p in presets:
        cols[f"opt_{p}"] = pa.array([r.get(f"opt_{p}", float("nan")) for r in rows], pa.float32())
        cols[f"dead_{p}"] = pa.array([r.get(f"dead_{p}") for r in rows], pa.bool_())
        for q in QUALITY:
            cols[f"{q}_{p}"] = pa.array([r.get(f"{q}_{p}", float("nan")) for r in rows], pa.float32())
    cols["dead"] = pa.array([any(bool(r.get(f"dead_{p}")) for p in presets) for r in rows], pa.bool_())
    return pa.table(cols)


def read_table(store: Store, key: str, filters=None, columns=None) -> pa.Table:
    """Read a Parquet object, fetching only the row groups the filters can match."""
    try:
        f = store.open(key)
    except KeyError:
        raise StoreError(f"{key} missing in {store.uri!r}; the atlas has no such index (was the build "
                         f"run with a dataset / completed?)") from None
    with f:
        # use_threads=False: pyarrow's thread pool can abort the process at interpreter exit
        # ("terminate called without an active exception"); one unit's rows are a tiny read anyway
        return pq.read_table(f, filters=filters, columns=columns, use_threads=False)
