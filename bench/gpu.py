"""Issue 16's GPU checks in one prepared run (bench/gpu.sh on a lent GPU machine), then the report here.

On the GPU machine (no Ray there: every measurement runs the actors' own code, cluster.worker.ShardWorker,
in this process, as topk.py --build does):
  smoke         CUDA correctness: DeviceTopK on the GPU is identical to the host reducer (ties, NaN, fp32);
                spatial_max's first-occurrence positions on CUDA equal numpy's argmax on tied maps; nvJPEG
                crops (tasks.preprocess.decode_jpegs on CUDA) against libjpeg-turbo's on the CPU
  dataset       per model (efficientnet_lite0, torchvision resnet50 and googlenet with random weights), on
                synthetic ImageNet-like JPEGs: the bare forward of the same batches already decoded on the
                GPU (the baseline), the decode processes feeding a bare forward, and the build's dataset
                pass (ShardWorker._dataset: decode, hooks on every default layer, DeviceTopK, the state
                written) for --decoder pil and nvjpeg, batches of 32 (GPU_BATCH) and 256, fp32; bf16 once;
                agreement of nvjpeg and bf16 with pil fp32 (same top-1 image, activation differences)
  optimization  ShardWorker.run of a yosinski-3 shard (the build's GPU shard: 128 units) at 224 px, fp32
                and bf16: marginal unit-steps/s from 10 to 50 steps
Every section is written to the JSON file as soon as it ends; a section that fails records its error and
the others still run; a section that would start after --budget seconds is skipped.

Here (`--report`): the BENCHMARKS.md section from that JSON, with the projected time of a whole
ImageNet-train atlas of GoogLeNet (1.28M images, every default layer, the four paper presets, 8 GPUs, into
S3) from cluster.estimate with the measured GPU costs put in, labelled as a projection.

    bash bench/gpu.sh                                 # on the GPU machine (see that file)
    python bench/gpu.py --device cpu --images 48 --quick --out /tmp/gpu.json   # a smoke run anywhere
    .venv/bin/python bench/gpu.py --report gpu.json   # here: writes BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## GPU: dataset pass, decoders, precision and the GoogLeNet projection (issue 16)"
MODELS = [("efficientnet_lite0", None), ("torchvision:resnet50", "none"), ("torchvision:googlenet", "none")]
OPT_LAYERS = {"efficientnet_lite0": "_blocks.8", "torchvision:googlenet": "inception4c"}


class Run:
    """The JSON result, written after every section, and the time budget."""

    def __init__(self, out: str, budget: float):
        self.out, self.budget, self.t0 = out, budget, time.time()
        self.data: dict = {"sections": {}}

    def section(self, name: str, fn, *args) -> None:
        if time.time() - self.t0 > self.budget:
            self.data["sections"][name] = {"skipped": f"budget of {self.budget:g} s spent"}
        else:
            t = time.time()
            try:
                self.data["sections"][name] = {"result": fn(*args)}
            except Exception as e:  # noqa: BLE001 - record and go on: one call, every section counts
                self.data["sections"][name] = {"error": f"{type(e).__name__}: {e}",
                                               "traceback": traceback.format_exc()[-3000:]}
            self.data["sections"][name]["seconds"] = round(time.time() - t, 1)
        print(f"[{time.time() - self.t0:6.1f} s] {name}: "
              f"{json.dumps(self.data['sections'][name])[:600]}", flush=True)
        self.save()

    def save(self) -> None:
        Path(self.out).write_text(json.dumps(self.data, indent=1, default=str))


def environment(device: str) -> dict:
    import torch
    import torchvision
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {"date": time.strftime("%Y-%m-%d"), "device": device, "device_name": name, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda}


# ---------------------------------------------------------------- smoke: CUDA correctness
def smoke_topk(device: str) -> dict:
    """DeviceTopK on `device` against RunningTopK (numpy) on tied, NaN and signed-zero activations."""
    import numpy as np
    import torch

    from deepvis.tasks.topk import DeviceTopK, RunningTopK
    rng = np.random.default_rng(5)
    n, c, k = 600, 37, 9
    values = rng.integers(0, 4, (n, c)).astype(np.float32)
    values[5, 3] = values[77, 3] = np.nan
    values[9] = -0.0
    ys, xs = rng.integers(0, 7, (n, c)).astype(np.int32), rng.integers(0, 7, (n, c)).astype(np.int32)
    ids = [f"img{i:05d}" for i in range(n)]
    dev = DeviceTopK(c, k, ids, device=device)
    host = RunningTopK(c, k)
    for s in range(0, n, 50):
        sl = slice(s, s + 50)
        dev.add(*(torch.from_numpy(a[sl]).to(device) for a in (values, ys, xs)), ids[sl])
        host.add(values[sl], ys[sl], xs[sl], ids[sl])
    got, want = dev.to_host(None)[0].result(), host.result()
    same = all(np.array_equal(got[kind][key], want[kind][key], equal_nan=key == "activation")
               for kind in ("top", "bottom") for key in ("activation", "image", "y", "x"))
    return {"identical": bool(same), "units": c, "images": n}


def smoke_spatial_max(device: str) -> dict:
    """spatial_max on `device` (CUDA keeps max(dim)) against numpy's first-occurrence argmax, both
    memory formats, maps of few levels (ties everywhere) up to 64 x 112 x 112."""
    import numpy as np
    import torch

    from deepvis.tasks.activations import spatial_max
    g = torch.Generator().manual_seed(3)
    cases = [torch.randint(0, 3, (4, 64, 112, 112), generator=g).float(), torch.zeros(2, 8, 7, 7),
             (torch.randn(8, 256, 14, 14, generator=g) * 2).round()]
    cases[2][0, 1, 2, 2] = cases[2][0, 1, 5, 6] = float("inf")
    bad = 0
    for maps in cases:
        flat = maps.flatten(2).numpy()
        want_v, want_i = flat.max(2), flat.argmax(2)
        for mf in (torch.contiguous_format, torch.channels_last):
            v, y, x = spatial_max(maps.to(device).contiguous(memory_format=mf))
            bad += int(not np.array_equal(v.cpu().numpy(), want_v))
            bad += int(not np.array_equal((y * maps.shape[3] + x).cpu().numpy(), want_i))
    return {"mismatches": bad, "cases": 2 * len(cases)}


def smoke_nvjpeg(device: str, root: str, ids: list[str], pre: dict) -> dict:
    """decode_jpegs + crop_tensor on `device` against the CPU (libjpeg-turbo) and PIL's crop_input."""
    import numpy as np

    from deepvis.storage.images import decode
    from deepvis.tasks.preprocess import crop_input, crop_tensor, decode_jpegs
    datas = [Path(root, i).read_bytes() for i in ids[:64]]
    for _ in range(2):                  # the first call starts nvJPEG: time the second
        t = time.perf_counter()
        dev = decode_jpegs(datas, device)
        _sync(device)
        batch_s = time.perf_counter() - t
    d = []
    for data, img in zip(datas, dev):
        ref = np.asarray(crop_input(decode(data), pre), dtype=np.int16)
        d.append(np.abs(crop_tensor(img, pre).permute(1, 2, 0).cpu().numpy().astype(np.int16) - ref))
    d = np.stack(d)
    return {"images": len(datas), "decoded": sum(x is not None for x in dev), "max_levels": int(d.max()),
            "mean_levels": float(d.mean()), "equal_fraction": float((d == 0).mean()),
            "batch_decode_ms_per_image": 1000 * batch_s / len(datas)}


