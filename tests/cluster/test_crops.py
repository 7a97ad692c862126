"""The crop phase (cluster/crops.py): each distinct (image, box) once, by Ray tasks on several worker
processes, equal pixel for pixel to cropping every unit's box from its image directly; resumable."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

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
    """One build, 1 actor, 1 dataset shard; tasks of ~12 crops so there are several."""
    out = tmp_path_factory.mktemp("crops-atlas")
    mp = pytest.MonkeyPatch()
    mp.setattr(crops, "TASK_CROPS", 12)
    logs: list[str] = []
    try:
        summary = build(out, dataset, log=logs.append)
    finally:
        mp.undo()
    assert summary["status"] == "complete", summary["failed_shards"]
    return out, logs


def records(out: Path) -> dict[str, dict]:
    store = LocalStore(out)
    return {k: layout.get_json(store, k) for k in store.list(layout.RECORDS + "/crops/")}


def test_distinct_crops_equal_each_units_own_crop(atlas, dataset):
    """Every (layer, unit, kind, rank) row's shared crop == its box cut from its image directly."""
    from deepvis.tasks.models import load_model
    from deepvis.tasks.preprocess import crop_input

    out, _ = atlas
    rows = pq.read_table(out / layout.TOPK).to_pylist()
    assert len(rows) == len(LAYERS) * 4 * 2 * 3
    pre = load_model("efficientnet_lite0", None).preprocessing
    distinct = {r["crop"] for r in rows}
    assert len(distinct) < len(rows)                 # _fc boxes are the whole input: shared
    assert {p.relative_to(out).as_posix() for p in (out / "crops").iterdir()} == distinct
    for r in rows:
        box = (r["x0"], r["y0"], r["x1"], r["y1"])
        ref = crop_input(Image.open(dataset / r["image"]), pre).crop(box)     # the unit's own crop
        buf = io.BytesIO()
        ref.save(buf, format="JPEG", quality=crops.JPEG_QUALITY)
        got = np.asarray(Image.open(out / r["crop"]).convert("RGB"))
        assert np.array_equal(got, np.asarray(Image.open(buf).convert("RGB"))), r


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
    assert sum(r["summary"]["crops"] for r in recs.values()) == len(list((out / "crops").iterdir()))
    assert any("distinct crops" in line for line in logs)


def test_resume_skips_finished_crop_tasks(atlas, dataset, tmp_path):
    """A re-run skips every finished crop task (and the receptive sweep) and writes no crop again;
    a deleted record's task alone runs again."""
    out, _ = atlas
    copy = tmp_path / "atlas"
    shutil.copytree(out, copy)
    before = {p: p.stat().st_mtime_ns for p in (copy / "crops").iterdir()}
    rf_before = (copy / crops.RECEPTIVE).stat().st_mtime_ns
    rec = sorted((copy / layout.RECORDS / "crops").iterdir())[0]
    redo = layout.get_json(LocalStore(copy), layout.record_key("crops/" + rec.stem))
    rec.unlink()
    mp = pytest.MonkeyPatch()
    mp.setattr(crops, "TASK_CROPS", 12)
    logs: list[str] = []
    try:
        assert build(copy, dataset, log=logs.append)["status"] == "complete"
    finally:
        mp.undo()
    assert (copy / crops.RECEPTIVE).stat().st_mtime_ns == rf_before
    assert any(f"{len(records(out)) - 1} finished crop task(s) skipped, 1 to run" in line for line in logs), logs
    again = {p for p in before if p.stat().st_mtime_ns != before[p]}
    assert len(again) == redo["summary"]["crops"]
    assert pq.read_table(copy / layout.TOPK).equals(pq.read_table(out / layout.TOPK))
