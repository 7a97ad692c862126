"""The build's actor: loads the model once, then runs shards and writes their results straight to the
store. Only small summaries go back to the driver. A shard's completion record is written last, so a
record in the store means every object of that shard is there (resume relies on it).

The device never waits on the network: the actor runs two shards at once (Ray max_concurrency=2, the
pool keeps two in flight), one computing while the other's uploads finish in a Writer's threads; a
lock lets only one compute at a time."""
from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from deepvis.storage import layout


class ShardWorker:
    def __init__(self, model: str, weights: str | None, store, device: str | None, threads: int,
                 dataset: str | None = None, presets_file: str | None = None, endpoint_url: str | None = None):
        import torch
        from deepvis.tasks.models import load_model

        if threads:
            torch.set_num_threads(threads)  # fixed per actor: CPU results must not depend on the pool size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.lm = load_model(model, weights, device=self.device)
        self.store = store
        self.dataset = dataset
        self.presets_file = presets_file
        self.endpoint_url = endpoint_url  # for an s3:// dataset (the store carries its own)
        # a GPU actor holds its share of the node's CPUs (cluster.build.actor_layout): they decode
        # images while the GPU computes; a CPU actor's one core keeps 2 decoders busy enough
        self.decoders = max(2, threads or 1) if str(self.device).startswith("cuda") else 2
        self._compute = threading.Lock()   # one shard computes; the other only uploads
        self.max_inflight = 16             # uploads in flight per shard (Store.writer)

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        import torch
        import ray
        name = torch.cuda.get_device_name(0) if self.device.startswith("cuda") else "cpu"
        return {"pid": os.getpid(), "device": self.device, "device_name": name,
                "node": ray.get_runtime_context().get_node_id()}

    def run(self, shard: dict) -> dict:
        compute = {"opt": self._optimize, "data": self._dataset}[shard["type"]]
        with self.store.writer(self.max_inflight) as writer:
            with self._compute:
                summary = compute(shard, writer)
        # the block waited for every upload and re-raised any error: only now the record
        layout.put_json(self.store, layout.record_key(shard["id"]),
                        {"id": shard["id"], "hash": shard["hash"], "pid": os.getpid(), "summary": summary})
        return summary

    # ---------------------------------------------------------------- optimization pass
    def _optimize(self, shard: dict, writer) -> dict:
        from deepvis.tasks.modern import is_modern
        from deepvis.tasks.optimize import get_preset, load_presets, optimize_units, result_image
        from deepvis.tasks.quality import measure

        extra = load_presets(self.presets_file) if self.presets_file else {}
        presets = [extra[n] if n in extra else get_preset(n) for n in shard["presets"]]
        modern = {p.name for p in presets if is_modern(p)}
        results = optimize_units(self.lm.module, self.lm.preprocessing, shard["layer"], shard["units"], presets,
                                 model_name=self.lm.name, steps=shard["steps"], size=shard["size"],
                                 device=self.device, diversity=shard.get("diversity", 1),
                                 diversity_layer=shard.get("diversity_layer"))
        firsts = [r for r in results if r.index == 0]
        quality = measure(self.lm.module, self.lm.preprocessing, shard["layer"], firsts, self.lm.name, self.device)
        rows = []
        for r in results:
            # the paper's images are saved contrast-stretched around the mean, as its toolbox did (the
            # raw optimum is nearly flat grey; the recorded activation belongs to the unstretched
            # image); the modern presets' images are natural-looking already
            img = result_image(r, self.lm.preprocessing, stretch=r.preset not in modern)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            writer.put(layout.unit_key(shard["layer"], r.unit, layout.preset_image(r.preset, r.index)),
                       buf.getvalue())
        for r, q in zip(firsts, quality):
            rows.append({"unit": r.unit, "preset": r.preset, "activation": float(r.activation),
                         "dead": bool(r.dead), "history": [float(h) for h in r.history], **q})
        return {"layer": shard["layer"], "rows": rows}

    # ---------------------------------------------------------------- dataset pass
    def _dataset(self, shard: dict, writer) -> dict:
        import torch
        from deepvis.storage.datasets import BadImage, dataset_root, read_image
        from deepvis.tasks.activations import batch_unit_maxima
        from deepvis.tasks.preprocess import preprocess
        from deepvis.tasks.topk import RunningTopK

        root = dataset_root(self.dataset)
        pre = self.lm.preprocessing
        layers = shard["layers"]
        reducers = [RunningTopK(n, shard["k"]) for n in shard["units"]]
        skipped = []

        def load(image_id):
            try:
                return image_id, preprocess(read_image(root, image_id, endpoint_url=self.endpoint_url), pre), None
            except BadImage as e:
                return image_id, None, str(e)

        # batches are fixed slices of the shard's ids (shards start at multiples of the batch size), so
        # every image is computed in the same batch whatever the sharding: the kernels' rounding
        # depends on the batch, and the atlas must not depend on the sharding
        bs = shard["batch_size"]
        ids = shard["images"]
        seen = 0
        with ThreadPoolExecutor(max_workers=self.decoders) as pool:  # decoding overlaps the forward passes
            decoded = pool.map(load, ids)
            for start in range(0, len(ids), bs):
                batch_ids, batch = [], []
                for _ in range(min(bs, len(ids) - start)):
                    image_id, x, err = next(decoded)
                    if err is not None:
                        skipped.append({"image": image_id, "reason": err})
                    else:
                        batch_ids.append(image_id)
                        batch.append(x)
                if not batch:
                    continue
                out = batch_unit_maxima(self.lm.module, layers, torch.stack(batch).to(self.device))
                for red, layer in zip(reducers, layers):
                    vals, ys, xs = out[layer]
                    red.add(vals.cpu().numpy(), ys.cpu().numpy(), xs.cpu().numpy(), batch_ids)
                seen += len(batch)
        state = {f"L{i}": red.state_dict() for i, red in enumerate(reducers)}
        writer.put(layout.state_key(shard["id"]), layout.pack_state(state))
        return {"images": len(ids), "seen": seen, "skipped": skipped}
