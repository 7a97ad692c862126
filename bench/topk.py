"""Benchmark of the dataset pass (issue 5): images/s of the full pass -- decode, preprocess, one
forward with hooks on every layer (spatial max + argmax reduced in the hooks), RunningTopK.add for
every unit of every layer -- against a bare forward of the same model and batches with no hooks,
in the same run.

Rows (all on the same batches):
  decode only        read_image + crop_input -> uint8 batches, thread pool (normalizing happens on
                     the model's device, bit-identical to tasks.preprocess.preprocess)
  bare forward       model(x) on batches already decoded (no hooks): the baseline
  decode + bare      the bare forward fed by the decode pool (what any pass over the data costs)
  forward + hooks    batch_unit_maxima(all layers) on batches already decoded (no reducer)
  hooks + reducers   the same, plus RunningTopK.add of every layer (reducer threads), no decode
  full pass          decode pool -> batch_unit_maxima(all layers) -> RunningTopK.add (all units)

Prints a table; writes (or replaces) the "## Dataset pass" section of BENCHMARKS.md, keeping the
other sections. Usage:
  python bench/topk.py [--dataset DIR|LIST] [--synthetic N] [--batch B] [--device cpu|cuda]
                       [--workers W] [--limit N] [--repeat R] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import queue
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepvis.storage.datasets import BadImage, dataset_root, list_images, read_image  # noqa: E402
from deepvis.tasks.activations import batch_unit_maxima, to_model_input  # noqa: E402
from deepvis.tasks.layers import resolve_layers  # noqa: E402
from deepvis.tasks.models import load_model  # noqa: E402
from deepvis.tasks.preprocess import crop_input  # noqa: E402
from deepvis.tasks.topk import RunningTopK  # noqa: E402

DEFAULT_DATASET = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "imagenet-sample")
SECTION = "## Dataset pass"


def synthetic_dataset(n: int, out_dir: str) -> str:
    """n JPEGs of ImageNet-like sizes cut from real photos (scikit-image's sample images) when
    available, else smooth random images. Returns the directory."""
    from PIL import Image
    photos = []
    try:
        from skimage import data as skdata
        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                     "motorcycle_left", "retina", "cat"):
            try:
                a = getattr(skdata, name)()
                if a.ndim == 3 and a.shape[2] == 3:
                    photos.append(Image.fromarray(a))
            except Exception:  # noqa: BLE001 - some need downloads
                pass
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    if not photos:
        for _ in range(4):
            small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            photos.append(Image.fromarray(small).resize((640, 480), Image.BICUBIC))
    angles = rng.uniform(-5, 5, n)
    for c in range(10):
        os.makedirs(os.path.join(out_dir, f"c{c}"), exist_ok=True)

    def make(i):
        w, h = [(500, 375), (375, 500), (500, 333), (640, 480), (400, 400)][i % 5]
        img = photos[i % len(photos)].resize((w, h), Image.BILINEAR).rotate(float(angles[i]))
        img.save(os.path.join(out_dir, f"c{i % 10}", f"img_{i:06d}.jpg"), quality=90)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(make, range(n)))
    return out_dir


def decode_chunk(root, ids, pre):
    """Worker: decode + crop a few images -> (ids kept, uint8 (n, H, W, 3) or None)."""
    keep, arrays = [], []
    for image_id in ids:
        try:
            arrays.append(np.asarray(crop_input(read_image(root, image_id), pre)))
            keep.append(image_id)
        except BadImage:
            pass
    return keep, (np.stack(arrays) if arrays else None)


def _decode_chunk_star(a):
    return decode_chunk(*a)


class Loader:
    """Batches of uint8 crops (B, H, W, 3), decoded `ahead` batches in advance by a thread pool
    (PIL releases the GIL while decoding) or, when given, a process pool (no GIL at all):
    read_image + crop_input; the float work (to [0, 1], normalize) happens on the model's device
    (tasks.activations.to_model_input, bit-identical to tasks.preprocess.preprocess)."""

    def __init__(self, root, ids, batch, pre, workers, ahead=3, pin=False, procs=None, sub=16):
        self.root, self.ids, self.batch, self.pre, self.pin = root, ids, batch, pre, pin
        self.threads = None if procs is not None else ThreadPoolExecutor(workers)
        self.procs, self.ahead, self.sub = procs, ahead, sub

    def _batches(self):
        chunks = [self.ids[s:s + self.batch] for s in range(0, len(self.ids), self.batch)]
        if self.procs is None:
            for c in chunks:
                yield list(self.threads.map(lambda i: decode_chunk(self.root, [i], self.pre), c))
            return
        subs = [[(self.root, c[s:s + self.sub], self.pre) for s in range(0, len(c), self.sub)] for c in chunks]
        results = self.procs.imap(_decode_chunk_star, [a for group in subs for a in group])
        for group in subs:
            yield [next(results) for _ in group]

    def __iter__(self):
        q: queue.Queue = queue.Queue(self.ahead)

        def produce():
            for parts in self._batches():
                keep = [i for k, _ in parts for i in k]
                x = torch.from_numpy(np.concatenate([a for _, a in parts if a is not None]))
                q.put((keep, x.pin_memory() if self.pin else x))
            q.put(None)
        threading.Thread(target=produce, daemon=True).start()
        while (item := q.get()) is not None:
            yield item


class Reducers:
    """RunningTopK of every layer, fed by `threads` threads, each owning a share of the layers
    (balanced by units), so that reduction overlaps the next forward and decode."""

    def __init__(self, infos, threads, k=9):
        self.topk = {i.name: RunningTopK(i.units, k) for i in infos}
        self.inline = threads == 0         # reduce in the caller's thread
        if self.inline:
            return
        groups = [[] for _ in range(max(1, threads))]
        load = [0] * len(groups)
        for i in sorted(infos, key=lambda i: -i.units):
            g = load.index(min(load))
            groups[g].append(i.name)
            load[g] += i.units
        self.groups = [g for g in groups if g]
        self.queues = [queue.Queue(3) for _ in self.groups]
        self.threads = [threading.Thread(target=self._loop, args=(g, q)) for g, q in zip(self.groups, self.queues)]
        for t in self.threads:
            t.start()

    def _loop(self, names, q):
        while (item := q.get()) is not None:
            keep, maxima = item
            for name in names:
                v, y, x = maxima[name]
                self.topk[name].add(v, y, x, keep)

    def put(self, keep, maxima):
        if self.inline:
            for name, (v, y, x) in maxima.items():
                self.topk[name].add(v, y, x, keep)
            return
        for q in self.queues:
            q.put((keep, maxima))

    def close(self):
        if self.inline:
            return self.topk
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join()
        return self.topk


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class _Setup:
    """What every row of run_bench shares: the device, the decode pool, the images, the model."""
    device: str
    batch: int
    workers: int
    procs: object                 # a spawn Pool, or None (threads)
    ids: list
    root: object
    lm: object
    infos: list
    dataset_desc: str
    tmp: str | None

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.infos]

    def loader(self, pin: bool = False):
        return Loader(self.root, self.ids, self.batch, self.lm.preprocessing, self.workers, pin=pin,
                      procs=self.procs)

    def close(self) -> None:
        if self.procs is not None:
            self.procs.close()
            self.procs.join()
        if self.tmp:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)


def _setup(args) -> _Setup:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (256 if device == "cuda" else 32)
    workers = args.workers or os.cpu_count() or 1
    procs = None
    if args.procs or (args.procs is None and device == "cuda"):
        import multiprocessing as mp
        n_procs = args.procs or max(2, (os.cpu_count() or 4) * 3 // 4)
        procs = mp.get_context("spawn").Pool(n_procs)
        list(procs.map(abs, range(n_procs)))       # started before any timing
        workers = n_procs
    if args.reducers is None:
        args.reducers = 0 if args.device_reduce else max(1, (os.cpu_count() or 1) // 4)
    tmp = None
    if args.synthetic:
        tmp = tempfile.mkdtemp(prefix="topk-bench-")
        source = synthetic_dataset(args.synthetic, tmp)
        dataset_desc = f"{args.synthetic} synthetic JPEGs (500x375 .. 640x480, cut from scikit-image photos)"
    else:
        source = args.dataset
        dataset_desc = f"`{os.path.relpath(source, ROOT)}`"
    lm = load_model(args.model, device=device)
    infos = resolve_layers(lm.module, lm.input_size, None, device=device)
    return _Setup(device, batch, workers, procs, list_images(source)[: args.limit or None], dataset_root(source),
                  lm, infos, dataset_desc, tmp)


def run_bench(args) -> dict:
    s = _setup(args)
    device, pre, model, names = s.device, s.lm.preprocessing, s.lm.module, s.names
    units = sum(i.units for i in s.infos)
    print(f"{args.model} on {device}: {len(s.infos)} layers, {units} units; {len(s.ids)} images, "
          f"batch {s.batch}, {s.workers} decode {'processes' if s.procs else 'threads'}, {args.reducers} reducer "
          f"threads{' (device-side)' if args.device_reduce else ''}", flush=True)
    # decode once, kept for the rows that start from decoded batches
    t = time.perf_counter()
    decoded = list(s.loader())
    t_decode = time.perf_counter() - t
    n = sum(len(k) for k, _ in decoded)
    if device == "cuda":
        decoded = [(k, x.pin_memory()) for k, x in decoded]
    warm = to_model_input(decoded[0][1], pre, device)
    with torch.no_grad():
        model(warm)
        batch_unit_maxima(model, names, warm)
    sync(device)
    result: dict = {}
    times = _time_rows(_row_functions(s, args, decoded, result), args.repeat)
    res = next(iter(result["reducers"].values())).result()
    assert res["stats"]["count"] == n
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    dev_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    info = {"device": device, "device_name": dev_name, "batch": s.batch, "workers": s.workers, "images": n,
            "reducers": args.reducers, "device_reduce": bool(args.device_reduce),
            "decode": "processes" if s.procs else "threads", "skipped": len(s.ids) - n,
            "batches": (len(s.ids) + s.batch - 1) // s.batch, "layers": len(s.infos), "units": units,
            "model": args.model, "dataset": s.dataset_desc, "load": load, "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "repeat": args.repeat,
            "rows": {"decode only": t_decode, **times}}
    s.close()
    return info


def _row_functions(s: _Setup, args, decoded: list, result: dict) -> list:
    """(row name, function) for every timed row; `full` leaves its reducers in result['reducers']."""
    device, pre, model, names = s.device, s.lm.preprocessing, s.lm.module, s.names
    on_dev = bool(args.device_reduce)   # maxima stay on the GPU; RunningTopK reduces them there

    def bare():
        with torch.no_grad():
            for _, x in decoded:
                model(to_model_input(x, pre, device))
        sync(device)

    def decode_bare():
        with torch.no_grad():
            for _, x in s.loader(pin=device == "cuda"):
                model(to_model_input(x, pre, device))
        sync(device)

    def hooks_only():
        for _, x in decoded:
            batch_unit_maxima(model, names, to_model_input(x, pre, device), to_cpu=not on_dev)
        sync(device)

    def reduce(batches):
        red = Reducers(s.infos, args.reducers)
        for keep, x in batches:
            red.put(keep, batch_unit_maxima(model, names, to_model_input(x, pre, device), to_cpu=not on_dev))
        return red.close()

    def full():
        result["reducers"] = reduce(s.loader(pin=device == "cuda"))

    return [("bare forward", bare), ("forward + hooks", hooks_only), ("hooks + reducers", lambda: reduce(decoded)),
            ("decode + bare", decode_bare), ("full pass", full)]


def _time_rows(order: list, repeat: int) -> dict[str, float]:
    """Best of `repeat` per row, interleaved so that load drift on a shared machine hits every row alike."""
    times = {k: float("inf") for k, _ in order}
    for _ in range(repeat):
        for k, fn in order:
            t0 = time.perf_counter()
            fn()
            times[k] = min(times[k], time.perf_counter() - t0)
    return times


def run_build_path(args) -> dict:
    """The build's own dataset pass (cluster.worker.ShardWorker._dataset: decode processes, uint8
    batches, normalization, hooks on every layer and DeviceTopK on the model's device, the shard's
    state written) against the bare decode + forward of the same images (the same decode processes
    and batches, model(x) without hooks), in this process with the same threads, interleaved."""
    import shutil
    from deepvis.cluster.worker import ShardWorker
    from deepvis.storage.store import open_store

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (256 if device == "cuda" else 32)
    source = args.dataset
    ids = list_images(source)[: args.limit or None]
    tmp = tempfile.mkdtemp(prefix="topk-build-")
    w = ShardWorker(args.model, None, open_store(tmp), device, torch.get_num_threads(), dataset=source,
                    decoder=args.decoder)
    infos = resolve_layers(w.lm.module, w.lm.input_size, None, device=device)
    shard = {"type": "data", "id": "data/bench", "hash": "-", "layers": [i.name for i in infos],
             "units": [i.units for i in infos], "k": 9, "images": ids, "batch_size": batch}
    dec, pre = w._decoder(), w.lm.preprocessing

    def bare(part=ids):
        with torch.no_grad():
            for b in dec.batches(part, batch):
                if b.ids:
                    w.lm.module(to_model_input(b.pixels, pre, device, channels_last=w.channels_last))
        sync(device)

    def build(part=ids):
        with w.store.writer(w.max_inflight) as writer:     # the shard's state is written, as in run()
            w._dataset({**shard, "images": part}, writer)
        sync(device)
    bare(ids[:batch]), build(ids[:batch])                      # warm-up
    times = {"decode + bare forward": float("inf"), "build dataset pass": float("inf")}
    pairs = []      # (bare, build) of each repeat: on a noisy VM the best of each can come from different moments
    for _ in range(args.repeat):
        pair = []
        for name, fn in (("decode + bare forward", bare), ("build dataset pass", build)):
            t0 = time.perf_counter()
            fn()
            pair.append(time.perf_counter() - t0)
            times[name] = min(times[name], pair[-1])
            print(f"  {name}: {pair[-1]:.2f} s", file=sys.stderr, flush=True)
        pairs.append(pair)
    w._close_decoder()
    shutil.rmtree(tmp, ignore_errors=True)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {"device": f"{device}, build path", "device_name": dev_name, "batch": batch, "images": len(ids),
            "layers": len(infos), "units": sum(i.units for i in infos), "model": args.model,
            "decoders": w.decoders, "decoder": args.decoder, "threads": torch.get_num_threads(),
            "channels_last": w.channels_last, "repeat": args.repeat, "cpus": os.cpu_count(),
            "load": os.getloadavg()[0], "torch": torch.__version__, "rows": times, "pairs": pairs,
            "dataset": f"`{os.path.relpath(source, ROOT)}`"}


def compare_decoders(args) -> str:
    """PIL vs torchvision.io.decode_jpeg (cluster.decode, in this process, 1 thread): CPU seconds per
    image, pixel agreement of the crops, and what the model sees: activation differences of every
    default layer and the overlap of each unit's top-k (k = 9) over these images."""
    from deepvis.cluster.decode import decode_chunk
    torch.set_num_threads(1)
    ids = list_images(args.dataset)[: args.limit or 128]
    root = dataset_root(args.dataset)
    lm = load_model(args.model)
    pre = lm.preprocessing
    px, cpu = {}, {}
    for kind in ("pil", "torchvision", "pil", "torchvision"):       # twice: warm, then the best
        t0 = time.process_time()
        chunk = decode_chunk(root, ids, pre, kind=kind)
        cpu[kind] = min(cpu.get(kind, float("inf")), (time.process_time() - t0) / len(ids))
        px[kind] = chunk.pixels
    a, b = px["pil"].astype(np.int16), px["torchvision"].astype(np.int16)
    infos = resolve_layers(lm.module, lm.input_size, None)
    names = [i.name for i in infos]
    outs = {}
    for kind in ("pil", "torchvision"):
        parts = [batch_unit_maxima(lm.module, names, to_model_input(px[kind][s:s + 32], pre))
                 for s in range(0, len(ids), 32)]
        outs[kind] = torch.cat([torch.cat([p[n][0] for n in names], 1) for p in parts]).numpy()
    va, vb = outs["pil"], outs["torchvision"]
    rel = np.abs(va - vb).max(0) / np.maximum(np.abs(va).max(0), 1e-6)
    k = 9
    ta, tb = np.argsort(-va, 0, kind="stable")[:k], np.argsort(-vb, 0, kind="stable")[:k]
    overlap = np.mean([len(set(ta[:, u]) & set(tb[:, u])) / k for u in range(va.shape[1])])
    return (f"Decoders on {len(ids)} sample images (`--decoder`, cluster.decode.decode_chunk, 1 thread): CPU per "
            f"image decode + crop: pil {1000 * cpu['pil']:.1f} ms, torchvision {1000 * cpu['torchvision']:.1f} ms "
            f"({cpu['pil'] / cpu['torchvision']:.2f}x). Crops: {np.mean(a == b) * 100:.2f}% of the 8-bit values "
            f"equal, max difference {int(np.abs(a - b).max())} levels, mean {np.abs(a - b).mean():.4f}. Model "
            f"(all {len(names)} layers, {va.shape[1]:,} units): per-unit max activation difference relative to the "
            f"unit's max |activation|: median {np.median(rel):.2e}, 99th percentile {np.percentile(rel, 99):.2e}; "
            f"top-{k} overlap (same images) {overlap * 100:.2f}% on average.")