def _sync(device: str) -> None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- dataset pass: the build's vs the bare forward
class DatasetBench:
    """One model: a ShardWorker as a GPU actor holds it (every CPU but one decodes), the images decoded
    once on the device for the bare forward, and timings of the three ways through the same batches."""

    def __init__(self, model: str, weights, device: str, root: str, ids: list[str]):
        import torch

        from deepvis.cluster.worker import ShardWorker
        from deepvis.storage.store import open_store
        from deepvis.tasks.layers import resolve_layers
        self.device, self.ids, self.tmp = device, ids, tempfile.mkdtemp(prefix="gpu-bench-")
        self.w = ShardWorker(model, weights, open_store(self.tmp), device, os.cpu_count() or 1, dataset=root)
        infos = resolve_layers(self.w.lm.module, self.w.lm.input_size, None, device=device)
        self.shard = {"type": "data", "id": "data/x", "hash": "-", "layers": [i.name for i in infos],
                      "units": [i.units for i in infos], "k": 9, "images": ids}
        self.layers, self.units = len(infos), sum(i.units for i in infos)
        pixels = [b.on_device(device, self.w.lm.preprocessing).pixels for b in self.w._decoder().batches(ids, 256)]
        self.pixels = torch.cat(pixels)           # uint8 on the device: the bare forward's input

    def bare(self, batch: int) -> float:
        """model(x) of the batches already decoded on the device: normalization + forward only."""
        import torch

        from deepvis.tasks.activations import to_model_input
        w, t = self.w, time.perf_counter()
        with torch.no_grad(), w._autocast():
            for s in range(0, len(self.pixels), batch):
                w.lm.module(to_model_input(self.pixels[s:s + batch], w.lm.preprocessing, self.device,
                                           channels_last=w.channels_last))
        _sync(self.device)
        return time.perf_counter() - t

    def decode_bare(self, batch: int) -> float:
        """The decode processes (and nvjpeg's device decode) feeding the bare forward."""
        import torch

        from deepvis.tasks.activations import to_model_input
        w, t = self.w, time.perf_counter()
        with torch.no_grad(), w._autocast():
            for b in w._decoder().batches(self.ids, batch):
                b = b.on_device(self.device, w.lm.preprocessing)
                if b.ids:
                    w.lm.module(to_model_input(b.pixels, w.lm.preprocessing, self.device,
                                               channels_last=w.channels_last))
        _sync(self.device)
        return time.perf_counter() - t

    def build(self, batch: int, sid: str) -> float:
        """The build's dataset pass over the images as one shard (its state written to the store)."""
        t = time.perf_counter()
        with self.w.store.writer(self.w.max_inflight) as writer:
            self.w._dataset({**self.shard, "id": sid, "batch_size": batch}, writer)
        _sync(self.device)
        return time.perf_counter() - t

    def set(self, decoder: str, precision: str) -> None:
        if decoder != self.w.decoder_kind:
            self.w._close_decoder()
            self.w.decoder_kind = decoder
        self.w.precision = precision

    def state(self, sid: str) -> dict:
        """The shard's top lists, every layer's units one after another."""
        import numpy as np

        from deepvis.storage import layout
        from deepvis.tasks.topk import RunningTopK
        st = layout.unpack_state(self.w.store.get(layout.state_key(sid)))
        tops = [RunningTopK.from_state_dict(st[f"L{i}"]).result()["top"] for i in range(len(st))]
        return {"top": {key: np.concatenate([t[key] for t in tops]) for key in ("activation", "image")}}

    def close(self) -> None:
        import shutil
        self.w._close_decoder()
        shutil.rmtree(self.tmp, ignore_errors=True)


