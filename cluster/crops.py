"""The crop phase of `deepvis build`: what every unit's top/bottom-k dataset crops need, written
once per DISTINCT source image, by Ray tasks on the whole cluster's CPUs (atlas schema 3).

1. Receptive fields once per build: one sweep of every selected layer (`tasks.receptive.
   all_layer_maps`) in one Ray task (started with the build when the actors are GPU actors: it
   overlaps the optimization and dataset passes), stored as `_build/receptive.npz` with the hash of
   what they depend on (model, input size, layers): a resumed build reads them back.
2. The driver maps every (layer, unit, kind, rank) of the merged top-k to its box (numpy indexing of
   the maps: index/topk.parquet's x0..y1) and to the key of its image's preprocessed input,
   `inputs/<sha256(image)[:24]>.jpg` (`storage.layout.input_key`). A crop is the box cut from that
   input by whoever shows it (viewer, API, query), so a full-network build stores one object per
   distinct top/bottom image (100 here) instead of one per distinct (image, box) (65,419 in schema 2:
   217 s of PUTs into S3, BENCHMARKS.md).
3. The distinct images are grouped into tasks of TASK_IMAGES (in image-id order; fewer a task when
   that spreads them over more of the cluster's CPUs); a task decodes, preprocesses (resize, centre
   crop) and encodes each as JPEG, writes them with WRITERS uploads in flight, then its completion
   record `_build/done/crops/NNNNN.json` (hash, pid, node, unreadable images).
   A re-run skips tasks whose record matches and writes nothing again.

No GPU actor does crop work: the tasks ask for CROP_CPUS of a CPU (fractional, so they never wait
behind an actor that holds a whole core on a 2-core machine), or for none when the build's idle
actors hold every CPU of the cluster; the driver keeps at most one task per cluster CPU in flight.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from deepvis.storage import layout
from deepvis.storage.store import Store

RECEPTIVE = "_build/receptive.npz"
TASK_IMAGES = 64          # source images per task (decode + resize + JPEG: ~10 ms each on one core)
CROP_CPUS = 0.5            # Ray CPUs per crop task
WRITERS = 8                # object writes in flight per task
JPEG_QUALITY = 90
VERSION = 3                # of the crop work: part of every task's hash


@dataclass
class CropIndex:
    """What `_topk_rows` needs: per (layer, kind) the boxes (units x k x 4: x0, y0, x1, y1, in the
    layer's `selected` order) and the input-image keys (units x k, None where the image could not be
    read or its task failed)."""
    boxes: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    keys: dict[tuple[str, str], list[list[str | None]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)   # task id -> error
    entries: int = 0          # (layer, unit, kind, rank) rows
    distinct: int = 0         # distinct (image, box) crops: what schema 2 stored, for the log
    images: int = 0           # distinct source images: the input objects written
    tasks: int = 0
    skipped: int = 0          # tasks finished by an earlier run
    pids: set[int] = field(default_factory=set)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class CropTask:
    id: str                                   # 'crops/NNNNN'
    hash: str
    images: list[str]                         # image ids, each written as inputs/<sha>.jpg


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ---------------------------------------------------------------- receptive fields, once per build
def _rf_hash(plan) -> str:
    from deepvis.cluster.build import _base_hash
    return _hash({**_base_hash(plan), "rf": 1, "input_size": plan.model["input_size"],
                  "layers": [l["name"] for l in plan.layers]})


def _rf_task(model: str, weights: str | None, layers: list[str]) -> dict[str, np.ndarray]:
    """In a Ray worker: load the model (on CPU), sweep every layer once; {name: (4, H, W) int32}."""
    import torch

    from deepvis.tasks.models import load_model
    from deepvis.tasks.receptive import all_layer_maps

    torch.set_num_threads(max(1, os.cpu_count() or 1))  # the cluster is otherwise idle at this point
    lm = load_model(model, weights)
    maps = all_layer_maps(lm.module, layers, lm.input_size)
    return {n: np.stack([m.x0, m.y0, m.x1, m.y1]).astype(np.int32) for n, m in maps.items()}


def start_receptive(store: Store, plan):
    """The receptive-field maps, or their sweep under way: {layer: maps} read back from
    `_build/receptive.npz` when its hash matches, else a Ray task's ObjectRef. With GPU actors the
    build starts it before the optimization and dataset passes, which it does not depend on (only
    on the architecture: cluster.build.overlap_sweep), so that it costs no wall time; else the crop
    phase starts it. It asks for no CPU: an actor must never wait for it, and after the passes the
    actors may still hold every CPU."""
    import ray

    h = _rf_hash(plan)
    data = store.get_or_none(RECEPTIVE)
    if data is not None:
        state = layout.unpack_state(data)
        if str(state.get("hash")) == h:
            return {l["name"]: np.asarray(state["maps"][f"L{i}"]) for i, l in enumerate(plan.layers)}
    names = [l["name"] for l in plan.layers]
    task = ray.remote(_rf_task).options(num_cpus=0, max_retries=2)
    return task.remote(plan.cfg.model, plan.cfg.weights, names)


def receptive_maps(store: Store, plan, started=None) -> dict[str, np.ndarray]:
    """{layer: (4, H, W) int32 boxes}: what `start_receptive` started (or started now), waited for;
    a fresh sweep is stored as `_build/receptive.npz` (hash, layers, maps) for a resumed build."""
    import ray

    started = start_receptive(store, plan) if started is None else started
    if isinstance(started, dict):
        return started
    maps = ray.get(started)
    names = [l["name"] for l in plan.layers]
    store.put(RECEPTIVE, layout.pack_state({"hash": _rf_hash(plan), "layers": names,
                                            "maps": {f"L{i}": maps[n] for i, n in enumerate(names)}}))
    return maps


# ---------------------------------------------------------------- planning (driver)
def _layer_boxes(rf: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(units, k) map positions -> (units, k, 4) boxes; an N x C layer's one box for every position."""
    h, w = rf.shape[1:]
    ys = np.zeros_like(ys) if (h, w) == (1, 1) else ys
    xs = np.zeros_like(xs) if (h, w) == (1, 1) else xs
    if ys.size and (ys.min() < 0 or xs.min() < 0 or ys.max() >= h or xs.max() >= w):
        raise ValueError(f"a top-k position lies outside the {h} x {w} map of its layer")
    return np.moveaxis(rf[:, ys, xs], 0, -1).astype(np.int32)