def build_subsection(info) -> str:
    n, rows = info["images"], info["rows"]
    base = rows["decode + bare forward"]
    lines = ["| step | seconds | images/s | × decode + bare forward |", "|---|---|---|---|"]
    lines += [f"| {k} | {sec:.2f} | {n / sec:.1f} | {base / sec:.2f} |" for k, sec in rows.items()]
    return f"""### {info['device']}: {info['device_name']}

{datetime.date.today().isoformat()}: {info['dataset']} ({info['images']} images), `{info['model']}`, batches of
{info['batch']}, {info['decoders']} decode process(es) (`--decoder {info['decoder']}`), torch {info['torch']}
({info['threads']} threads), channels_last {info['channels_last']}; all {info['layers']} default layers =
{info['units']:,} units hooked, DeviceTopK on the model's device. `python bench/topk.py --build`: the
build's `ShardWorker._dataset` itself against the same decode processes feeding a bare `model(x)`, in
one process with the same threads (a CPU build runs one such actor per core). Best of {info['repeat']},
interleaved; load average (1 min) at the end {info['load']:.1f} on {info['cpus']} CPUs (a shared machine:
read the ratio).

{chr(10).join(lines)}

**Build dataset pass / (decode + bare forward) = {base / rows['build dataset pass']:.2f}×** (best of each; target ≥ 0.9×).
{_pair_line(info.get("pairs") or [])}"""


