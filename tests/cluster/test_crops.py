"""The crop phase (cluster/crops.py, atlas schema 3): each distinct source image's preprocessed input
once, by Ray tasks on several worker processes; every row's crop, its box cut from that input, equals
cropping the unit's box from its image directly; resumable."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import deepvis.cluster.build as build_mod
import deepvis.cluster.crops as crops
from deepvis.cluster.build import run_build
from deepvis.cluster.config import BuildConfig
from deepvis.storage import layout
from deepvis.storage.store import LocalStore

LAYERS = ["_blocks.1", "_blocks.3", "_fc"]   # small boxes .. the whole input (_fc)


@pytest.fixture(scope="module")
def dataset(sample_dir, tmp_path_factory) -> Path:
    ds = tmp_path_factory.mktemp("crops-ds")
    for f in sorted(sample_dir.glob("*/*.JPEG"))[::50][:10]:
        shutil.copy(f, ds / f.name)
    return ds


def build(out, ds, log=print):
    cfg = BuildConfig(model="efficientnet_lite0", layers=",".join(LAYERS), units="0:4", presets="none",
                      dataset=str(ds), k=3, out=str(out), progress=False, actors=1)
    return run_build(cfg, log=log)


@pytest.fixture(scope="module")
def atlas(ray_cluster, dataset, tmp_path_factory):
    """One build, 1 actor, 1 dataset shard; tasks of 3 images so there are several."""
    out = tmp_path_factory.mktemp("crops-atlas")
    mp = pytest.MonkeyPatch()
    mp.setattr(crops, "TASK_IMAGES", 3)
    logs: list[str] = []
    # the driver's order of events, in the log: the receptive sweep is started before any pass runs
    start = crops.start_receptive
    mp.setattr(crops, "start_receptive", lambda *a: logs.append("event: start_receptive") or start(*a))
    run_shards = build_mod._Build.run_shards
    mp.setattr(build_mod._Build, "run_shards",
               lambda self, phase, *a: logs.append(f"event: run_shards {phase}") or run_shards(self, phase, *a))
    try:
        summary = build(out, dataset, log=logs.append)
    finally:
        mp.undo()
    assert summary["status"] == "complete", summary["failed_shards"]
    return out, logs


def records(out: Path) -> dict[str, dict]:
    store = LocalStore(out)
    return {k: layout.get_json(store, k) for k in store.list(layout.RECORDS + "/crops/")}


def jpeg_pixels(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=crops.JPEG_QUALITY)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_inputs_once_per_image_and_every_crop_equals_its_own(atlas, dataset):
    """One input object per distinct image of the rows: the image preprocessed and JPEG-encoded, pixel
    for pixel; every (layer, unit, kind, rank) row's crop, as the API cuts it, is the unit's box cut from
    its image directly (exactly the box of the stored input; within JPEG error of the raw pixels)."""
    import deepvis
    from deepvis.tasks.models import load_model
    from deepvis.tasks.preprocess import crop_input

    out, _ = atlas
    rows = pq.read_table(out / layout.TOPK).to_pylist()
    assert len(rows) == len(LAYERS) * 4 * 2 * 3
    pre = load_model("efficientnet_lite0", None).preprocessing
    assert all(r["input"] == layout.input_key(r["image"]) for r in rows)
    distinct = {r["input"] for r in rows}
    assert len(distinct) == len({r["image"] for r in rows}) < len(rows)
    assert {p.relative_to(out).as_posix() for p in (out / layout.INPUTS).iterdir()} == distinct
    assert not (out / "crops").exists()
    ref = {r["image"]: crop_input(Image.open(dataset / r["image"]), pre) for r in rows}
    for image, img in ref.items():
        assert np.array_equal(np.asarray(Image.open(out / layout.input_key(image)).convert("RGB")),
                              jpeg_pixels(img)), image
    unit = deepvis.open(str(out)).unit
    for layer, u in {(r["layer"], r["unit"]) for r in rows}:
        for kind in ("top", "bottom"):
            for t in unit(layer, u).top(3) if kind == "top" else unit(layer, u).bottom(3):
                want = ref[t.image].crop(t.box)
                got = np.asarray(t.crop.convert("RGB"))
                assert t.crop.size == want.size and t.crop_box == t.box
                assert np.array_equal(got, jpeg_pixels(ref[t.image])[t.box[1]:t.box[3], t.box[0]:t.box[2]])
                # JPEG q90 with chroma subsampling: a few levels on textured patches; a shifted box: tens
                assert np.abs(got.astype(int) - np.asarray(want, dtype=int)).mean() < 10, (layer, u, kind)


def test_receptive_sweep_overlaps_the_passes_only_with_gpu_actors(atlas):
    """The sweep depends on the architecture alone. With GPU actors the build starts it before the
    optimization and dataset passes (the nodes' CPUs are idle then); CPU actors hold every core, so
    on this CPU cluster it starts after them, in the crop phase."""
    from deepvis.cluster.build import actor_layout, overlap_sweep
    from deepvis.cluster.config import BuildConfig

    _, logs = atlas
    events = [line[len("event: "):] for line in logs if line.startswith("event: ")]
    assert events == ["run_shards optimization", "run_shards dataset", "start_receptive"], events
    assert not overlap_sweep(actor_layout(BuildConfig(device="cpu", out="x")))
    assert overlap_sweep((8, {"num_gpus": 1, "num_cpus": 1}, 2))


def test_boxes_equal_the_per_layer_receptive_boxes(atlas):
    """The one sweep shipped to the crop tasks gives the boxes `receptive_boxes` gives per layer."""
    from deepvis.tasks.models import load_model
    from deepvis.tasks.receptive import receptive_field_maps

    out, _ = atlas
    lm = load_model("efficientnet_lite0", None)
    rows = pq.read_table(out / layout.TOPK).to_pylist()
    for layer in ("_blocks.1", "_fc"):
        rf = receptive_field_maps(lm.module, [layer], lm.input_size)[layer]   # this layer alone
        for r in (r for r in rows if r["layer"] == layer):
            y, x = (0, 0) if rf.shape == (1, 1) else (r["y"], r["x"])
            assert (r["x0"], r["y0"], r["x1"], r["y1"]) == rf.box(y, x)
    state = layout.unpack_state((out / crops.RECEPTIVE).read_bytes())
    assert [str(n) for n in state["layers"]] == LAYERS


def test_crop_tasks_run_on_more_than_one_process(atlas):
    """1 actor and 1 dataset shard, yet the crops are cut by Ray tasks in worker processes of their own,
    not in the driver. (How many processes Ray uses depends on timing: a worker that finishes its task
    before a second worker has started takes the next one, so the count of PIDs is not asserted.)"""
    import os
    out, logs = atlas
    recs = records(out)
    assert len(recs) >= 3
    pids = {r["summary"]["pid"] for r in recs.values()}
    assert pids and os.getpid() not in pids, pids
    assert sum(r["summary"]["inputs"] for r in recs.values()) == len(list((out / layout.INPUTS).iterdir()))
    assert any("input images, written by" in line for line in logs)


def test_resume_skips_finished_crop_tasks(atlas, dataset, tmp_path):
    """A re-run skips every finished crop task (and the receptive sweep) and writes no input again;
    a deleted record's task alone runs again."""
    out, _ = atlas
    copy = tmp_path / "atlas"
    shutil.copytree(out, copy)
    before = {p: p.stat().st_mtime_ns for p in (copy / layout.INPUTS).iterdir()}
    rf_before = (copy / crops.RECEPTIVE).stat().st_mtime_ns
    rec = sorted((copy / layout.RECORDS / "crops").iterdir())[0]
    redo = layout.get_json(LocalStore(copy), layout.record_key("crops/" + rec.stem))
    rec.unlink()
    mp = pytest.MonkeyPatch()
    mp.setattr(crops, "TASK_IMAGES", 3)
    logs: list[str] = []
    try:
        assert build(copy, dataset, log=logs.append)["status"] == "complete"
    finally:
        mp.undo()
    assert (copy / crops.RECEPTIVE).stat().st_mtime_ns == rf_before
    assert any(f"{len(records(out)) - 1} finished crop task(s) skipped, 1 to run" in line for line in logs), logs
    again = {p for p in before if p.stat().st_mtime_ns != before[p]}
    assert len(again) == redo["summary"]["inputs"] > 0
    assert pq.read_table(copy / layout.TOPK).equals(pq.read_table(out / layout.TOPK))


TWO_NODES = r'''
import json, sys, time
import ray
from ray.cluster_utils import Cluster
import deepvis.cluster.build as build_mod
import deepvis.cluster.crops as crops
from deepvis.cluster.build import run_build
from deepvis.cluster.config import BuildConfig

real_task = crops.crop_task

def slow_task(*args, **kwargs):
    # long enough that the second task's lease (a cold worker on the other node) is granted while the
    # first still runs: a short task lets one leased worker take both, which says nothing of placement
    time.sleep(3)
    return real_task(*args, **kwargs)

crops.crop_task = slow_task        # pickled by value: the workers run this wrapper
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="ERROR")
cluster.wait_for_nodes()
try:
    dataset, out = sys.argv[1], sys.argv[2]
    cfg = BuildConfig(model="efficientnet_lite0", layers="_fc", units="0:4", presets="none", dataset=dataset,
                      k=3, out=out, progress=False, actors=2, shard_images=1000,
                      batch_size=1000)    # one batch: one dataset shard (shards are whole batches)
    summary = run_build(cfg, log=lambda *a: None)
    print(json.dumps({"status": summary["status"], "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}))
finally:
    ray.shutdown()
    cluster.shutdown()
'''


def test_crop_tasks_spread_over_both_nodes_after_one_dataset_shard(dataset, tmp_path):
    """Two nodes of 1 CPU, 2 actors, ONE dataset shard (done by one actor on one node): the crop phase
    still runs on both nodes (one task per cluster CPU, SPREAD), each task's record naming its node.
    In a subprocess: this test needs its own two-node cluster, and the session's Ray is already up."""
    import json
    import subprocess
    import sys

    out = tmp_path / "atlas"
    r = subprocess.run([sys.executable, "-c", TWO_NODES, str(dataset), str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["status"] == "complete" and len(res["nodes"]) == 2
    data = list((out / layout.RECORDS / "data").iterdir())
    assert len(data) == 1                                   # one dataset shard
    recs = list(records(out).values())
    assert len(recs) == 2 and {r["summary"]["node"] for r in recs} == set(res["nodes"]), recs
    assert sum(r["summary"]["inputs"] for r in recs) == len(list((out / layout.INPUTS).iterdir()))


def test_finished_records_are_read_concurrently_and_checked(tmp_path):
    """A resume's record reads (shards and crop tasks): several GETs at once, and only the records
    whose hash matches count; a damaged or stale one is redone, a missing one is not read."""
    from tests.storage.test_get_many import SlowStore
    store = SlowStore(tmp_path, delay=0.01)
    shards = [{"id": f"opt/l/{i}-{i + 1}", "hash": f"h{i}"} for i in range(40)]
    for i, s in enumerate(shards[:36]):
        rec = {"id": s["id"], "hash": s["hash"] if i % 9 else "stale", "summary": {"i": i}}
        layout.put_json(store, layout.record_key(s["id"]), rec)
    store.put(layout.record_key(shards[1]["id"]), b"{damaged")
    want = {s["id"]: {"i": i} for i, s in enumerate(shards[:36]) if i % 9 and i != 1}
    assert build_mod._finished_records(store, shards) == want
    assert store.calls == 36 and 1 < store.peak <= 16       # the 4 missing ones never read
    tasks = [crops.CropTask(f"crops/{i:05d}", s["hash"], []) for i, s in enumerate(shards)]
    for t, s in zip(tasks, shards):
        if s["id"] in want:
            layout.put_json(store, layout.record_key(t.id), {"id": t.id, "hash": t.hash, "summary": want[s["id"]]})
    store.peak = 0
    assert crops._done_records(store, tasks) == {t.id: want[s["id"]] for t, s in zip(tasks, shards) if s["id"] in want}
    assert store.peak > 1