def plan_crops(plan, merged: dict, rf: dict[str, np.ndarray], cpus: int = 1) -> tuple[CropIndex, list[CropTask]]:
    """Boxes and input keys of every top/bottom-k entry, and the tasks that write the distinct
    source images' inputs (in image-id order: the same top-k and cluster give the same tasks)."""
    index = CropIndex()
    key_of: dict[str, str] = {}             # image -> key: one sha256 per distinct image
    boxes_seen: set[tuple] = set()
    for l in plan.layers:
        res, sel = merged[l["name"]].result(), np.asarray(l["selected"], dtype=np.int64)
        for kind in ("top", "bottom"):
            r = res[kind]
            images = np.asarray(r["image"], dtype=object)[sel]
            boxes = _layer_boxes(rf[l["name"]], np.asarray(r["y"])[sel], np.asarray(r["x"])[sel])
            keys = [[None] * images.shape[1] for _ in range(len(sel))]
            for i, j in np.ndindex(*images.shape):
                img = str(images[i, j])
                key = key_of.get(img)
                if key is None:
                    key = key_of[img] = layout.input_key(img)
                keys[i][j] = key
            boxes_seen.update(zip(images.ravel().tolist(), map(bytes, boxes.reshape(-1, 4))))
            index.boxes[(l["name"], kind)], index.keys[(l["name"], kind)] = boxes, keys
            index.entries += images.size
    index.distinct, index.images = len(boxes_seen), len(key_of)
    return index, _group(plan, sorted(key_of), task_size(len(key_of), cpus))