def _pair_line(pairs: list) -> str:
    """The ratio of each repeat's two runs (run back to back) and their median: steadier than the best
    of each on a machine whose speed drifts (a VM's neighbours)."""
    if not pairs:
        return ""
    ratios = sorted(a / b for a, b in pairs)
    runs = ", ".join(f"{a:.1f} / {b:.1f} s" for a, b in pairs)
    return (f"Each repeat (bare / build): {runs}; paired ratios {', '.join(f'{r:.2f}' for r in ratios)}, "
            f"**median {float(np.median(ratios)):.2f}×**.\n")


def table(info) -> str:
    n, rows = info["images"], info["rows"]
    base = n / rows["bare forward"]
    lines = ["| step | seconds | images/s | × bare forward |", "|---|---|---|---|"]
    for k, sec in rows.items():
        ips = n / sec
        lines.append(f"| {k} | {sec:.2f} | {ips:.1f} | {ips / base:.2f} |")
    return "\n".join(lines)


INTRO = f"""{SECTION}

`bench/topk.py`: one pass over a dataset with hooks on every default layer of the model (spatial
max + argmax reduced inside each hook, one device→host copy per batch) and `RunningTopK.add` (k = 9)
for every unit in reducer threads (each owns a share of the layers) that overlap the next forward.
Decode (`read_image` + `crop_input` → uint8) runs in a process pool (GPU runs) or thread pool (CPU
runs), a few batches ahead; normalizing happens on the model's device (`to_model_input`,
bit-identical to `preprocess`). Rows: *bare forward* = `model(x)`, no hooks, on the same batches
already decoded (the baseline); *forward + hooks* = `batch_unit_maxima`, no reducer; *hooks +
reducers* = the same plus the reducers (decode excluded); *decode + bare* = the bare forward fed by
the decode pool; *full pass* = decode → hooks → reducers, what an atlas build runs. Best of the
interleaved repeats.
"""


