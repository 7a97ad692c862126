"""The Python API (deepvis.open / Atlas / Unit / build): the README's example run as written against
a real small build, the crops against the stored objects, the reverse query against brute force,
the HTML against markup in the atlas, errors against the CLI's own lines, an s3:// atlas."""
from __future__ import annotations

import dataclasses
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import deepvis
from deepvis.storage import layout
from deepvis.storage.atlas import Atlas as Reader
from deepvis.tasks.preprocess import preprocess
from tests.atlas_viewer.conftest import MID, OUT, XSS_FILE, XSS_LABEL, XSS_LAYER, make_synthetic_atlas

ROOT = Path(__file__).resolve().parents[1]
LAYER = "_blocks.3"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepvis.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


class Tags(HTMLParser):
    """Every start tag with its attributes, for checking that atlas strings made no markup."""
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags_of(markup: str) -> list[tuple[str, dict]]:
    p = Tags()
    p.feed(markup)
    return p.tags


def assert_safe(markup: str) -> None:
    tags = tags_of(markup)
    assert {t for t, _ in tags} <= {"div", "h4", "b", "br", "i", "figure", "img", "figcaption", "span",
                                    "table", "tbody", "tr", "th", "td", "ul", "li"}
    for t, attrs in tags:
        assert not any(a.startswith("on") for a in attrs), (t, attrs)
        if t == "img":
            assert re.fullmatch(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+", attrs["src"]), attrs["src"][:80]


# ---------------------------------------------------------------- a real build, through the README
@pytest.fixture(scope="module")
def readme_run(ray_cluster, sample_dir, tmp_path_factory):
    """The README's example executed as written in a folder holding images/ (16 real JPEGs) and
    photo.jpg (one more): it builds the atlas itself with deepvis.build."""
    base = tmp_path_factory.mktemp("readme")
    files = sorted(sample_dir.glob("*/*.JPEG"))[::47]
    (base / "images").mkdir()
    for f in files[:16]:
        shutil.copy(f, base / "images" / f.name)
    shutil.copy(files[16], base / "photo.jpg")
    ns: dict = {}
    cwd = os.getcwd()
    os.chdir(base)
    try:
        exec(compile(readme_example(), "README.md", "exec"), ns)
    finally:
        os.chdir(cwd)
    return base, ns


def test_readme_example(readme_run):
    base, ns = readme_run
    assert ns["summary"]["status"] == "complete" and ns["summary"]["units"] == 2
    atlas, unit = ns["atlas"], ns["unit"]
    assert isinstance(atlas, deepvis.Atlas) and atlas.layers["_fc"].selected == (966, 967)
    assert atlas.status.complete and [(s.layer, s.expected, s.done) for s in atlas.status.layers] == [("_fc", 2, 2)]
    assert ns["table"].num_rows == 2 and ns["table"].column("unit").to_pylist() == [966, 967]
    assert unit.label == "espresso"
    png = Image.open(base / "atlas" / "units/_fc/967/yosinski-3.png")
    assert np.array_equal(np.asarray(unit.image("yosinski-3")), np.asarray(png))
    top = unit.top(4)
    assert [r.rank for r in top] == [0, 1, 2, 3]
    assert [r.activation for r in top] == sorted((r.activation for r in top), reverse=True)
    assert unit.stats["max"] == pytest.approx(top[0].activation)
    hits = atlas.query_image(base / "photo.jpg", k=3)
    assert len(hits) == 2 and {h.unit for h in hits} == {966, 967} and hits[0].relative >= hits[1].relative
    # inline HTML: the optimized image and every crop as data URIs, the activations, the stats
    markup = unit._repr_html_()
    assert_safe(markup)
    assert sum(t == "img" for t, _ in tags_of(markup)) == 1 + 4 + 4
    for r in top + unit.bottom(4):
        assert f"{r.activation:.4g}" in markup and html.escape(os.path.basename(r.image)) in markup
    assert "espresso" in markup and f"{unit.stats['max']:.4g}" in markup
    whole = atlas._repr_html_()
    assert_safe(whole)
    assert sum(t == "img" for t, _ in tags_of(whole)) == 2 and "complete" in whole


def test_units_to_pandas(readme_run):
    import pandas as pd   # the [test] extra installs it (users need it only for .to_pandas())
    df = readme_run[1]["atlas"].units().to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df["unit"]) == [966, 967]


