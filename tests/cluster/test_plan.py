"""`deepvis build --dry-run`: the plan and its counts, checked against what a real build writes."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from deepvis.cli import main
from deepvis.cluster import build as build_mod
from deepvis.cluster.build import dry_run, run_build
from deepvis.cluster.config import BuildConfig
from deepvis.cluster.estimate import schedule


@pytest.fixture
def no_ray(monkeypatch):
    """A dry run that tried to start or join Ray would fail here."""
    def refuse(*a, **kw):
        raise AssertionError("dry run started Ray")
    monkeypatch.setattr(build_mod, "connect", refuse)


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(["build", *argv])
    return rc, capsys.readouterr().out


def test_full_default_layers_plan_writes_nothing(no_ray, capsys, tmp_path):
    out = tmp_path / "atlas"
    rc, text = run_cli(capsys, "--dry-run", "--json", "--presets", "none", "--out", str(out))
    d = json.loads(text)
    assert rc == 0 and d["dry_run"] is True
    assert len(d["layers"]) == 66 and d["units"] == 23816
    assert d["shards"] == {"opt": 0, "data": 0, "crop": 0}
    assert d["seconds"]["total"] > 0
    assert not out.exists() and list(tmp_path.iterdir()) == []
    rc, text = run_cli(capsys, "--dry-run", "--presets", "none", "--out", str(out))
    assert rc == 0 and "units: 23,816" in text and "layers: 66" in text and not out.exists()


def test_dry_run_key_from_config_file(no_ray, capsys, tmp_path):
    cfg = tmp_path / "build.toml"
    cfg.write_text(f'layers = "_fc"\nunits = "0:5"\ndry_run = true\nout = "{tmp_path / "a"}"\n')
    rc, text = run_cli(capsys, "--config", str(cfg), "--json")
    d = json.loads(text)
    assert rc == 0 and d["units"] == 5 and d["objects"]["opt_png"] == 5 and not (tmp_path / "a").exists()
    cfg.write_text('dry_run = "yes"\n')
    assert main(["build", "--config", str(cfg)]) == 2
    assert "dry_run must be true or false" in capsys.readouterr().err


def kinds(root: Path) -> Counter:
    """The objects of a built store by kind, by their keys alone (independent of cluster.estimate)."""
    c: Counter = Counter()
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        key = p.relative_to(root).as_posix()
        kind = ("opt_png" if key.startswith("units/") and key.endswith(".png") else
                "input_jpg" if key.startswith("inputs/") and key.endswith(".jpg") else
                "records" if key.startswith("_build/done/") else
                "states" if key.startswith("_build/state/") or key == "_build/receptive.npz" else
                "index" if key.startswith("index/") else
                "manifest" if key == "manifest.json" else
                "viewer" if key.startswith("viewer/") else key)
        c[kind] += 1
    return c


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def test_predicted_objects_equal_a_tiny_builds(ray_cluster, sample_dir, tmp_path, monkeypatch):
    files = sorted(sample_dir.glob("*/*.JPEG"))[::80][:10]
    ds = tmp_path / "images.txt"
    ds.write_text("".join(f"{f}\n" for f in files))
    cfg = dict(layers="_blocks.1", units="0:3", presets="yosinski-3", steps=2, size=32, dataset=str(ds),
               shard_images=4, batch_size=4, progress=False, actors=2)
    out = tmp_path / "atlas"
    fresh = dry_run(BuildConfig(**cfg, out=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()
    summary = run_build(BuildConfig(**cfg, out=str(out)))
    assert summary["status"] == "complete" and summary["images_seen"] == 10
    built, predicted = dict(kinds(out)), {k: v for k, v in fresh["objects"].items() if v}
    # one input image per distinct image of the top/bottom lists: the prediction is their upper
    # bound, every image of the dataset
    assert 0 < built.pop("input_jpg") <= predicted.pop("input_jpg") == 10
    assert built == predicted and fresh["shards"] == {"opt": 1, "data": 3, "crop": 2}   # 10 images, 2 CPUs
    stored = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert 0.5 < sum(fresh["bytes"].values()) / stored < 2      # bytes are estimates: within 2x

    before = snapshot(out)      # a dry run on the built store: listed and read, never modified
    monkeypatch.setattr(build_mod, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("Ray")))
    again = dry_run(BuildConfig(**cfg, out=str(out)))
    assert snapshot(out) == before
    assert again["shards_done"] == again["shards"] == fresh["shards"]


def test_schedule_is_list_scheduling():
    assert schedule([], 4) == 0
    assert schedule([3.0], 4) == 3.0                       # one shard: one actor works
    assert schedule([1.0] * 4, 2) == 2.0
    assert schedule([4.0, 1.0, 1.0, 1.0, 1.0], 2) == 4.0   # in order: 4 on one actor, the rest on the other


def test_build_json_is_the_only_stdout(ray_cluster, capsys, sample_dir, tmp_path):
    """`deepvis build --json | jq`: the build's messages (the crop phase's line) go to stderr."""
    ds = tmp_path / "images.txt"
    ds.write_text("".join(f"{f}\n" for f in sorted(sample_dir.glob("*/*.JPEG"))[:3]))
    rc = main(["build", "--layers", "_blocks.1", "--units", "0:2", "--presets", "none", "--dataset", str(ds),
               "--out", str(tmp_path / "atlas"), "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["status"] == "complete"
    assert "input images, written by" in err


def _brute_sizes(images: int, batch: int, cap: int, actors: int) -> list[int]:
    """The fewest shards that is a multiple of the actors and holds every batch with at most
    ceil(cap / batch) batches a shard, found by trying counts; batches spread as evenly as possible."""
    batches = -(-images // batch)
    per = -(-cap // batch)
    count = next(c for c in range(actors, 10 * batches + actors, actors) if c * per >= batches)
    count = min(count, batches)
    spread = [batches // count + (1 if i < batches % count else 0) for i in range(count)]
    sizes = [b * batch for b in spread]
    sizes[-1] -= batches * batch - images
    return sizes


@pytest.mark.parametrize("actors", [1, 2, 3, 8])
def test_data_shards_are_whole_batches_balanced_over_the_actors(actors):
    from deepvis.cluster.build import data_shard_sizes

    for images in [1, 9, 10, 11, 40, 100, 799, 800, 801, 12_345]:
        for batch, cap in [(10, 10), (32, 200), (7, 30), (64, 64)]:
            sizes = data_shard_sizes(images, batch, cap, actors)
            assert sizes == _brute_sizes(images, batch, cap, actors), (images, batch, cap)
            assert sum(sizes) == images and all(s % batch == 0 for s in sizes[:-1]) and sizes[-1] > 0
            assert max(sizes[:-1] or sizes) - min(sizes[:-1] or sizes) <= batch
            assert max(sizes) <= -(-cap // batch) * batch
            assert len(sizes) % actors == 0 or len(sizes) == -(-images // batch)   # fewer batches than actors
    # the benchmark's case: 800 images in batches of 32 on 2 actors was 7+7+7+4 batches (14 vs 11)
    assert data_shard_sizes(800, 32, 200, 2) == [224, 192, 192, 192]
    assert data_shard_sizes(800, 32, 200, 2, count=3) == [288, 256, 256]   # an earlier run's count is kept
    assert data_shard_sizes(0, 32, 200, 2) == []


def test_a_resume_on_another_cluster_keeps_the_dataset_shards(sample_dir, tmp_path):
    """The sharding follows the actors, so a resume on a cluster of another size would lose its
    finished dataset shards: the manifest records the count and the next plan keeps it."""
    from deepvis.cluster.build import _planned_data_shards, _write_manifest, make_plan, make_shards
    from deepvis.storage.store import open_store

    cfg = BuildConfig(layers="_fc", units="0:3", presets="none", dataset=str(sample_dir), shard_images=300,
                      batch_size=100, out=str(tmp_path / "a"), progress=False)
    first = make_plan(cfg)
    assert len(first.images) == 800
    make_shards(first, actors=2)
    assert [len(s["images"]) for s in first.data_shards] == [200] * 4      # 8 batches: 2 each
    store = open_store(cfg.out)
    assert _planned_data_shards(store, first) is None            # nothing there yet
    _write_manifest(store, first, status="running", started=0.0)
    again = make_plan(cfg)
    make_shards(again, actors=1, store=store)
    assert [(s["id"], s["hash"]) for s in again.data_shards] == [(s["id"], s["hash"]) for s in first.data_shards]
    fresh = make_plan(cfg)
    make_shards(fresh, actors=1)                                 # without the manifest: 3 batches at most
    assert [len(s["images"]) for s in fresh.data_shards] == [300, 300, 200]
    other = make_plan(dataclasses.replace(cfg, batch_size=50))  # other batches: plan afresh
    make_shards(other, actors=1, store=store)
    assert _planned_data_shards(store, other) is None and len(other.data_shards) == 3


def test_dataset_shard_caps_follow_the_device(tmp_path):
    """Without --shard-images a GPU plan's shards hold up to 4,096 images (each shard's partial state
    of every unit is written and merged: fewer, larger shards on a device that does thousands of
    images a second), a CPU plan's up to 200; --shard-images overrides both."""
    from deepvis.cluster.build import make_plan, make_shards
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"n{i % 10:08d}/{i:06d}.JPEG\n" for i in range(10_000)))

    def sizes(gpu: bool, **keys) -> list[int]:
        plan = make_plan(BuildConfig(layers="_fc", units="0:3", presets="none", dataset=str(lst),
                                     out=str(tmp_path / "a"), progress=False, **keys))
        make_shards(plan, gpu=gpu, actors=2)
        return [len(s["images"]) for s in plan.data_shards]
    gpu, cpu = sizes(True), sizes(False)
    assert sum(gpu) == sum(cpu) == 10_000
    assert len(gpu) == 4 and max(gpu) <= 4096 and all(n % 32 == 0 for n in gpu[:-1])   # 313 batches of 32
    assert len(cpu) == 50 and max(cpu) <= 200 and all(n % 8 == 0 for n in cpu)         # 1,250 batches of 8
    assert len(sizes(True, shard_images=1000)) == 10 and len(sizes(False, shard_images=1000)) == 10


