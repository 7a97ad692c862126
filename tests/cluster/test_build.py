"""`deepvis build` through a real local Ray cluster on the real offline model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepvis.cluster.build import run_build
from deepvis.cluster.config import BuildConfig
from deepvis.storage import layout

LAYERS = ["_blocks.1", "_fc"]
UNITS = [0, 1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def small_dataset(sample_dir, tmp_path_factory) -> str:
    """A list file naming 40 real ImageNet images (every 20th of the sample)."""
    files = sorted(p.relative_to(sample_dir).as_posix() for p in sample_dir.glob("*/*.JPEG"))[::20]
    path = tmp_path_factory.mktemp("ds") / "images.txt"
    path.write_text("".join(f"{sample_dir / f}\n" for f in files))
    return str(path)


def cfg_for(out, dataset, **kw) -> BuildConfig:
    base = dict(layers=",".join(LAYERS), units="0:6", presets="yosinski-3", steps=12, size=48,
                dataset=dataset, shard_units=2, shard_images=10, batch_size=10, k=3, out=str(out), progress=False)
    return BuildConfig(**{**base, **kw})


TIMES = ("version", "generated", "build")  # when/how long the build ran: differs run to run by nature


def atlas_files(root: Path) -> dict[str, bytes]:
    """Every object of the atlas that must be deterministic (not the build's own bookkeeping)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        if not p.is_file() or key.startswith(("_build/", "manifest.json")):
            continue
        data = p.read_bytes()
        if key.startswith("viewer/data/") and key.endswith(".json"):
            obj = json.loads(data)
            data = json.dumps({k: v for k, v in obj.items() if k not in TIMES}, sort_keys=True).encode()
        out[key] = data
    return out


@pytest.fixture(scope="module")
def reference(ray_cluster, small_dataset, tmp_path_factory):
    """A fault-free build with 2 actors."""
    out = tmp_path_factory.mktemp("ref")
    summary = run_build(cfg_for(out, small_dataset, actors=2))
    return out, summary


def test_build_writes_every_object_and_row(reference, small_dataset):
    out, summary = reference
    assert summary["status"] == "complete" and summary["failed_shards"] == []
    assert summary["units"] == len(LAYERS) * len(UNITS)
    files = atlas_files(out)
    n_images = len(Path(small_dataset).read_text().split())
    for layer in LAYERS:
        for u in UNITS:
            assert f"units/{layer}/{u}/yosinski-3.png" in files
    topk = pq.read_table(out / "index/topk.parquet")
    assert topk.schema.equals(layout.TOPK_SCHEMA)
    assert topk.num_rows == len(LAYERS) * len(UNITS) * 2 * 3
    rows = topk.to_pylist()
    # schema 3: every row names its image's input, one shared object per distinct image
    assert all(r["input"] == layout.input_key(r["image"]) and r["input"] in files for r in rows)
    assert {k for k in files if k.startswith("inputs/")} == {r["input"] for r in rows}
    assert not [k for k in files if k.startswith("crops/")]
    assert not [k for k in files if k.endswith(".jpg") and k.startswith("units/")]
    assert all(0 <= r["x0"] < r["x1"] <= 224 and 0 <= r["y0"] < r["y1"] <= 224 for r in rows)
    units = pq.read_table(out / "index/units.parquet").to_pylist()
    assert [(r["layer"], r["unit"]) for r in units] == [(l, u) for l in LAYERS for u in UNITS]
    assert all(r["count"] == n_images and r["opt_yosinski-3"] == r["opt_yosinski-3"] for r in units)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and [l["name"] for l in m["layers"]] == LAYERS
    assert m["dataset"]["images"] == n_images and m["dataset"]["images_skipped"] == 0
    assert m["model"]["preprocessing"]["crop"] == 224 and len(m["model"]["labels"]) == 1000
    phases = m["build"]["phases"]
    assert set(phases) >= {"plan", "actors", "optimization", "dataset", "merge", "crops", "index", "viewer"}
    assert all(v >= 0 for v in phases.values()) and phases["optimization"] > 0 and phases["dataset"] > 0
    # the phases do not overlap and cover the build (but for a few bookkeeping calls between them)
    assert 0.85 * m["build"]["seconds"] <= sum(phases.values()) <= m["build"]["seconds"] + 0.05
    assert summary["phases"] == phases


def test_status_shows_the_phases(reference, capsys):
    from deepvis.cli import main
    out, summary = reference
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["phases"] == summary["phases"]
    assert main(["status", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("time: plan ") and " merge " in last and " viewer " in last and "; total " in last


def test_status_of_a_finished_atlas_reads_the_index_not_the_records(reference, tmp_path):
    """A finished atlas's status comes from index/units.parquet: the same counts the records give,
    without fetching them (a whole network's are hundreds of MB), and a stale record of another
    sharding does not count twice; a running build's status still reads the records."""
    import shutil

    from deepvis.storage import atlas
    from deepvis.storage.store import LocalStore
    out, _ = reference
    copy = tmp_path / "a"
    shutil.copytree(out, copy)
    store = LocalStore(copy)
    m, rows = atlas.layer_status(store)
    by_records = atlas._record_counts(store)
    assert atlas._index_counts(store, ["yosinski-3"]) == by_records
    assert {r["layer"]: (r["done"], r["dead"]) for r in rows} == {l: by_records[l] for l in LAYERS}
    assert all(r["done"] == len(UNITS) for r in rows)
    stale = layout.get_json(store, layout.record_key("opt/_fc/0-1"))
    layout.put_json(store, layout.record_key("opt/_fc/0-0"), stale)    # an older build's shard of unit 0-1
    assert atlas.layer_status(store)[1] == rows
    read = []
    real_get = LocalStore.get
    store.get = lambda k: read.append(k) or real_get(store, k)
    atlas.layer_status(store)
    assert not [k for k in read if k.startswith(layout.RECORDS)]
    layout.put_json(store, layout.MANIFEST, {**m, "status": "running"})
    running = {r["layer"]: r["done"] for r in atlas.layer_status(store)[1]}
    assert running["_fc"] == len(UNITS) + 2 and [k for k in read if k.startswith(layout.RECORDS)]
    store.delete(layout.UNITS)
    layout.put_json(store, layout.MANIFEST, m)                          # no index: the records
    assert {r["layer"]: r["done"] for r in atlas.layer_status(store)[1]} == running


def test_one_actor_same_bytes_as_two(reference, small_dataset, tmp_path):
    out, _ = reference
    lines: list[str] = []
    summary = run_build(cfg_for(tmp_path, small_dataset, actors=1), log=lines.append)
    assert summary["status"] == "complete"
    # what the build is about to do comes first, then a line as each later phase begins or ends
    assert lines[0].startswith(f"plan: {len(LAYERS) * len(UNITS)} units in {len(LAYERS)} layers, presets yosinski-3, "
                               f"{summary['images']} images: 6 optimization and ") and "for 1 CPU actor(s)" in lines[0]
    assert [l.split(":")[0] for l in lines] == ["plan", "merge", "crops", "viewer"], lines
    a, b = atlas_files(out), atlas_files(tmp_path)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # run again: nothing to compute, and the manifest holds what this run did, not the first one's
    first = json.loads((tmp_path / "manifest.json").read_text())["build"]["phases"]
    summary = run_build(cfg_for(tmp_path, small_dataset, actors=1))
    phases = json.loads((tmp_path / "manifest.json").read_text())["build"]["phases"]
    assert summary["shards_computed"] == 0 and summary["actors"] == []
    assert phases["optimization"] < 0.05 and phases["dataset"] < 0.05 and phases["crops"] < first["crops"]


def test_killed_actor_shard_is_redone(reference, small_dataset, tmp_path):
    """Kill one actor process by PID mid-build: the build completes, equal to the fault-free one."""
    pids = []
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline:
            done = list((tmp_path / "_build/done").rglob("*.json")) if (tmp_path / "_build/done").exists() else []
            if done and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run_build(cfg_for(tmp_path, small_dataset, actors=2),
                        on_actor=lambda actor, info: pids.append(info["pid"]))
    t.join(5)
    assert killed, "the actor was never killed"
    assert len(pids) >= 3, "no replacement actor was started"
    assert summary["status"] == "complete" and summary["shards_skipped"] == 0
    # the same atlas as the fault-free build with the same parameters
    a, b = atlas_files(reference[0]), atlas_files(tmp_path)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


def test_interrupted_build_resumes_only_unfinished(small_dataset, tmp_path):
    args = [sys.executable, "-m", "deepvis.cli", "build", "--layers", ",".join(LAYERS), "--units", "0:6",
            "--presets", "yosinski-3", "--steps", "40", "--size", "48", "--shard-units", "1",
            "--dataset", small_dataset, "--shard-images", "10", "--batch-size", "10", "--k", "3",
            "--out", str(tmp_path), "--no-progress", "--actors", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = tmp_path / "_build/done"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and len(list(records.rglob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the build finished before it could be interrupted"
    before = {p: p.stat().st_mtime_ns for p in records.rglob("*.json")}
    total = len(LAYERS) * len(UNITS) + 4  # opt shards of one unit + dataset shards of 10 images
    assert 0 < len(before) < total
    summary = run_build(BuildConfig(layers=",".join(LAYERS), units="0:6", presets="yosinski-3", steps=40, size=48,
                                    shard_units=1, dataset=small_dataset, shard_images=10, batch_size=10, k=3,
                                    out=str(tmp_path), progress=False, actors=2))
    assert summary["status"] == "complete"
    assert summary["shards_skipped"] == len(before)
    assert summary["shards_computed"] == total - len(before)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished shards untouched
    # a changed parameter recomputes the optimization shards, not the dataset shards
    summary = run_build(BuildConfig(layers=",".join(LAYERS), units="0:6", presets="yosinski-3", steps=41, size=48,
                                    shard_units=1, dataset=small_dataset, shard_images=10, batch_size=10, k=3,
                                    out=str(tmp_path), progress=False, actors=2))
    assert summary["shards_skipped"] == 4 and summary["shards_computed"] == len(LAYERS) * len(UNITS)


@pytest.mark.parametrize("extra,msg", [
    (["--layers", "nope"], "unknown layer 'nope'"),
    (["--layers", "_blocks.1", "--units", "40:50"], "beyond layer '_blocks.1'"),
    (["--address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
    (["--presets", "yosinski-9"], "yosinski-9"),
    (["--dataset", "/no/such/dir"], "/no/such/dir"),
])
def test_bad_input_fails_before_work(extra, msg, tmp_path):
    out = tmp_path / "atlas"
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "deepvis.cli", "build", "--out", str(out), "--no-progress"] + extra,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr
    assert not (out / "manifest.json").exists()
    assert time.time() - t < 60


def test_config_file_rejects_unknown_keys(tmp_path):
    from deepvis.tasks.errors import UserError
    p = tmp_path / "b.toml"
    p.write_text('model = "efficientnet_lite0"\nstepz = 3\n')
    with pytest.raises(UserError, match="unknown key.*stepz"):
        BuildConfig.from_toml(str(p))
    p.write_text('[build]\nlayers = "_fc"\nsteps = 5\n')
    cfg = BuildConfig.from_toml(str(p), {"steps": 7})
    assert cfg.layers == "_fc" and cfg.steps == 7


def test_actor_layout_per_node(monkeypatch):
    """One GPU actor per GPU with the smallest GPU node's CPUs per GPU (a head with many CPUs must not
    inflate it); `--device cuda` asks for GPU actors before any GPU node is up; CPU: one per core."""
    import ray

    from deepvis.cluster.build import actor_layout
    from deepvis.cluster.config import BuildConfig

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0}},                       # head, no GPU
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
             {"Alive": True, "Resources": {"CPU": 48.0, "GPU": 4.0}},
             {"Alive": False, "Resources": {"CPU": 2.0, "GPU": 1.0}}]            # gone
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 72.0, "GPU": 5.0})
    cfg = BuildConfig(model="efficientnet_lite0", out="x")
    n, opts, threads = actor_layout(cfg)
    assert (n, opts, threads) == (5, {"num_gpus": 1, "num_cpus": 8, "scheduling_strategy": "SPREAD"}, 8)
    n, opts, _ = actor_layout(BuildConfig(model="efficientnet_lite0", out="x", device="cpu"))
    assert n == 72 and opts == {"num_cpus": 1.0, "scheduling_strategy": "SPREAD"}
    monkeypatch.setattr(ray, "nodes", lambda: nodes[:1])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    n, opts, _ = actor_layout(BuildConfig(model="efficientnet_lite0", out="x", device="cuda", actors=8))
    assert n == 8 and opts["num_gpus"] == 1 and opts["num_cpus"] == 1
    n, opts, _ = actor_layout(BuildConfig(model="efficientnet_lite0", out="x"))
    assert n == 16 and "num_gpus" not in opts


def test_modern_presets_diversity_and_quality_columns(ray_cluster, small_dataset, tmp_path):
    """lucid + maco with --diversity 2 next to yosinski-3: every image (and the extra diverse ones)
    is written, maco's PNG carries its transparency map as alpha, and index/units.parquet holds the
    quality measures with ratio = act / the dataset max."""
    from PIL import Image
    out = tmp_path / "atlas"
    summary = run_build(cfg_for(out, small_dataset, presets="yosinski-3,lucid,maco", diversity=2, units="0:2",
                                steps=6, layers="_fc"))
    assert summary["status"] == "complete", summary["failed_shards"]
    for u in (0, 1):
        d = out / "units" / "_fc" / str(u)
        names = sorted(p.name for p in d.glob("*.png"))
        assert names == ["lucid.1.png", "lucid.png", "maco.1.png", "maco.png", "yosinski-3.png"], names
        with Image.open(d / "maco.png") as im:
            assert im.mode == "RGBA" and im.getextrema()[3][1] == 255      # alpha scaled to its 99th pct
        with Image.open(d / "lucid.png") as im:
            assert im.mode == "RGB"
        assert not (d / "yosinski-3.1.png").exists()                      # the paper's loop: one image
    rows = pq.read_table(out / layout.UNITS).to_pylist()
    assert len(rows) == 2
    for r in rows:
        for p in ("yosinski-3", "lucid", "maco"):
            for q in ("act", "hf"):
                assert r[f"{q}_{p}"] == r[f"{q}_{p}"], (p, q)             # not NaN
            # robustness is a ratio to the image's own activation: defined where that is positive
            assert (r[f"robust_{p}"] == r[f"robust_{p}"]) == (r[f"act_{p}"] > 0), (p, r)
            assert r[f"ratio_{p}"] == pytest.approx(r[f"act_{p}"] / r["max"], rel=1e-5)
    m = json.loads((out / layout.MANIFEST).read_text())
    assert m["optimization"]["diversity"] == 2
    assert [p.get("kind") for p in m["presets"]] == [None, "modern", "modern"]
