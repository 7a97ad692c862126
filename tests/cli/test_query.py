"""Dataset pass through the build driver, then `deepvis query`, checked against brute force."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import deepvis
from deepvis.cli.build import print_summary
from deepvis.cluster.build import run_build
from deepvis.cluster.config import BuildConfig
from deepvis.storage.atlas import Atlas
from deepvis.tasks.preprocess import preprocess

LAYERS = ["_blocks.3", "_fc"]


@pytest.fixture(scope="module")
def images(sample_dir) -> list:
    return sorted(sample_dir.glob("*/*.JPEG"))[::25]   # 32 real images


def dataset_cfg(out, dataset, **kw) -> BuildConfig:
    return BuildConfig(**{**dict(layers=",".join(LAYERS), presets="none", dataset=dataset, k=4,
                                 shard_images=8, batch_size=8, out=str(out), progress=False, actors=2), **kw})


@pytest.fixture(scope="module")
def atlas(ray_cluster, sample_dir, images, tmp_path_factory):
    ds = tmp_path_factory.mktemp("ds") / "images.txt"
    ds.write_text("".join(f"{p}\n" for p in images))
    out = tmp_path_factory.mktemp("atlas")
    summary = run_build(dataset_cfg(out, str(ds)))
    assert summary["status"] == "complete"
    return out, str(ds)


@pytest.fixture(scope="module")
def brute(lite0, images):
    """All activations in memory (plain hooks on the full forward), independent of the reducer."""
    maps = {}
    hooks = [lite0.module.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: maps.setdefault(n, []).append(o.detach().clone())) for n in LAYERS]
    try:
        with torch.no_grad():
            for i in range(0, len(images), 8):
                lite0.module(torch.stack([preprocess(Image.open(p), lite0.preprocessing) for p in images[i:i + 8]]))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v).numpy() for n, v in maps.items()}


def brute_rows(brute, images, layer, unit, kind, k):
    a = brute[layer][:, unit]
    rows = []
    for i, p in enumerate(images):
        if a.ndim == 1:
            v, y, x = float(a[i]), 0, 0
        else:
            flat = int(np.argmax(a[i].reshape(-1)))
            v, y, x = float(a[i].reshape(-1)[flat]), flat // a.shape[2], flat % a.shape[2]
        rows.append((v, str(p), y, x))
    rows.sort(key=lambda r: (-r[0] if kind == "top" else r[0], r[1]))
    return rows[:k]


@pytest.mark.parametrize("layer,unit", [("_blocks.3", 7), ("_blocks.3", 39), ("_fc", 1), ("_fc", 963)])
@pytest.mark.parametrize("kind", ["top", "bottom"])
def test_query_cli_matches_brute_force(atlas, brute, images, layer, unit, kind):
    out, _ = atlas
    args = [sys.executable, "-m", "deepvis.cli", "query", str(out), "--layer", layer, "--unit", str(unit),
            "-k", "4", "--json"] + (["--bottom"] if kind == "bottom" else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    want = brute_rows(brute, images, layer, unit, kind, 4)
    assert [(r["rank"], r["image"], r["y"], r["x"]) for r in rows] == [(i, w[1], w[2], w[3]) for i, w in enumerate(want)]
    assert [r["activation"] for r in rows] == pytest.approx([w[0] for w in want], rel=1e-4, abs=1e-4)
    # the Python API returns the same, and every row's input image exists, is a real JPEG of the
    # model's input size, and holds the row's box
    api = Atlas.open(str(out)).top_images(layer, unit, 4, kind)
    assert [(a["image"], a["rank"]) for a in api] == [(r["image"], r["rank"]) for r in rows]
    for a in api:
        img = Image.open(out / a["crop"])
        assert img.format == "JPEG" and img.size == (224, 224)
        assert a["crop_box"] == [a["x0"], a["y0"], a["x1"], a["y1"]]
        assert 0 <= a["x0"] < a["x1"] <= 224 and 0 <= a["y0"] < a["y1"] <= 224


def test_units_stats_match_brute_force(atlas, brute):
    out, _ = atlas
    rows = pq.read_table(out / "index/units.parquet").to_pylist()
    for r in rows:
        a = brute[r["layer"]][:, r["unit"]]
        v = a if a.ndim == 1 else a.reshape(len(a), -1).max(1)
        assert r["max"] == pytest.approx(float(v.max()), rel=1e-5)
        assert r["mean"] == pytest.approx(float(v.mean()), rel=1e-4, abs=1e-5)
        assert r["std"] == pytest.approx(float(v.std()), rel=1e-3, abs=1e-5)
        assert r["frac_positive"] == pytest.approx(float((v > 0).mean()))
    assert len(rows) == 40 + 1000


def test_one_shard_vs_four_identical_parquet(atlas, tmp_path):
    """The reference atlas has 4 shards of 8 images on 2 actors; this one 1 shard of 32 on 1 actor."""
    out, ds = atlas
    run_build(dataset_cfg(tmp_path, ds, shard_images=32, actors=1))
    for name in ("index/topk.parquet", "index/units.parquet"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_reverse_query_by_image(atlas, images):
    out, _ = atlas
    r = subprocess.run([sys.executable, "-m", "deepvis.cli", "query", str(out), "--image", str(images[0]),
                        "--layer", "_fc", "-k", "3", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and rows[0]["relative"] >= rows[1]["relative"] >= rows[2]["relative"]
    # the image is in the dataset, so its best unit reaches that unit's dataset maximum
    assert rows[0]["relative"] == pytest.approx(1.0, abs=1e-3) or rows[0]["relative"] > 0.5
    bad = subprocess.run([sys.executable, "-m", "deepvis.cli", "query", str(out), "--image", "/no/such.jpg"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot read image" in bad.stderr


def test_status_reports_layers(atlas):
    out, _ = atlas
    r = subprocess.run([sys.executable, "-m", "deepvis.cli", "status", str(out), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["status"] == "complete"
    assert [(l["layer"], l["expected"], l["done"], l["failed"]) for l in s["layers"]] == [
        ("_blocks.3", 40, 40, 0), ("_fc", 1000, 1000, 0)]


def test_query_bad_input(atlas):
    out, _ = atlas
    for args, msg in ((["--layer", "nope", "--unit", "0"], "layer 'nope' is not in this atlas"),
                      (["--layer", "_fc", "--unit", "1000"], "unit 1000 out of range")):
        r = subprocess.run([sys.executable, "-m", "deepvis.cli", "query", str(out), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_files_skipped_counted_and_named(ray_cluster, sample_dir, tmp_path):
    ds = tmp_path / "ds"
    (ds / "good").mkdir(parents=True)
    real = sorted(sample_dir.glob("*/*.JPEG"))[:3]
    for p in real:
        shutil.copy(p, ds / "good" / p.name)
    data = real[0].read_bytes()
    (ds / "bad").mkdir()
    (ds / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (ds / "bad" / "empty.jpg").write_bytes(b"")
    (ds / "bad" / "text.jpg").write_text("not an image")
    Image.open(real[1]).convert("L").save(ds / "good" / "gray.png")
    Image.open(real[2]).convert("CMYK").save(ds / "good" / "cmyk.jpg")
    out = tmp_path / "atlas"
    summary = run_build(BuildConfig(layers="_fc", presets="none", dataset=str(ds), k=2, out=str(out),
                                    progress=False, actors=1))
    assert summary["status"] == "complete"
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"]["images"] == 8 and m["dataset"]["images_seen"] == 5 and m["dataset"]["images_skipped"] == 3
    assert sorted(s["image"] for s in m["dataset"]["skipped"]) == ["bad/empty.jpg", "bad/text.jpg", "bad/truncated.jpg"]
    assert all(s["reason"] for s in m["dataset"]["skipped"])
    printed = io.StringIO()
    print_summary(summary, printed)         # what `deepvis build` prints: counts, a reason and an example each
    lines = printed.getvalue().splitlines()
    at = lines.index("  dataset: 5 images searched, 3 skipped as unreadable")
    assert lines[at + 1: at + 5] == ["    1 empty file, e.g. 'bad/empty.jpg'",
                                     "    1 not an image (unknown format), e.g. 'bad/text.jpg'",
                                     "    1 truncated, e.g. 'bad/truncated.jpg'",
                                     "    every image and its reason: manifest.json, dataset.skipped"]
    seen = {r["image"] for r in pq.read_table(out / "index/topk.parquet").to_pylist()}
    assert {"good/gray.png", "good/cmyk.jpg"} & seen or len(seen) >= 2


@pytest.mark.parametrize("schema", [1, 2, 3])
def test_query_and_api_read_every_crop_layout(tmp_path, schema):
    """An atlas of schema 1 (per-unit crop objects, no `crop` column), one of schema 2 (shared
    crops/<sha>.jpg named by the `crop` column) and one of schema 3 (one inputs/<sha>.jpg per image,
    named by the `input` column, the crop its box cut from it): `deepvis query` and Atlas.top_images
    name an existing object for every row (and for schema 3 the box to cut), None/missing only for
    the crop that was never written."""
    from deepvis.storage import layout
    from deepvis.storage.atlas import CropRef, crop_ref
    from tests.atlas_viewer.conftest import MID, make_synthetic_atlas

    facts = make_synthetic_atlas(tmp_path / "atlas", big_units=4, schema=schema)
    store = facts["store"]
    atlas = Atlas.open(str(tmp_path / "atlas"))
    prefix = {1: f"units/{MID}/0/", 2: "crops/", 3: "inputs/"}[schema]
    for kind in ("top", "bottom"):
        rows = atlas.top_images(MID, 0, 3, kind)
        assert [r["rank"] for r in rows] == [0, 1, 2]
        for r in rows:
            missing = (MID, 0, kind, r["rank"]) == facts["missing_crop"]
            assert store.exists(r["crop"]) != missing, r
            assert r["crop"].startswith(prefix)
            assert r["crop_box"] == ([r["x0"], r["y0"], r["x1"], r["y1"]] if schema == 3 else None)
    table = layout.read_table(store, layout.TOPK)
    assert ("crop" in table.column_names) == (schema == 2) and ("input" in table.column_names) == (schema == 3)
    assert crop_ref({"layer": "a", "unit": 3, "kind": "top", "rank": 1}, 1) == CropRef("units/a/3/top-1.jpg")
    r = subprocess.run([sys.executable, "-m", "deepvis.cli", "query", str(tmp_path / "atlas"), "--layer", MID,
                        "--unit", "0", "-k", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = [x["crop"] + (" box {},{},{},{}".format(*x["crop_box"]) if x["crop_box"] else "")
            for x in atlas.top_images(MID, 0, 2)]
    assert [line.split("->")[-1].strip() for line in r.stdout.splitlines()[1:]] == want
    # --save: every row's crop as a file, equal to the API's; the never-written one is skipped, named
    saved = tmp_path / "saved"
    r = subprocess.run([sys.executable, "-m", "deepvis.cli", "query", str(tmp_path / "atlas"), "--layer", MID,
                        "--unit", "0", "-k", "3", "--bottom", "--save", str(saved)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = deepvis.open(str(tmp_path / "atlas")).unit(MID, 0).bottom(3)
    missing_rank = facts["missing_crop"][3]
    assert sorted(p.name for p in saved.iterdir()) == [f"bottom-{i}.jpg" for i in range(3) if i != missing_rank]
    for t in rows:
        if t.rank != missing_rank:
            # the synthetic schema 1 and 2 crop objects are 24 px squares; schema 3's are cut to the box
            img = Image.open(saved / f"bottom-{t.rank}.jpg")
            assert img.size == ((t.box[2] - t.box[0], t.box[3] - t.box[1]) if schema == 3 else (24, 24))
            assert (saved / f"bottom-{t.rank}.jpg").read_bytes() == t.crop_bytes
    assert f"bottom {missing_rank}: no crop saved" in r.stderr and "Traceback" not in r.stderr