def subsection(info) -> str:
    rows = info["rows"]
    ratio = rows["bare forward"] / rows["full pass"]
    ratio_io = rows["decode + bare"] / rows["full pass"]
    today = datetime.date.today().isoformat()
    return f"""### {info['device']}: {info['device_name']}

{today}: {info['dataset']} ({info['images']} images decoded, {info['skipped']} skipped),
`{info['model']}`, batches of {info['batch']}, {info['workers']} decode {info['decode']}, {info['reducers'] or 'no'} reducer
threads{' (reduced inline, on the GPU: `to_cpu=False`)' if info.get('device_reduce') else ''}, {info['cpus']} CPUs,
torch {info['torch']} ({info['threads']} threads); all {info['layers']} default layers =
{info['units']:,} units. Best of {info['repeat']}; load average (1 min) at the end {info['load']:.1f}.

{table(info)}

**Full pass / bare forward = {ratio:.2f}×** (target ≥ 0.9×); full pass / (decode + bare) = {ratio_io:.2f}×.
{info.get('note', '')}
"""


def write_section(path: str, info: dict) -> None:
    """Replace this device's subsection of the Dataset pass section (others are kept)."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    m = pattern.search(old)
    subs = {}
    if m:
        for block in re.split(r"(?m)^(?=### )", m.group(0))[1:]:
            subs[block.split(":", 1)[0][4:].strip()] = block.rstrip("\n") + "\n"
    text_of = build_subsection if info["device"].endswith("build path") else subsection
    subs[info["device"]] = text_of(info).rstrip("\n") + "\n"
    text = INTRO + "\n" + "\n".join(subs[k] for k in sorted(subs, key=lambda d: (d != "cuda", d))) + "\n"
    if m:
        new = old[:m.start()] + text + old[m.end():]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    new = re.sub(r"\n{3,}", "\n\n", new).rstrip("\n") + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--dataset", default=DEFAULT_DATASET)
    p.add_argument("--synthetic", type=int, default=0, help="use N generated JPEGs instead of --dataset")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0, help="decode threads (when not --procs)")
    p.add_argument("--procs", type=int, default=None,
                   help="decode processes (default: 3/4 of the CPUs on cuda, threads on cpu; 0 = threads)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--reducers", type=int, default=None,
                   help="reducer threads (default: CPUs // 4, at least 1); 0 = inline in the forward loop")
    p.add_argument("--device-reduce", action="store_true",
                   help="batch_unit_maxima(to_cpu=False): RunningTopK reduces on the GPU (default: inline)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--build", action="store_true",
                   help="measure the build's own dataset pass (ShardWorker._dataset) against decode + bare forward")
    p.add_argument("--decoder", default="pil", help="with --build: pil or torchvision")
    p.add_argument("--compare-decoders", action="store_true",
                   help="print the pil vs torchvision decoder comparison (speed, pixels, activations, top-k)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--json", default=None, help="also write the measurements as JSON here")
    args = p.parse_args(argv)
    if not args.synthetic and not os.path.exists(args.dataset):
        print(f"dataset {args.dataset} not found; pass --dataset or --synthetic N", file=sys.stderr)
        return 2
    if args.compare_decoders:
        print(compare_decoders(args))
        return 0
    info = run_build_path(args) if args.build else run_bench(args)
    print(build_subsection(info) if args.build else table(info))
    if args.json:
        import json
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=1)
    if not args.no_write:
        write_section(args.out, info)
        print(f"wrote the '{SECTION}' section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
