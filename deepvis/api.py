"""The Python API for notebooks: `deepvis.open(uri)` -> Atlas, `atlas.unit(layer, u)` -> Unit, their
images as PIL images, the Parquet indexes as pyarrow Tables, the reverse query by image, and
`deepvis.build(**flags)`. Reads go through deepvis.storage.atlas.Atlas (local or s3://); torch is
imported only by query_image and build. An atlas is untrusted input: every string of it that reaches
HTML is escaped, and it never chooses code to run (a `package.module:callable` model needs `model=`)."""
from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from deepvis.storage import layout
from deepvis.storage.atlas import Atlas as Reader, crop_jpeg, cut_crop
from deepvis.storage.errors import StoreError
from deepvis.tasks.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

THUMB_UNITS = 8      # units per layer shown by Atlas._repr_html_
THUMB_LAYERS = 12    # layers with thumbnails in Atlas._repr_html_ (a full network has ~100)
MAX_DIVERSITY = 64   # images per (unit, preset) looked for: a manifest cannot make us probe more


# ---------------------------------------------------------------- typed rows
@dataclass(frozen=True)
class Layer:
    name: str
    kind: str
    shape: tuple[int, ...]       # the layer's output without the batch axis: (C, H, W) or (C,)
    units: int                   # channels
    selected: tuple[int, ...]    # the units this atlas built


@dataclass(frozen=True)
class LayerStatus:
    layer: str
    expected: int
    done: int
    dead: int
    failed: int


@dataclass(frozen=True)
class FailedShard:
    id: str
    error: str


@dataclass(frozen=True)
class Status:
    status: str                              # the manifest's: running, complete or failed
    layers: tuple[LayerStatus, ...]
    failed_shards: tuple[FailedShard, ...]

    @property
    def complete(self) -> bool:
        return self.status == "complete"


@dataclass(frozen=True)
class TopImage:
    """One row of index/topk.parquet: a dataset image that excites (top) or least excites (bottom)
    the unit, where (y, x in the layer's map) and its receptive-field box in the model's input."""
    layer: str
    unit: int
    kind: str                               # "top" or "bottom"
    rank: int                               # 0 = strongest (top) / weakest (bottom)
    activation: float
    image: str                              # the image id: its path within the dataset
    y: int
    x: int
    box: tuple[int, int, int, int]          # (x0, y0, x1, y1)
    crop_key: str | None                    # the object holding the crop (None: none was written)
    crop_box: tuple[int, int, int, int] | None = None   # the box to cut from it (schema 3), or None

    @classmethod
    def from_row(cls, reader: Reader, r: dict) -> "TopImage":
        """From a dict row of Reader.top_images. The reader that loads the crop is kept outside the
        fields, so dataclasses.asdict/replace never copy a store (an S3 client)."""
        row = cls(layer=r["layer"], unit=int(r["unit"]), kind=r["kind"], rank=int(r["rank"]),
                  activation=float(r["activation"]), image=r["image"], y=int(r["y"]), x=int(r["x"]),
                  box=(int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])), crop_key=r["crop"],
                  crop_box=tuple(r["crop_box"]) if r.get("crop_box") else None)
        object.__setattr__(row, "_reader", reader)
        return row

    @cached_property
    def _object(self) -> bytes:
        return self._reader.read_object(self.crop_key, "crop")

    @cached_property
    def crop_bytes(self) -> bytes:
        """The crop as JPEG bytes (read on first use): the stored crop object (atlases of schema 1
        and 2), or the box cut from the row's stored input image (schema 3)."""
        return crop_jpeg(self._object, self.crop_box, self.crop_key)

    @property
    def crop(self) -> "Image.Image":
        """The receptive-field crop as an RGB PIL image (read on first use; decoded within the
        project's image limits: an atlas is untrusted), cut from the stored image without a second
        JPEG pass."""
        return cut_crop(self._object, self.crop_box, self.crop_key)


@dataclass(frozen=True)
class QueryHit:
    """A unit a query image excites: its activation and that ÷ the unit's maximum over the dataset."""
    layer: str
    unit: int
    activation: float
    relative: float


# ---------------------------------------------------------------- helpers
def _decode(data: bytes, key: str) -> "Image.Image":
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise StoreError(f"{key} is not a readable image ({e}); re-run the build to rewrite it") from None
    return img