# ---------------------------------------------------------------- deepvis.build, crops, reverse query
@pytest.fixture(scope="module")
def tiny(ray_cluster, sample_dir, tmp_path_factory):
    """deepvis.build of one layer, 2 units, no presets, 16 real images; the images and the atlas."""
    images = sorted(sample_dir.glob("*/*.JPEG"))[3::49][:16]
    ds = tmp_path_factory.mktemp("tiny") / "images.txt"
    ds.write_text("".join(f"{p}\n" for p in images))
    out = ds.parent / "atlas"
    summary = deepvis.build(layers=LAYER, units="0:2", presets="none", dataset=str(ds), k=3, out=str(out),
                            progress=False, actors=1)
    return images, out, summary


def test_build_summary(tiny):
    _, out, summary = tiny
    assert summary["status"] == "complete" and summary["failed_shards"] == []
    assert summary["units"] == 2 and summary["layers"] == 1 and summary["images_seen"] == 16
    assert (out / layout.TOPK).is_file() and (out / layout.UNITS).is_file()


def test_top_crops_equal_stored_objects(tiny):
    _, out, _ = tiny
    atlas, reader = deepvis.open(out), Reader.open(str(out))
    for u in (0, 1):
        for kind in ("top", "bottom"):
            rows = getattr(atlas.unit(LAYER, u), kind)(3)
            want = reader.top_images(LAYER, u, 3, kind)
            assert [(r.rank, r.image, r.y, r.x, r.box) for r in rows] == [
                (w["rank"], w["image"], w["y"], w["x"], (w["x0"], w["y0"], w["x1"], w["y1"])) for w in want]
            for r, w in zip(rows, want):
                # schema 3: the crop is the row's box cut from its stored input image, exactly
                stored = out / w["crop"]
                assert w["crop"] == layout.input_key(r.image) and r.crop_box == r.box
                assert np.array_equal(np.asarray(r.crop), np.asarray(Image.open(stored).crop(r.box)))
                assert r.crop.size == (r.box[2] - r.box[0], r.box[3] - r.box[1])
                jpeg = Image.open(io.BytesIO(r.crop_bytes))   # re-encoded at quality 95: close, not equal
                assert jpeg.format == "JPEG" and jpeg.size == r.crop.size
                assert np.abs(np.asarray(jpeg, dtype=int) - np.asarray(r.crop, dtype=int)).mean() < 3


def brute_maps(lite0, images) -> np.ndarray:
    """(N, C) spatial maxima of LAYER by a plain forward hook, independent of the API's code path."""
    maps = []
    h = lite0.module.get_submodule(LAYER).register_forward_hook(lambda _m, _i, o: maps.append(o.detach()))
    try:
        with torch.no_grad():
            lite0.module(torch.stack([preprocess(Image.open(p), lite0.preprocessing) for p in images]))
    finally:
        h.remove()
    return maps[0].amax(dim=(2, 3)).numpy()