def task_size(images: int, cpus: int) -> int:
    """Images per crop task: TASK_IMAGES, or fewer when that would leave CPUs of the cluster idle
    (100 images on a 2-CPU cluster: 2 tasks of 50, one per CPU, not 2 of 64 and 36)."""
    return max(1, min(TASK_IMAGES, -(-images // max(1, cpus))))


def _group(plan, images: list[str], per_task: int) -> list[CropTask]:
    from deepvis.cluster.build import _base_hash, _dataset_uri
    base = {**_base_hash(plan), "crops": VERSION, "dataset": _dataset_uri(plan.cfg.dataset),
            "quality": JPEG_QUALITY}
    out = []
    for n, lo in enumerate(range(0, len(images), per_task)):
        tid, part = f"crops/{n:05d}", images[lo:lo + per_task]
        out.append(CropTask(tid, _hash({**base, "id": tid, "images": part}), part))
    return out


# ---------------------------------------------------------------- the crop task (a Ray worker)
def crop_task(task: CropTask, store: Store, dataset: str, pre: dict, endpoint_url: str | None) -> dict:
    """Decode each image, preprocess it (resize, centre crop: the model's input, not normalized),
    encode it as JPEG, write it (WRITERS in flight), then the completion record. Returns the record's
    summary: pid, inputs written, unreadable images."""
    from concurrent.futures import ThreadPoolExecutor

    from deepvis.storage.datasets import BadImage, dataset_root, read_image
    from deepvis.tasks.preprocess import crop_input

    root = dataset_root(dataset)
    bad: dict[str, str] = {}
    written = 0
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        pending = []
        for image_id in task.images:
            try:
                img = crop_input(read_image(root, image_id, endpoint_url=endpoint_url), pre)
            except BadImage as e:   # vanished or changed since the dataset pass: rows stay, no crop
                bad[image_id] = str(e)
                continue
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=JPEG_QUALITY)
            pending.append(pool.submit(store.put, layout.input_key(image_id), buf.getvalue()))
            written += 1
        for f in pending:
            f.result()              # a failed write fails the task (it is retried, then reported)
    summary = {"pid": os.getpid(), "node": _node_id(), "inputs": written, "bad": bad}
    layout.put_json(store, layout.record_key(task.id), {"id": task.id, "hash": task.hash, "summary": summary})
    return summary


def _node_id() -> str | None:
    """The Ray node this task runs on (None outside Ray): the records show where the work went."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:   # noqa: BLE001 -- a record without its node is still a record
        return None


def _task_cpus() -> float:
    """CROP_CPUS when the cluster has that much free, else 0: the build's idle actors may hold every
    CPU (one actor per core), and a task that waits for them would wait until the build ends."""
    import ray
    return CROP_CPUS if ray.available_resources().get("CPU", 0) >= CROP_CPUS else 0


def _done_records(store: Store, tasks: list[CropTask]) -> dict[str, dict]:
    return layout.matching_records(store, layout.RECORDS + "/crops/", {t.id: t.hash for t in tasks})


# ---------------------------------------------------------------- the phase (driver)
def run_crop_phase(store: Store, plan, merged: dict, log=print, receptive=None) -> CropIndex:
    """Receptive fields once (`receptive`: what start_receptive started at the build's start, waited
    for here), then every distinct source image's input once; returns the CropIndex `_topk_rows`
    turns into index/topk.parquet's box and input columns. Failed tasks are in `.failed`."""
    t0 = time.perf_counter()
    rf = receptive_maps(store, plan, receptive)
    t1 = time.perf_counter()
    import ray
    index, tasks = plan_crops(plan, merged, rf, int(ray.cluster_resources().get("CPU", 1)))
    t2 = time.perf_counter()
    summaries = _done_records(store, tasks)
    todo = [t for t in tasks if t.id not in summaries]
    index.tasks, index.skipped = len(tasks), len(tasks) - len(todo)
    if index.skipped:
        log(f"crops: {index.skipped} finished crop task(s) skipped, {len(todo)} to run")
    fresh = _run_tasks(store, plan, todo, index.failed)
    summaries.update(fresh)
    index.pids = {int(s["pid"]) for s in fresh.values()}
    _drop_missing(index, tasks, summaries)
    index.seconds = {"receptive": round(t1 - t0, 2), "plan": round(t2 - t1, 2),
                     "write": round(time.perf_counter() - t2, 2)}
    log(f"crops: {index.entries} top/bottom entries ({index.distinct} distinct boxes) cut from "
        f"{index.images} input images, written by {index.tasks} task(s) on {len(index.pids)} process(es); "
        f"seconds {index.seconds}")
    return index


def _run_tasks(store: Store, plan, todo: list[CropTask], failed: dict[str, str]) -> dict[str, dict]:
    """Run the tasks, at most one per cluster CPU in flight; task id -> summary of the finished ones."""
    import ray

    from deepvis.storage.errors import StoreError

    if not todo:
        return {}
    remote = ray.remote(crop_task).options(num_cpus=_task_cpus(), max_retries=2, scheduling_strategy="SPREAD")
    cap = max(1, int(ray.cluster_resources().get("CPU", 1)))
    store_ref = ray.put(store)
    cfg = plan.cfg
    queue, running, out = list(reversed(todo)), {}, {}
    while queue or running:
        while queue and len(running) < cap:
            t = queue.pop()
            running[remote.remote(t, store_ref, cfg.dataset, plan.model["preprocessing"], cfg.endpoint_url)] = t
        ready, _ = ray.wait(list(running), num_returns=1)
        t = running.pop(ready[0])
        try:
            out[t.id] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, StoreError):   # the store is unreachable: every task would fail
                raise e.cause from None
            failed[t.id] = str(e.cause or e).strip().splitlines()[-1][:2000]
        except ray.exceptions.RayError as e:       # the worker died (killed, out of memory)
            failed[t.id] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:2000]}"
    return out


def _drop_missing(index: CropIndex, tasks: list[CropTask], summaries: dict[str, dict]) -> None:
    """Keys of inputs that were not written (an unreadable image, a failed task) become None."""
    missing = set()
    for t in tasks:
        bad = (summaries.get(t.id) or {}).get("bad") if t.id in summaries else None
        for image_id in t.images:
            if t.id not in summaries or image_id in (bad or {}):
                missing.add(layout.input_key(image_id))
    if not missing:
        return
    for keys in index.keys.values():
        for row in keys:
            for j, k in enumerate(row):
                if k in missing:
                    row[j] = None