def _manifest_int(value: Any, default: int, cap: int) -> int:
    """A count read from the (untrusted) manifest: a garbage value falls back, a huge one is capped."""
    try:
        return max(1, min(int(value), cap))
    except (TypeError, ValueError):
        return default


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    """A stats value for HTML: floats to 4 significant digits; anything else escaped as text."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return _esc(v)


def _img_html(data: bytes | None, key: str, caption: str, width: int = 96) -> str:
    """A <figure> with the object inline as a data URI (the MIME type is ours, from the key's
    extension, never the atlas's), or a 'missing' box."""
    mime = "image/png" if key.endswith(".png") else "image/jpeg"
    if data is None:
        body = (f'<div style="width:{width}px;height:{width}px;border:1px dashed #999;font-size:11px;'
                f'display:flex;align-items:center;justify-content:center">missing</div>')
    else:
        b64 = base64.b64encode(data).decode("ascii")
        body = f'<img src="data:{mime};base64,{b64}" width="{width}" title="{_esc(key)}" alt="{_esc(key)}">'
    return (f'<figure style="display:inline-block;margin:2px;text-align:center;vertical-align:top">{body}'
            f'<figcaption style="font-size:11px;max-width:{width}px;overflow-wrap:anywhere">{caption}</figcaption>'
            f'</figure>')


# ---------------------------------------------------------------- Unit
class Unit:
    """One unit (channel) of one layer of an atlas."""

    def __init__(self, atlas: "Atlas", layer: str, unit: int):
        self.atlas, self.layer, self.unit = atlas, layer, int(unit)

    def __repr__(self) -> str:
        return f"Unit({self.layer!r}, {self.unit})"

    @property
    def label(self) -> str | None:
        """The class name, for a unit of the model's output layer when the atlas has labels."""
        m = self.atlas.manifest.get("model") or {}
        labels = m.get("labels") or []
        if self.layer == m.get("output_layer") and self.unit < len(labels):
            return str(labels[self.unit])
        return None

    def _preset(self, preset: str | None) -> str:
        presets = self.atlas.presets
        if preset is None:
            if not presets:
                raise StoreError(f"atlas {self.atlas.uri!r} has no optimized images (built with --presets none)")
            return presets[0]
        if preset not in presets:
            raise StoreError(f"preset {preset!r} is not in this atlas (presets: {', '.join(presets) or 'none'})")
        return preset

    def image_key(self, preset: str | None = None, index: int = 0) -> str:
        return layout.unit_key(self.layer, self.unit, layout.preset_image(self._preset(preset), index))

    def image(self, preset: str | None = None, index: int = 0) -> "Image.Image":
        """The optimized image of `preset` (default: the atlas's first); index i > 0: the i-th of a
        `--diversity n` set."""
        key = self.image_key(preset, index)
        return _decode(self.atlas._reader.read_object(key, "optimized image"), key)

    def images(self, preset: str | None = None) -> list["Image.Image"]:
        """All stored images of `preset` for this unit: one, or the `--diversity n` set."""
        return [_decode(data, key) for key, data in self._image_objects(self._preset(preset))]

    def _image_objects(self, preset: str) -> list[tuple[str, bytes]]:
        n = _manifest_int((self.atlas.manifest.get("optimization") or {}).get("diversity"), 1, MAX_DIVERSITY)
        keys = [layout.unit_key(self.layer, self.unit, layout.preset_image(preset, i)) for i in range(n)]
        found = [(k, self.atlas.store.get_or_none(k)) for k in keys]
        return [(k, d) for k, d in found if d is not None]

    def top(self, k: int | None = None) -> list[TopImage]:
        """The k dataset images that excite the unit most (default: all the atlas kept), rank 0 first."""
        return self._rows("top", k)

    def bottom(self, k: int | None = None) -> list[TopImage]:
        """The k dataset images that excite the unit least, rank 0 = the lowest."""
        return self._rows("bottom", k)

    def _rows(self, kind: str, k: int | None) -> list[TopImage]:
        reader = self.atlas._reader
        k = _manifest_int(self.atlas.manifest.get("k"), 9, 10_000) if k is None else int(k)
        return [TopImage.from_row(reader, r) for r in reader.top_images(self.layer, self.unit, k, kind)]

    @cached_property
    def stats(self) -> dict:
        """The unit's row of index/units.parquet: dataset mean/std/max/frac_positive/count (NaN
        without a dataset pass), dead, and per preset opt_/dead_/act_/ratio_/hf_/robust_."""
        t = self.atlas.units(self.layer)
        for r in t.to_pylist():
            if r["unit"] == self.unit:
                return r
        raise StoreError(f"unit {self.unit} of layer {self.layer!r} has no row in {layout.UNITS} "
                         f"(was the build interrupted? `deepvis status` shows what is done)")

    # ------------------------------------------------------------ Jupyter
    def _repr_html_(self) -> str:
        title = f"{_esc(self.layer)} unit {self.unit}"
        if self.label:
            title += f" &mdash; {_esc(self.label)}"
        parts = [f'<div class="deepvis-unit"><h4 style="margin:4px 0">{title}</h4>',
                 self._presets_html(), self._rows_html("top"), self._rows_html("bottom"),
                 self._stats_html(), "</div>"]
        return "".join(parts)

    def _presets_html(self) -> str:
        figs = []
        for p in self.atlas.presets:
            objs = self._image_objects(p) or [(layout.unit_key(self.layer, self.unit, layout.preset_image(p)), None)]
            act = self._stat(f"act_{p}")
            cap = _esc(p) + (f" ({act:.3g})" if isinstance(act, float) and act == act else "")
            figs += [_img_html(d, k, cap, 128) for k, d in objs]
        return f"<div><b>optimized</b><br>{''.join(figs)}</div>" if figs else ""

    def _stat(self, name: str) -> Any:
        try:
            return self.stats.get(name)
        except StoreError:
            return None

    def _rows_html(self, kind: str) -> str:
        try:
            rows = self._rows(kind, None)
        except StoreError as e:
            return f"<div><b>{kind}</b>: <i>{_esc(e)}</i></div>" if kind == "top" else ""
        figs = [_img_html(self._crop_or_none(r), r.crop_key or "crop.jpg",
                          f'{r.activation:.4g}<br><span title="{_esc(r.image)}">{_esc(os.path.basename(r.image))}</span>')
                for r in rows]
        return f"<div><b>{kind} {len(rows)}</b><br>{''.join(figs)}</div>"

    def _crop_or_none(self, r: TopImage) -> bytes | None:
        """The row's crop JPEG for the inline HTML, None when missing or unreadable (a placeholder)."""
        try:
            return r.crop_bytes
        except StoreError:
            return None

    def _stats_html(self) -> str:
        try:
            stats = self.stats
        except StoreError as e:
            return f"<div><i>{_esc(e)}</i></div>"
        cells = "".join(f"<tr><td>{_esc(k)}</td><td>{_num(v)}</td></tr>" for k, v in stats.items()
                        if k not in ("layer", "unit"))
        return f'<table style="font-size:12px"><tbody>{cells}</tbody></table>'


# ---------------------------------------------------------------- Atlas
class Atlas:
    """An atlas, read from a directory or s3://bucket/prefix: `deepvis.open(uri)`."""

    def __init__(self, reader: Reader):
        self._reader = reader
        self._models: dict[tuple[str, str | None], Any] = {}   # query_image's loaded models

    def __repr__(self) -> str:
        return f"deepvis.Atlas({self.uri!r}, model={self.model!r}, {len(self.layers)} layers)"

    @property
    def uri(self) -> str:
        return self._reader.store.uri

    @property
    def reader(self) -> Reader:
        """The storage-level reader (deepvis.storage.atlas.Atlas): rows as dicts, object keys."""
        return self._reader

    @property
    def store(self):
        return self._reader.store

    @property
    def manifest(self) -> dict:
        return self._reader.manifest

    @property
    def model(self) -> str:
        return str((self.manifest.get("model") or {}).get("name"))

    @property
    def presets(self) -> list[str]:
        return [str(p["name"]) for p in self.manifest.get("presets") or []]

    @cached_property
    def layers(self) -> dict[str, Layer]:
        """Layer name -> Layer (kind, shape, units, selected units), in forward order."""
        return {l["name"]: Layer(name=l["name"], kind=str(l.get("kind")), shape=tuple(l.get("shape") or ()),
                                 units=int(l["units"]), selected=tuple(l.get("selected") or range(int(l["units"]))))
                for l in self.manifest.get("layers") or []}

    @property
    def status(self) -> Status:
        """The manifest's status and, per layer, units expected / done / dead / in failed shards
        (what `deepvis status` prints; read afresh each time, so it follows a running build)."""
        from deepvis.storage.atlas import layer_status

        m, rows = layer_status(self.store)
        return Status(status=str(m.get("status")), layers=tuple(LayerStatus(**r) for r in rows),
                      failed_shards=tuple(FailedShard(str(f.get("id")), str(f.get("error")))
                                          for f in m.get("failed_shards") or []))

    def units(self, layer: str | None = None) -> "pa.Table":
        """index/units.parquet as a pyarrow Table (all layers, or one); `.to_pandas()` for pandas."""
        return self._reader.units_table(layer)

    def unit(self, layer: str, unit: int) -> Unit:
        self._reader.check_unit(layer, unit)
        selected = self.layers[layer].selected
        if int(unit) not in selected:
            raise StoreError(f"unit {unit} of layer {layer!r} is not in this atlas (it has {len(selected)} "
                             f"of the layer's units, {selected[0]}..{selected[-1]}); build it with --units")
        return Unit(self, layer, int(unit))

    def query_image(self, image, layer: str | None = None, k: int = 9, model=None,
                    weights: str | None = None) -> list[QueryHit]:
        """The k units `image` (a path or a PIL image) excites most relative to each unit's maximum
        over the dataset, in one layer or all. The model is the atlas's own when built in
        (efficientnet_lite0, torchvision:<name>); otherwise pass `model=` (a spec, a
        tasks.models.LoadedModel or an nn.Module): an atlas never chooses code to run."""
        return _query_image(self, image, layer, k, model, weights)

    def _repr_html_(self) -> str:
        from deepvis.storage.atlas import layer_status
        try:
            m, rows = layer_status(self.store)
        except StoreError as e:
            return f"<div><i>{_esc(e)}</i></div>"
        done = {r["layer"]: r for r in rows}
        head = (f'<div class="deepvis-atlas"><h4 style="margin:4px 0">atlas {_esc(self.uri)} &mdash; '
                f'{_esc(self.model)} [{_esc(m.get("status"))}]</h4>'
                f'<div>presets: {_esc(", ".join(self.presets) or "none")}; k = {_esc(m.get("k"))}</div>')
        cols = ("expected", "done", "dead", "failed")
        trs = [f"<tr><th>layer</th><th>kind</th><th>shape</th>{''.join(f'<th>{c}</th>' for c in cols)}<th></th></tr>"]
        for i, l in enumerate(self.layers.values()):
            r = done.get(l.name, {})
            thumbs = self._thumbs_html(l) if i < THUMB_LAYERS else ""
            trs.append(f"<tr><td>{_esc(l.name)}</td><td>{_esc(l.kind)}</td><td>{_esc('x'.join(map(str, l.shape)))}</td>"
                       + "".join(f"<td>{_esc(r.get(c, ''))}</td>" for c in cols) + f"<td>{thumbs}</td></tr>")
        more = (f"<div><i>thumbnails of the first {THUMB_LAYERS} layers only; atlas.unit(layer, u) shows any unit"
                f"</i></div>") if len(self.layers) > THUMB_LAYERS else ""
        failed = "".join(f"<li>FAILED shard {_esc(f.get('id'))}: {_esc(f.get('error'))}</li>"
                         for f in m.get("failed_shards") or [])
        return (head + f'<table style="font-size:12px">{"".join(trs)}</table>' + more
                + (f"<ul>{failed}</ul>" if failed else "") + "</div>")

    def _thumbs_html(self, l: Layer) -> str:
        if not self.presets:
            return ""
        name = layout.preset_image(self.presets[0])
        keys = [layout.unit_key(l.name, u, name) for u in l.selected[:THUMB_UNITS]]
        return "".join(_img_html(self.store.get_or_none(k), k, str(u), 48)
                       for u, k in zip(l.selected, keys))


def open_atlas(uri, endpoint_url: str | None = None) -> Atlas:
    """`deepvis.open`: the atlas at a directory or s3://bucket/prefix (endpoint_url for S3-compatible
    servers; else AWS_ENDPOINT_URL or AWS)."""
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    return Atlas(Reader.open(uri, endpoint_url))


# ---------------------------------------------------------------- the reverse query
def _resolve_model(atlas: Atlas, model, weights: str | None):
    """The model for query_image: the caller's, or the atlas's only when it is built in."""
    import torch.nn as nn

    from deepvis.tasks.models import LoadedModel, load_model, trusted_model_spec, trusted_weights

    m = atlas.manifest.get("model") or {}
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        pre = m.get("preprocessing")
        if not pre:
            raise UserError(f"atlas {atlas.uri!r} records no preprocessing; pass model= as a model spec "
                            f"or a tasks.models.LoadedModel")
        return LoadedModel(model.eval(), pre, None, type(model).__name__, "python", "given")
    if model is not None and not isinstance(model, str):
        raise UserError(f"model= must be a model spec, a LoadedModel or an nn.Module, not {type(model).__name__}")
    spec = trusted_model_spec(m.get("name"), model)          # the one rule (tasks.models)
    w = trusted_weights(m.get("weights", "default"), weights)
    if (spec, w) not in atlas._models:
        atlas._models[(spec, w)] = load_model(spec, w)
    return atlas._models[(spec, w)]


def _read_query_image(image) -> "Image.Image":
    from PIL import Image

    from deepvis.storage.images import BadImage, open_image
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise UserError(f"image must be a file path or a PIL image, not {type(image).__name__}")
    try:
        return open_image(image)   # the project's one decoder: bombs refused from the header
    except BadImage as e:
        raise UserError(f"cannot read image {os.fspath(image)!r} ({e}); pass a JPEG/PNG file") from None


def _query_image(atlas: Atlas, image, layer: str | None, k: int, model, weights) -> list[QueryHit]:
    import numpy as np
    import torch

    from deepvis.tasks.activations import batch_unit_maxima
    from deepvis.tasks.preprocess import preprocess

    if layer is not None:
        atlas._reader.check_unit(layer, 0)
    layers = [layer] if layer else list(atlas.layers)
    img = _read_query_image(image)
    lm = _resolve_model(atlas, model, weights)
    maxima = atlas.units(layer).select(["layer", "unit", "max"]).to_pylist()
    dataset_max = {(r["layer"], r["unit"]): r["max"] for r in maxima}
    with torch.no_grad():
        out = batch_unit_maxima(lm.module, layers, preprocess(img, lm.preprocessing)[None])
    hits = []
    for name in layers:
        vals = out[name][0][0].numpy()
        for u in atlas.layers[name].selected:
            mx = dataset_max.get((name, u))
            if mx is None or not np.isfinite(mx) or mx <= 0 or u >= len(vals):
                continue
            hits.append(QueryHit(name, int(u), float(vals[u]), float(vals[u] / mx)))
    hits.sort(key=lambda h: (-h.relative, h.layer, h.unit))
    return hits[:k]


# ---------------------------------------------------------------- build
def build(**kwargs) -> dict:
    """`deepvis build` from Python: the same keys as its flags (deepvis.cluster.config.BuildConfig,
    e.g. layers="_fc", units="0:2", presets="none", dataset="images/", out="atlas"); unknown keys
    are an error. Returns the build summary (status, units, failed_shards, seconds...)."""
    from deepvis.cluster.build import run_build
    from deepvis.cluster.config import BuildConfig

    return run_build(BuildConfig.from_dict(_absolute_paths(kwargs), origin="deepvis.build()"))


def _absolute_paths(kwargs: dict) -> dict:
    """Local paths relative to the caller's directory, made absolute: a notebook's working directory
    need not be the one the Ray workers started in (a cluster started earlier, or an os.chdir)."""
    if kwargs.get("address") not in (None, "", "local"):
        return kwargs          # a remote cluster reads paths on its own nodes
    out = dict(kwargs)
    for key in ("dataset", "out", "presets_file", "weights"):
        v = out.get(key)
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if isinstance(v, str) and v and "://" not in v and not (key == "weights" and v in ("none", "default")):
            v = os.path.abspath(os.path.expanduser(v))
        if key in out:
            out[key] = v
    return out