def agreement(a: dict, b: dict) -> dict:
    """Two runs' top-k results over the same images: same top-1 image, activation differences."""
    import numpy as np
    x, y = a["top"]["activation"][:, 0], b["top"]["activation"][:, 0]
    rel = np.abs(x - y) / np.maximum(np.abs(x), 1e-3)
    overlap = np.mean([len(set(p) & set(q)) / len(p) for p, q in zip(a["top"]["image"], b["top"]["image"])])
    return {"same_top1": float(np.mean(a["top"]["image"][:, 0] == b["top"]["image"][:, 0])),
            "topk_overlap": float(overlap), "rel_diff_median": float(np.median(rel)),
            "rel_diff_p99": float(np.percentile(rel, 99))}


def dataset_model(model: str, weights, device: str, root: str, ids: list[str], batches, repeat: int) -> dict:
    """Every way through one model's batches, best of `repeat`, and the agreements."""
    b = DatasetBench(model, weights, device, root, ids)
    rows = []
    try:
        for batch in batches:
            b.bare(batch)                                               # warm-up (cuDNN picks kernels)
            best = lambda fn: min(fn() for _ in range(repeat))          # noqa: E731
            for decoder, precision in (("pil", "fp32"), ("nvjpeg", "fp32"), ("nvjpeg", "bf16")):
                if precision == "bf16" and batch != max(batches):
                    continue
                b.set(decoder, precision)
                sid = f"data/{decoder}-{precision}-{batch}"
                b.build(batch, sid)                                     # warm-up: decoders started
                row = {"batch": batch, "decoder": decoder, "precision": precision,
                       "bare": best(lambda: b.bare(batch)), "decode_bare": best(lambda: b.decode_bare(batch)),
                       "build": best(lambda: b.build(batch, sid))}
                rows.append(row)
                print(f"    {model} {row}", flush=True)
        big = max(batches)
        pil, nv, bf = (b.state(f"data/{k}-{big}") for k in ("pil-fp32", "nvjpeg-fp32", "nvjpeg-bf16"))
        agree = {"nvjpeg vs pil (fp32)": agreement(pil, nv), "bf16 vs fp32 (nvjpeg)": agreement(nv, bf)}
        return {"model": model, "images": len(ids), "layers": b.layers, "units": b.units,
                "decoders": b.w.decoders, "rows": rows, "agreement": agree}
    finally:
        b.close()