def test_crop_estimate_spreads_over_the_clusters_cpus(tmp_path):
    """The crop tasks run on every CPU of the cluster, not one an actor: given the CPUs, the estimate
    makes the tasks the build would (crops.task_size over those CPUs) and schedules them on all."""
    from deepvis.cluster import crops
    from deepvis.cluster.build import make_plan, make_shards
    from deepvis.cluster.estimate import crop_shard_count, estimate
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"n{i % 10:08d}/{i:06d}.JPEG\n" for i in range(20_000)))
    plan = make_plan(BuildConfig(layers="_fc", units="0:3", presets="none", dataset=str(lst),
                                 out=str(tmp_path / "a"), progress=False))
    make_shards(plan, gpu=True, actors=8)

    def est(cpus):
        return estimate(plan, device="cuda", actors=8, local_ray=False, s3=True, plan_seconds=0,
                        static_files=3, cpus=cpus)
    eight, many = est(None), est(128)
    assert eight.shards["crop"] == crop_shard_count(plan, 8) == -(-20_000 // crops.task_size(20_000, 8))
    assert many.shards["crop"] == -(-20_000 // crops.task_size(20_000, 128)) >= eight.shards["crop"]
    from deepvis.cluster.estimate import COSTS
    sweep = COSTS["cuda"].crop_sweep
    assert (many.seconds["crops"] - sweep) < (eight.seconds["crops"] - sweep) / 10   # 16x the CPUs
    assert est(4).seconds == eight.seconds          # never fewer CPUs than actors