def test_query_image_matches_brute_force(tiny, lite0, sample_dir):
    images, out, _ = tiny
    dataset_max = brute_maps(lite0, images)[:, :2].max(0)
    outside = sorted(sample_dir.glob("*/*.JPEG"))[1]
    atlas = deepvis.open(out)
    for query in (images[5], outside):
        vals = brute_maps(lite0, [query])[0, :2]
        want = sorted(((float(vals[u] / dataset_max[u]), u) for u in (0, 1) if dataset_max[u] > 0), reverse=True)
        hits = atlas.query_image(str(query), layer=LAYER, k=2)
        assert [h.unit for h in hits] == [u for _, u in want]
        assert [h.relative for h in hits] == pytest.approx([r for r, _ in want], rel=1e-4)
        assert [h.activation for h in hits] == pytest.approx([float(vals[u]) for _, u in want], rel=1e-4, abs=1e-5)
    # a PIL image works the same as a path; the CLI prints the same numbers (one implementation)
    pil = atlas.query_image(Image.open(images[5]), layer=LAYER, k=2)
    assert pil == atlas.query_image(images[5], layer=LAYER, k=2)
    r = cli("query", out, "--image", images[5], "--layer", LAYER, "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert [(h["unit"], h["relative"]) for h in json.loads(r.stdout)] == [(h.unit, pytest.approx(h.relative)) for h in pil]


# ---------------------------------------------------------------- untrusted atlases, errors, S3
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_atlas(tmp_path_factory.mktemp("synthetic") / "atlas", big_units=16)


def test_repr_escapes_atlas_strings(synthetic):
    atlas = deepvis.open(synthetic["root"])
    fc0 = atlas.unit(OUT, 0)
    assert fc0.top(1)[0].image == f"odd/{XSS_FILE}" and fc0.label == XSS_LABEL
    assert dataclasses.asdict(fc0.top(1)[0]) == {   # plain data: no store inside
        "layer": OUT, "unit": 0, "kind": "top", "rank": 0, "activation": fc0.top(1)[0].activation,
        "image": f"odd/{XSS_FILE}", "y": 0, "x": 1, "box": (0, 0, 100, 120), "crop_key": atlas.reader.top_images(OUT, 0, 1)[0]["crop"],
        "crop_box": None}   # schema 1: the object is the crop
    for markup in (fc0._repr_html_(), atlas.unit(XSS_LAYER, 1)._repr_html_(), atlas._repr_html_()):
        assert_safe(markup)
        assert "<img src=x" not in markup and "<script>" not in markup and "<b>bold" not in markup
    assert html.escape(XSS_FILE) in fc0._repr_html_() and html.escape(XSS_LABEL) in fc0._repr_html_()
    whole = atlas._repr_html_()
    assert html.escape(XSS_LAYER) in whole and html.escape("<script>alert(4)</script>") in whole
    # a missing crop is a placeholder in the HTML and an error naming it when asked for
    layer, unit, kind, rank = synthetic["missing_crop"]
    row = atlas.unit(layer, unit).bottom()[rank]
    assert "missing" in atlas.unit(layer, unit)._repr_html_()
    with pytest.raises(deepvis.DeepvisError, match=f"crop {re.escape(row.crop_key)} missing"):
        row.crop


def test_diversity_images(synthetic, tmp_path):
    """Unit.images(preset): the `--diversity n` set, <preset>.png then <preset>.<i>.png, those present."""
    root = tmp_path / "atlas"
    shutil.copytree(synthetic["root"], root)
    store = Reader.open(str(root)).store
    m = layout.read_manifest(store)
    m["optimization"]["diversity"] = 3
    layout.put_json(store, layout.MANIFEST, m)
    extra = Image.new("RGB", (32, 32), (200, 10, 10))
    extra.save(root / layout.unit_key(OUT, 2, layout.preset_image("yosinski-3", 2)))
    unit = deepvis.open(root).unit(OUT, 2)
    imgs = unit.images("yosinski-3")
    assert len(imgs) == 2 and np.array_equal(np.asarray(imgs[1]), np.asarray(extra))
    assert np.array_equal(np.asarray(imgs[0]), np.asarray(unit.image()))
    assert sum(t == "img" for t, _ in tags_of(unit._repr_html_())) == 2 + 1 + 3 + 3   # + yosinski-1
    m["optimization"]["diversity"], m["k"] = "lots", "x"          # garbage in a manifest: no traceback
    layout.put_json(store, layout.MANIFEST, m)
    assert len(deepvis.open(root).unit(OUT, 2).images("yosinski-3")) == 1


def test_errors_are_deepvis_errors_with_the_cli_message(synthetic, tmp_path):
    root = synthetic["root"]
    atlas = deepvis.open(root)
    for call, args in ((lambda: deepvis.open(tmp_path / "none"), (tmp_path / "none", "--layer", OUT, "--unit", 0)),
                       (lambda: atlas.unit("nope", 0), (root, "--layer", "nope", "--unit", 0)),
                       (lambda: atlas.unit(OUT, 10), (root, "--layer", OUT, "--unit", 10))):
        with pytest.raises(deepvis.DeepvisError) as e:
            call()
        r = cli("query", *args)
        assert r.returncode == 2 and r.stderr.strip() == f"deepvis query: error: {e.value}"
    with pytest.raises(deepvis.DeepvisError, match="unit 9 of layer 'block.2' is not in this atlas"):
        atlas.unit(MID, 9)
    with pytest.raises(deepvis.DeepvisError, match="preset 'lucid' is not in this atlas"):
        atlas.unit(OUT, 1).image("lucid")
    with pytest.raises(deepvis.DeepvisError, match=r"unknown key\(s\) bogus in deepvis.build\(\)"):
        deepvis.build(bogus=1)
    with pytest.raises(deepvis.DeepvisError, match="k must be at least 1"):
        deepvis.build(k=0)


def test_query_image_never_runs_the_atlas_code(synthetic, tmp_path, monkeypatch, sample_dir):
    """A manifest naming package.module:callable: nothing is imported without model=."""
    (tmp_path / "evil_model.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n"
                                            "import torch\ndef make(): return torch.nn.Identity()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "atlas"
    shutil.copytree(synthetic["root"], root)
    m = layout.read_manifest(Reader.open(str(root)).store)
    m["model"]["name"] = "evil_model:make"
    layout.put_json(Reader.open(str(root)).store, layout.MANIFEST, m)
    photo = sorted(sample_dir.glob("*/*.JPEG"))[0]
    with pytest.raises(deepvis.DeepvisError, match=r"'evil_model:make', which is not a built-in model.*pass --model SPEC"):
        deepvis.open(root).query_image(photo, layer=OUT)
    r = cli("query", root, "--image", photo, "--layer", OUT)
    assert r.returncode == 2 and "never chooses code to run" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "ran").exists() and "evil_model" not in sys.modules
    m["model"].update(name="efficientnet_lite0", weights="/some/checkpoint.pt")
    layout.put_json(Reader.open(str(root)).store, layout.MANIFEST, m)
    with pytest.raises(deepvis.DeepvisError, match=r"checkpoint '/some/checkpoint.pt', a file outside the atlas; pass --weights PATH"):
        deepvis.open(root).query_image(photo, layer=OUT)


def test_s3_atlas(synthetic, tmp_path, monkeypatch):
    from deepvis.storage.s3 import S3Store
    from tests.s3server import SeaweedNotFound, SeaweedServer
    try:
        s3 = SeaweedServer(tmp_path / "weed", bucket="atlas")
    except SeaweedNotFound as e:
        pytest.skip(str(e))
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3.start()
    try:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        store = S3Store("atlas", "runs/one", endpoint_url=s3.endpoint_url)
        for f in sorted(synthetic["root"].rglob("*")):
            if f.is_file():
                store.put(f.relative_to(synthetic["root"]).as_posix(), f.read_bytes())
        local, remote = deepvis.open(synthetic["root"]), deepvis.open("s3://atlas/runs/one", s3.endpoint_url)
        assert remote.layers == local.layers   # NaN stats (no dataset pass) compare by their repr
        assert repr(remote.units().to_pylist()) == repr(local.units().to_pylist())
        a, b = local.unit(OUT, 3), remote.unit(OUT, 3)
        assert np.array_equal(np.asarray(a.image()), np.asarray(b.image())) and repr(a.stats) == repr(b.stats)
        assert [r.crop_bytes for r in a.top()] == [r.crop_bytes for r in b.top()]
        assert_safe(b._repr_html_())
    finally:
        s3.stop()


def test_import_is_light():
    code = ("import sys, deepvis, deepvis.storage.atlas; "
            "print(sorted(m for m in ('torch', 'ray', 'deepvis.api') if m in sys.modules), deepvis.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    mods, version = r.stdout.split("] ")
    assert mods == "[" and re.fullmatch(r"\d+\.\d+.*|0\+unknown", version.strip())