# ---------------------------------------------------------------- optimization pass
def optimization(model: str, weights, device: str, precision: str, units: int) -> dict:
    """ShardWorker.run of one yosinski-3 shard of `units` units at 224 px: 10 and 50 steps, best of 2;
    marginal unit-steps/s = units x 40 / (t50 - t10) (PNG encodes, measures and writes cancel)."""
    import shutil

    from deepvis.cluster.worker import ShardWorker
    from deepvis.storage.store import open_store
    tmp = tempfile.mkdtemp(prefix="gpu-opt-")
    w = ShardWorker(model, weights, open_store(tmp), device, 1, precision=precision)
    layer = OPT_LAYERS.get(model, "_blocks.8")
    shard = {"type": "opt", "hash": "-", "layer": layer, "units": list(range(units)),
             "presets": ["yosinski-3"], "size": 224}
    times = {}
    try:
        w.run({**shard, "id": "opt/warm", "steps": 2})
        for steps in (10, 50, 10, 50):
            t = time.perf_counter()
            w.run({**shard, "id": f"opt/{steps}", "steps": steps})
            _sync(device)
            times[steps] = min(times.get(steps, float("inf")), time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marginal = units * 40 / max(1e-9, times[50] - times[10])
    return {"model": model, "layer": layer, "precision": precision, "units": units, "size": 224,
            "seconds_10_steps": times[10], "seconds_50_steps": times[50], "unit_steps_per_s": marginal}


# ---------------------------------------------------------------- the report (here)
IMAGENET_TRAIN = 1_281_167
PAPER = "yosinski-1,yosinski-2,yosinski-3,yosinski-4"


def _result(data: dict, name: str):
    return data["sections"].get(name, {}).get("result")


def best_build(res: dict) -> dict:
    """The fastest fp32 build row of a model (decoder and batch as measured)."""
    return min((r for r in res["rows"] if r["precision"] == "fp32"), key=lambda r: r["build"])


def projection(data: dict) -> tuple[dict, str]:
    """cluster.estimate for GoogLeNet over ImageNet train, the four paper presets, 8 GPU actors into S3,
    with the GPU's optimization and dataset costs replaced by this run's measurements."""
    from dataclasses import replace

    from deepvis.cluster.build import _layer_depths, _static_files, make_plan, make_shards
    from deepvis.cluster.config import BuildConfig
    from deepvis.cluster.estimate import COSTS, REF_PX, estimate
    ds = _result(data, "dataset: torchvision:googlenet")
    opt = _result(data, "optimization: torchvision:googlenet fp32")
    if not ds or not opt:
        return {}, "not computed: the GoogLeNet dataset or optimization measurement is missing"
    row = best_build(ds)
    image_s = row["build"] / ds["images"]
    unit_step = 1 / opt["unit_steps_per_s"] / (opt["size"] / REF_PX) ** 2   # the table's cost at REF_PX
    costs = {**COSTS, "cuda": replace(COSTS["cuda"], name="cuda (measured by bench/gpu.py)",
                                      opt_unit_step=unit_step, image_forward=image_s)}
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp, "train.txt")
        lst.write_text("".join(f"n{i % 1000:08d}/img_{i:07d}.JPEG\n" for i in range(IMAGENET_TRAIN)))
        cfg = BuildConfig(model="torchvision:googlenet", weights="none", presets=PAPER, dataset=str(lst),
                          device="cuda", actors=8, out="s3://bucket/atlas", decoder=row["decoder"],
                          batch_size=row["batch"])
        plan = make_plan(cfg)
        make_shards(plan, gpu=True, actors=8)
        # crop tasks on every CPU of the 8 GPUs' nodes: as many a GPU as the measured machine has
        est = estimate(plan, device="cuda", actors=8, local_ray=False, s3=True, plan_seconds=0.0,
                       static_files=_static_files(), depths=_layer_depths(cfg, plan), costs=costs,
                       cpus=8 * int(data["environment"].get("cpus") or 1))
    units = sum(len(l["selected"]) for l in plan.layers)
    return {"units": units, "layers": len(plan.layers), "seconds": est.seconds, "objects": est.objects.total(),
            "decoder": row["decoder"], "batch": row["batch"], "image_ms": 1000 * image_s,
            "cpus": 8 * int(data["environment"].get("cpus") or 1),
            "unit_step_ms_224": 1000 / opt["unit_steps_per_s"]}, ""


