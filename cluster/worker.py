"""The build's actor: loads the model once, then runs shards and writes their results straight to the
store. Only small summaries go back to the driver. A shard's completion record is written last, so a
record in the store means every object of that shard is there (resume relies on it).

The device never waits on the network: the actor runs two shards at once (Ray max_concurrency=2, the
pool keeps two in flight), one computing while the other's uploads finish in a Writer's threads (and
the next dataset shard's first batches decode); a lock lets only one compute at a time."""
from __future__ import annotations

import functools
import io
import os
import threading

from deepvis.storage import layout

# channels_last on CPU actors too: measured 1.3-1.4x the optimization pass's throughput on this
# 2-core CPU (bench/optimize.py, BENCHMARKS.md)
CPU_CHANNELS_LAST = True


class ShardWorker:
    def __init__(self, model: str, weights: str | None, store, device: str | None, threads: int,
                 dataset: str | None = None, presets_file: str | None = None, endpoint_url: str | None = None,
                 precision: str = "fp32", decoder: str = "pil"):
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
        # a GPU actor holds its share of the node's CPUs (cluster.build.actor_layout): its decode
        # processes use them while the GPU computes; on a CPU actor the forward costs ~25x the decode
        # of its images (BENCHMARKS.md), one decode process keeps ahead
        gpu = str(self.device).startswith("cuda")
        self.decoders = max(1, (threads or 1) - 1) if gpu else 1
        self.decoder_kind, self.decoder = decoder, None
        self.precision = precision
        # channels_last: the layout cuDNN's and oneDNN's fast convolutions use (BENCHMARKS.md)
        self.channels_last = gpu or CPU_CHANNELS_LAST
        if self.channels_last:
            self.lm.module.to(memory_format=torch.channels_last)
        self._compute = threading.Lock()   # one shard computes; the other only uploads (and decodes)
        self._decoder_lock = threading.Lock()
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
        data = shard["type"] == "data"
        with self.store.writer(self.max_inflight) as writer:
            # a dataset shard's decoding starts now, while the shard before it may still compute:
            # the device does not wait for the first batches at every shard boundary
            early = self._early_stream(shard) if data else None
            with self._compute:
                summary = self._dataset(shard, writer, early) if data else self._optimize(shard, writer)
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
        with self._autocast():   # --precision on a GPU; fp32 (no autocast) on CPU actors
            results = optimize_units(self.lm.module, self.lm.preprocessing, shard["layer"], shard["units"],
                                     presets, model_name=self.lm.name, steps=shard["steps"], size=shard["size"],
                                     device=self.device, diversity=shard.get("diversity", 1),
                                     diversity_layer=shard.get("diversity_layer"))
            firsts = [r for r in results if r.index == 0]
            quality = measure(self.lm.module, self.lm.preprocessing, shard["layer"], firsts, self.lm.name,
                              self.device)
        rows = []
        for r in results:
            # the paper's images are saved contrast-stretched around the mean, as its toolbox did (the
            # raw optimum is nearly flat grey; the recorded activation belongs to the unstretched
            # image); the modern presets' images are natural-looking already
            img = result_image(r, self.lm.preprocessing, stretch=r.preset not in modern)
            writer.put(layout.unit_key(shard["layer"], r.unit, layout.preset_image(r.preset, r.index)),
                       functools.partial(_png, img))     # encoded in the upload thread
        for r, q in zip(firsts, quality):
            rows.append({"unit": r.unit, "preset": r.preset, "activation": float(r.activation),
                         "dead": bool(r.dead), "history": [float(h) for h in r.history], **q})
        return {"layer": shard["layer"], "rows": rows}

    # ---------------------------------------------------------------- dataset pass
    def _dataset(self, shard: dict, writer, stream=None) -> dict:
        """Redone once from the start when a decode process dies mid-shard (a fresh decoder pool);
        a second death fails the attempt (the pool retries the shard)."""
        from concurrent.futures.process import BrokenProcessPool

        for attempt in (1, 2):
            try:
                return self._dataset_pass(shard, writer, stream)
            except BrokenProcessPool:
                stream = None
                self._close_decoder()
                if attempt == 2:
                    raise RuntimeError(f"decode processes died twice during shard {shard['id']}") from None
                self.decoder_restarts = getattr(self, "decoder_restarts", 0) + 1

    def _dataset_pass(self, shard: dict, writer, stream=None) -> dict:
        """Decode in other processes (uint8), normalize on the device, one forward per batch with every
        layer's spatial max taken in its hook, top/bottom-k of every unit kept on the device; the
        shard's state comes to the host once, at the end."""
        import torch
        from deepvis.tasks.activations import batch_unit_maxima, to_model_input
        from deepvis.tasks.topk import DeviceTopK

        layers, ids = shard["layers"], shard["images"]
        red = DeviceTopK(sum(shard["units"]), shard["k"], ids, device=self.device)
        skipped, seen = [], 0
        # batches are fixed slices of the shard's ids (shards start at multiples of the batch size), so
        # every image is computed in the same batch whatever the sharding: the kernels' rounding
        # depends on the batch, and the atlas must not depend on the sharding
        if stream is None or stream.decoder is not self.decoder:     # none, or made before a pool restart
            stream = self._decoder().batches(ids, shard["batch_size"])
        for batch in stream:
            batch = batch.on_device(self.device, self.lm.preprocessing)   # nvjpeg: decoded here
            skipped += batch.skipped
            if not batch.ids:
                continue
            x = to_model_input(batch.pixels, self.lm.preprocessing, self.device, channels_last=self.channels_last)
            with self._autocast():
                out = batch_unit_maxima(self.lm.module, layers, x, to_cpu=False)
            red.add(*(torch.cat([out[l][j] for l in layers], dim=1) for j in range(3)), batch.ids)
            seen += len(batch.ids)
        state = {f"L{i}": r.state_dict() for i, r in enumerate(red.to_host(shard["units"]))}
        # packed in the upload thread (0.12 s for lite0's 1,122 arrays): the next shard computes meanwhile
        writer.put(layout.state_key(shard["id"]), functools.partial(layout.pack_state, state))
        return {"images": len(ids), "seen": seen, "skipped": skipped}

    def _decoder(self):
        """The decode processes, started once per actor (at its first dataset shard)."""
        from deepvis.cluster.decode import Decoder
        from deepvis.storage.datasets import dataset_root

        with self._decoder_lock:        # two shards' threads: one pool
            if self.decoder is None:
                self.decoder = Decoder(dataset_root(self.dataset), self.lm.preprocessing, self.decoders,
                                       endpoint_url=self.endpoint_url, kind=self.decoder_kind)
            return self.decoder

    def _early_stream(self, shard: dict):
        """The shard's batches, decoding from now on; None when the pool is broken or closing (the
        computing thread then makes them, and restarts the pool)."""
        from concurrent.futures.process import BrokenProcessPool
        try:
            return self._decoder().batches(shard["images"], shard["batch_size"])
        except (BrokenProcessPool, RuntimeError):   # RuntimeError: submit after the pool's shutdown
            return None

    def close(self) -> bool:
        """Stop the decode processes (ShardPool.shutdown calls this before it kills the actor)."""
        self._close_decoder()
        return True

    def _close_decoder(self) -> None:
        with self._decoder_lock:
            if self.decoder is not None:
                self.decoder.close()
                self.decoder = None

    def _autocast(self):
        """--precision on a GPU: autocast to bf16/fp16 (fp32 and CPU actors: no autocast)."""
        import contextlib
        import torch
        if self.precision == "fp32" or not str(self.device).startswith("cuda"):
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