def _smoke_lines(data: dict) -> list[str]:
    out = []
    for name, sec in data["sections"].items():
        if name.startswith("smoke"):
            body = sec.get("result") or sec.get("error") or sec.get("skipped")
            out.append(f"- {name}: {json.dumps(body) if isinstance(body, dict) else body}")
    return out


def _dataset_lines(data: dict) -> list[str]:
    lines = ["| model | batch | decoder | precision | bare forward img/s | decode + bare img/s | build dataset pass img/s | build / bare |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    notes = []
    for model, _ in MODELS:
        sec = data["sections"].get(f"dataset: {model}", {})
        res = sec.get("result")
        if not res:
            notes.append(f"- {model}: {sec.get('error') or sec.get('skipped') or 'not run'}")
            continue
        n = res["images"]
        for r in res["rows"]:
            lines.append(f"| {model} | {r['batch']} | {r['decoder']} | {r['precision']} | {n / r['bare']:,.0f} | "
                         f"{n / r['decode_bare']:,.0f} | {n / r['build']:,.0f} | **{r['bare'] / r['build']:.2f}** |")
        for k, v in res["agreement"].items():
            notes.append(f"- {model}, {k}: same top-1 image for {100 * v['same_top1']:.2f}% of the {res['units']:,} "
                         f"units, top-9 overlap {100 * v['topk_overlap']:.2f}%, top-1 activation relative "
                         f"difference median {v['rel_diff_median']:.2e}, 99th percentile {v['rel_diff_p99']:.2e}")
    return lines + [""] + notes


def _opt_lines(data: dict) -> list[str]:
    lines = ["| model | layer | precision | units | unit-steps/s (marginal, 224 px) |", "|---|---|---|---:|---:|"]
    for name, sec in data["sections"].items():
        if name.startswith("optimization"):
            r = sec.get("result")
            lines.append(f"| {r['model']} | {r['layer']} | {r['precision']} | {r['units']} | {r['unit_steps_per_s']:,.0f} |"
                         if r else f"| {name} | | | | {sec.get('error') or sec.get('skipped')} |")
    return lines


def report(path: str, benchmarks: str) -> int:
    from benchmd import replace_section
    data = json.loads(Path(path).read_text())
    env = data["environment"]
    proj, why = projection(data)
    text = [SECTION, "",
            f"`bash bench/gpu.sh` on {env['device_name']} ({env['cpus']} CPUs), {env['date']}, torch "
            f"{env['torch']}, torchvision {env['torchvision']}; {data['images']['count']:,} "
            f"{data['images']['kind']}; every default layer hooked. *bare forward*: normalization + "
            f"model(x) on batches already decoded on the GPU; *build dataset pass*: ShardWorker._dataset "
            f"(decode included, hooks, DeviceTopK, the state written). Target: build / bare >= 0.8. "
            f"Whole run {data.get('total_seconds', '?')} s.", "", *_smoke_lines(data), "",
            *_dataset_lines(data), "", *_opt_lines(data), ""]
    if proj:
        s = proj["seconds"]
        text.append(f"**Projection, not a measurement**: GoogLeNet (torchvision's; the weights do not change the cost), all "
                    f"{proj['layers']} default layers ({proj['units']:,} units), the four paper presets at "
                    f"their own step counts, ImageNet train ({IMAGENET_TRAIN:,} images, decoder "
                    f"{proj['decoder']}, batches of {proj['batch']}), 8 GPU actors on nodes with {proj['cpus']} "
                    f"CPUs in all (this machine's per GPU; the crop tasks use them), into S3: "
                    f"**{s['total'] / 3600:.1f} h** (cluster.estimate with this run's costs: "
                    f"{proj['unit_step_ms_224']:.3f} ms a unit-step at 224 px, {proj['image_ms']:.3f} ms a "
                    f"dataset image; the rest from its cuda row). Phases (s): "
                    + ", ".join(f"{k} {v:,.0f}" for k, v in s.items()) + f"; {proj['objects']:,} objects.")
    else:
        text.append(f"Projection: {why}.")
    replace_section(Path(benchmarks), SECTION, "\n".join(text))
    print("\n".join(text))
    return 0


# ---------------------------------------------------------------- the run
def measure(a) -> int:
    """On the GPU machine: every section, in order, into a.out (the dataset sections before the
    optimization ones: those set torch's threads to 1, as a build's GPU optimization actor)."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from topk import synthetic_dataset

    from deepvis.storage.datasets import list_images
    from deepvis.tasks.models import load_model
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = Run(a.out, a.budget)
    run.data["environment"] = environment(device)
    root = synthetic_dataset(a.images, tempfile.mkdtemp(prefix="gpu-images-"))
    ids = list_images(root)
    run.data["images"] = {"count": len(ids), "kind": "synthetic JPEGs of ImageNet-like sizes (bench/topk.py)"}
    pre = load_model("efficientnet_lite0").preprocessing
    run.section("smoke: DeviceTopK identical to the host reducer", smoke_topk, device)
    run.section("smoke: spatial_max ties", smoke_spatial_max, device)
    run.section("smoke: nvJPEG crops", smoke_nvjpeg, device, root, ids, pre)
    batches = (8, 16) if a.quick else (32, 256)
    for model, weights in [m for m in MODELS if not a.quick or m[0] != "torchvision:resnet50"]:
        run.section(f"dataset: {model}", dataset_model, model, weights, device, root, ids, batches, a.repeat)
    units = 4 if a.quick else 128
    for model, weights in [m for m in MODELS if m[0] in OPT_LAYERS]:
        for precision in ("fp32", "bf16"):
            run.section(f"optimization: {model} {precision}", optimization, model, weights, device, precision,
                        units)
    run.data["total_seconds"] = round(time.time() - run.t0, 1)
    run.save()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu.json", help="the JSON file the measurements go to")
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--images", type=int, default=4096, help="synthetic JPEGs for the dataset pass")
    p.add_argument("--repeat", type=int, default=2, help="timings per row, best kept")
    p.add_argument("--budget", type=float, default=420, help="seconds after which no section starts")
    p.add_argument("--quick", action="store_true", help="a smoke run: no resnet50, small batches, 4 units")
    p.add_argument("--report", metavar="JSON", help="write the BENCHMARKS.md section from this file (here)")
    p.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"))
    a = p.parse_args(argv)
    if a.report:
        return report(a.report, a.benchmarks)
    return measure(a)


if __name__ == "__main__":
    sys.exit(main())
