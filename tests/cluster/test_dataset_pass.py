"""The build's dataset pass (cluster.worker.ShardWorker._dataset) run in this process, without Ray:
decode processes deliver uint8 batches, normalization and the top-k run on the actor's device, and the
shard's state equals the host path's (PIL in this process, float batches, numpy RunningTopK). A decode
process killed mid-shard gets the shard redone, with the same result."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from deepvis.cluster.worker import ShardWorker
from deepvis.storage import layout
from deepvis.storage.datasets import dataset_root, list_images, read_image
from deepvis.storage.store import open_store
from deepvis.tasks.topk import DeviceTopK, RunningTopK

LAYERS = ["_blocks.1", "_fc"]


@pytest.fixture(scope="module")
def dataset(sample_dir, tmp_path_factory) -> str:
    """24 real images (every 33rd: grayscale and CMYK ones among the sample) and one broken file."""
    files = sorted(p.as_posix() for p in sample_dir.glob("*/*.JPEG"))[::33][:24]
    d = tmp_path_factory.mktemp("ds")
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    path = d / "images.txt"
    path.write_text("".join(f"{f}\n" for f in files) + "broken.jpg\n")
    return str(path)


@pytest.fixture(scope="module")
def worker(dataset, tmp_path_factory):
    w = ShardWorker("efficientnet_lite0", None, open_store(str(tmp_path_factory.mktemp("atlas"))), "cpu", 1,
                    dataset=dataset)
    yield w
    w._close_decoder()


def shard_for(w, dataset, batch_size=6, sid="data/00000"):
    from deepvis.tasks.layers import resolve_layers
    units = [i.units for i in resolve_layers(w.lm.module, w.lm.input_size, ",".join(LAYERS))]
    return {"type": "data", "id": sid, "hash": "h", "layers": LAYERS, "units": units, "k": 4,
            "images": list_images(dataset), "batch_size": batch_size}


def host_reference(w, shard, dataset) -> list[RunningTopK]:
    """PIL in this process -> float batches -> the same model -> numpy RunningTopK (the pre-datapass path)."""
    from deepvis.storage.datasets import BadImage
    from deepvis.tasks.activations import batch_unit_maxima
    from deepvis.tasks.preprocess import preprocess

    root, pre = dataset_root(dataset), w.lm.preprocessing
    reds = [RunningTopK(n, shard["k"]) for n in shard["units"]]
    ids = shard["images"]
    for s in range(0, len(ids), shard["batch_size"]):
        keep, xs = [], []
        for i in ids[s:s + shard["batch_size"]]:
            try:
                xs.append(preprocess(read_image(root, i), pre))
                keep.append(i)
            except BadImage:
                pass
        if not xs:
            continue
        x = torch.stack(xs).contiguous(memory_format=torch.channels_last if w.channels_last else torch.contiguous_format)
        out = batch_unit_maxima(w.lm.module, LAYERS, x)
        for red, name in zip(reds, LAYERS):
            red.add(*out[name], keep)
    return reds


def stored(w, shard) -> list[dict]:
    state = layout.unpack_state(w.store.get(layout.state_key(shard["id"])))
    return [RunningTopK.from_state_dict(state[f"L{i}"]).result() for i in range(len(LAYERS))]


def assert_same(results, reference):
    for got, ref in zip(results, reference):
        ref = ref.result()
        for kind in ("top", "bottom"):
            for key in ("activation", "image", "y", "x"):
                np.testing.assert_array_equal(got[kind][key], ref[kind][key])
        assert got["stats"]["count"] == ref["stats"]["count"]
        np.testing.assert_array_equal(got["stats"]["max"], ref["stats"]["max"])
        np.testing.assert_allclose(got["stats"]["mean"], ref["stats"]["mean"], rtol=1e-12)


def test_dataset_shard_equals_the_host_path(worker, dataset):
    shard = shard_for(worker, dataset)
    summary = worker.run(shard)
    assert summary["seen"] == 24 and [s["image"] for s in summary["skipped"]] == ["broken.jpg"]
    assert len(worker.decoder.pids()) == worker.decoders
    assert_same(stored(worker, shard), host_reference(worker, shard, dataset))


def test_close_stops_the_decode_processes_and_a_later_shard_restarts_them(worker, dataset):
    """ShardWorker.close (ShardPool.shutdown calls it before killing the actor): the decode processes
    exit while the actor is whole; a shard after it starts a fresh pool."""
    worker.run(shard_for(worker, dataset, sid="data/close-1"))
    pids = worker.decoder.pids()
    assert worker.close() is True and worker.decoder is None
    for pid in pids:                                   # gone: not even a zombie left to reap
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    worker.run(shard_for(worker, dataset, sid="data/close-2"))
    assert len(worker.decoder.pids()) == worker.decoders and not set(pids) & set(worker.decoder.pids())


def test_killed_decode_process_gets_the_shard_redone(worker, dataset, monkeypatch):
    shard = shard_for(worker, dataset, batch_size=3, sid="data/00001")
    worker.run({**shard, "id": "data/ref"})
    reference = stored(worker, {**shard, "id": "data/ref"})
    killed, add = [], DeviceTopK.add

    def add_then_kill(self, *args):
        if not killed:                      # mid-shard: the first batch is in, 7 are to come
            pid = worker.decoder.pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return add(self, *args)

    monkeypatch.setattr(DeviceTopK, "add", add_then_kill)
    before = getattr(worker, "decoder_restarts", 0)
    summary = worker.run(shard)
    assert killed and getattr(worker, "decoder_restarts", 0) == before + 1
    assert killed[0] not in worker.decoder.pids()
    assert summary["seen"] == 24
    for got, ref in zip(stored(worker, shard), reference):
        for kind in ("top", "bottom"):
            for key in ("activation", "image", "y", "x"):
                np.testing.assert_array_equal(got[kind][key], ref[kind][key])


def test_next_shard_decodes_while_the_last_one_computes(worker, dataset):
    """Two dataset shards on one actor at once (Ray max_concurrency=2): the waiting one's first batches
    are decoded before it takes the compute lock (the device does not wait for them), and both states
    equal the shards run one after the other."""
    import threading
    import time
    base = shard_for(worker, dataset, batch_size=4)
    ids = base["images"]
    a, b = {**base, "id": "data/a", "images": ids[:12]}, {**base, "id": "data/b", "images": ids[12:]}
    seq = {}
    for s in (a, b):
        worker.run(s)
        seq[s["id"]] = stored(worker, s)
    stream = worker._early_stream(b)                           # what run() makes before the lock
    deadline = time.time() + 60
    while not all(f.done() for f in stream.pending[0]) and time.time() < deadline:
        time.sleep(0.05)
    assert all(f.done() for f in stream.pending[0]), "nothing decoded before iteration"
    assert [x for batch in stream for x in batch.ids] == [i for i in b["images"] if i != "broken.jpg"]
    errors = []
    def run(s):
        try:
            worker.run({**s, "id": s["id"] + "2"})
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    for s in (a, b):
        for got, ref in zip(stored(worker, {**s, "id": s["id"] + "2"}), seq[s["id"]]):
            for kind in ("top", "bottom"):
                for key in ("activation", "image", "y", "x"):
                    np.testing.assert_array_equal(got[kind][key], ref[kind][key])


def test_precision_and_decoder_flags(monkeypatch):
    """--precision and --decoder: checked before any work; reduced precision needs GPU actors (on this
    CPU bf16 was 8x slower than fp32, BENCHMARKS.md); both reach the actors' options."""
    import ray

    from deepvis.cluster.build import actor_layout
    from deepvis.cluster.config import BuildConfig
    from deepvis.tasks.errors import UserError

    with pytest.raises(UserError, match="precision must be one of fp32, bf16, fp16"):
        BuildConfig.from_dict({"precision": "fp64"})
    with pytest.raises(UserError, match="decoder must be one of pil, torchvision"):
        BuildConfig.from_dict({"decoder": "opencv"})
    with pytest.raises(UserError, match="needs a GPU"):
        BuildConfig.from_dict({"precision": "bf16", "device": "cpu"})
    with pytest.raises(UserError, match="--decoder nvjpeg decodes on the actors' GPUs"):
        BuildConfig.from_dict({"decoder": "nvjpeg", "device": "cpu"})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(UserError, match="needs GPU actors"):
        actor_layout(BuildConfig(precision="fp16"))
    assert actor_layout(BuildConfig(decoder="torchvision"))[0] == 2
    with pytest.raises(UserError, match="nvjpeg .* this cluster has no GPU"):
        actor_layout(BuildConfig(decoder="nvjpeg"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    assert actor_layout(BuildConfig(precision="bf16"))[1]["num_gpus"] == 1
    assert actor_layout(BuildConfig(decoder="nvjpeg"))[1]["num_gpus"] == 1


def test_torchvision_decoder_gives_the_pil_crops(dataset):
    """On CPU torchvision.io.decode_jpeg (libjpeg-turbo) decodes the sample JPEGs to PIL's pixels."""
    from deepvis.cluster.decode import decode_chunk
    from deepvis.tasks.models import load_model
    pre = load_model("efficientnet_lite0").preprocessing
    ids = list_images(dataset)
    a = decode_chunk(dataset_root(dataset), ids, pre, kind="pil")
    b = decode_chunk(dataset_root(dataset), ids, pre, kind="torchvision")
    assert a.ids == b.ids and len(a.ids) == 24 and [s["image"] for s in b.skipped] == ["broken.jpg"]
    assert np.array_equal(a.pixels, b.pixels)


def _decoded(dataset, kind: str, batch_size: int = 5):
    """Every batch of the dataset through a Decoder of `kind`, made whole on the CPU device."""
    from deepvis.cluster.decode import Decoder
    from deepvis.tasks.models import load_model
    pre = load_model("efficientnet_lite0").preprocessing
    dec = Decoder(dataset_root(dataset), pre, 1, kind=kind)
    try:
        raw = list(dec.batches(list_images(dataset), batch_size))
    finally:
        dec.close()
    done = [b.on_device("cpu", pre) for b in raw]
    return raw, [x for b in done for x in b.ids], torch.cat([b.pixels for b in done]), \
        [s["image"] for b in done for s in b.skipped]


def test_nvjpeg_decoder_gives_the_pil_crops_within_one_level(dataset):
    """--decoder nvjpeg: the decode processes send the RGB/grey JPEGs' bytes, the actor's device decodes
    and cuts them (here the CPU: the same torchvision calls as on CUDA but libjpeg-turbo for nvJPEG);
    the CMYK ones and the broken file go the CPU way. Same images, same order, same skips as pil."""
    _, ids_p, px_p, skip_p = _decoded(dataset, "pil")
    raw, ids_n, px_n, skip_n = _decoded(dataset, "nvjpeg")
    assert ids_n == ids_p and len(ids_n) == 24 and skip_n == skip_p == ["broken.jpg"]
    from PIL import Image
    root = dataset_root(dataset)
    modes = [Image.open(os.path.join(root, i)).mode for i in ids_p]
    assert [x for b in raw for x in (b.ids[j] for j in b.jpeg_at)] == \
        [i for i, m in zip(ids_p, modes) if m in ("RGB", "L")]     # those went to the device decoder
    d = (px_n.int() - px_p.int()).abs()
    assert d.max() <= 1 and d.float().mean() < 0.5


def test_nvjpeg_files_the_device_rejects_are_decoded_on_the_cpu(dataset, monkeypatch):
    """A JPEG the device decoder refuses (None from decode_jpegs) is decoded by PIL in the actor: those
    crops are pil's to the bit, the others unchanged; one PIL cannot decode either is skipped."""
    import deepvis.tasks.preprocess as pp
    real = pp.decode_jpegs
    monkeypatch.setattr(pp, "decode_jpegs", lambda datas, device: [
        None if i % 2 else t for i, t in enumerate(real(datas, device))])
    _, ids_p, px_p, _ = _decoded(dataset, "pil")
    raw, ids_n, px_n, skip_n = _decoded(dataset, "nvjpeg")
    assert ids_n == ids_p and skip_n == ["broken.jpg"]
    refused = {b.ids[i] for b in raw for j, i in enumerate(b.jpeg_at) if j % 2}
    assert refused
    for k, image in enumerate(ids_n):
        d = (px_n[k].int() - px_p[k].int()).abs().max()
        assert d == 0 if image in refused else d <= 1


def test_nvjpeg_dataset_shard_agrees_with_pil(dataset, tmp_path):
    """The whole shard with --decoder nvjpeg (on this CPU): the same images seen and skipped as with
    pil, and nearly every unit's top image the same (the crops differ by at most one level)."""
    results = {}
    for kind in ("pil", "nvjpeg"):
        w = ShardWorker("efficientnet_lite0", None, open_store(str(tmp_path / kind)), "cpu", 1,
                        dataset=dataset, decoder=kind)
        try:
            shard = shard_for(w, dataset)
            summary = w.run(shard)
        finally:
            w._close_decoder()
        assert summary["seen"] == 24 and [s["image"] for s in summary["skipped"]] == ["broken.jpg"]
        results[kind] = stored(w, shard)
    for a, b in zip(results["pil"], results["nvjpeg"]):
        same = np.mean(a["top"]["image"][:, 0] == b["top"]["image"][:, 0])
        assert same > 0.9, same
        x, y = a["top"]["activation"][:, 0], b["top"]["activation"][:, 0]
        rel = np.abs(x - y) / np.maximum(np.abs(x), 1e-3)
        assert np.median(rel) < 0.02 and np.percentile(rel, 99) < 0.1, (np.median(rel), np.percentile(rel, 99))


def _chunks_on_device(root: str, ids: list[str], kind: str, endpoint_url: str | None = None):
    """decode_chunk in this process (the decode process's work), then the actor's on_device (CPU)."""
    from deepvis.cluster.decode import Batch, decode_chunk
    from deepvis.tasks.models import load_model
    pre = load_model("efficientnet_lite0").preprocessing
    c = decode_chunk(root, ids, pre, endpoint_url, kind)
    pixels = torch.from_numpy(c.pixels).permute(0, 3, 1, 2) if c.pixels is not None else None
    return c, Batch(c.ids, pixels, c.skipped, c.jpegs, c.jpeg_at).on_device("cpu", pre)


@pytest.mark.parametrize("kind", ["nvjpeg", "torchvision"])
def test_decode_jpeg_takes_what_pil_takes(sample_dir, tmp_path, kind):
    """A JPEG cut short (no EOI marker) or too elongated goes to PIL, which refuses it as with
    --decoder pil, whatever decode_jpeg would make of it; a whole one with zero padding after its EOI
    goes to decode_jpeg (nvjpeg: to the device)."""
    from PIL import Image
    data = sorted(sample_dir.glob("*/*.JPEG"))[0].read_bytes()
    (tmp_path / "whole.jpg").write_bytes(data)
    (tmp_path / "padded.jpg").write_bytes(data + b"\0" * 64)
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    Image.new("RGB", (2020, 20), (200, 10, 10)).save(tmp_path / "strip.jpg")     # aspect 101 > 100
    (tmp_path / "dir.jpg").mkdir()
    ids = ["dir.jpg", "missing.jpg", "padded.jpg", "strip.jpg", "truncated.jpg", "whole.jpg"]
    c, b = _chunks_on_device(str(tmp_path), ids, kind)
    _, p = _chunks_on_device(str(tmp_path), ids, "pil")
    if kind == "nvjpeg":
        assert [c.ids[i] for i in c.jpeg_at] == ["padded.jpg", "whole.jpg"]
    assert b.ids == p.ids == ["padded.jpg", "whole.jpg"]
    assert b.skipped == p.skipped          # the same reasons too
    assert [s["image"] for s in b.skipped] == ["dir.jpg", "missing.jpg", "strip.jpg", "truncated.jpg"]
    assert (b.pixels.int() - p.pixels.int()).abs().max() <= (1 if kind == "nvjpeg" else 0)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    from tests.s3server import s3_server_fixture
    yield from s3_server_fixture(tmp_path_factory, bucket="nvjpeg-ds")


def test_nvjpeg_and_torchvision_read_an_s3_dataset(dataset, s3_server, monkeypatch):
    """An s3:// dataset with --decoder nvjpeg: each object fetched once, its JPEG bytes decoded on the
    device like a local file's (the same crops, the same CPU-path and skipped files); with
    --decoder torchvision, decode_jpeg's crops equal pil's."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    root, ids = dataset_root(dataset), list_images(dataset)
    s3_root = f"s3://{s3_server.bucket}/ds"
    store = open_store(s3_root, s3_server.endpoint_url)
    names = [f"{n:03d}_{os.path.basename(i)}" for n, i in enumerate(ids)]   # keys in the same order
    for i, name in zip(ids, names):
        store.put(name, open(os.path.join(root, i), "rb").read())
    local, lb = _chunks_on_device(root, ids, "nvjpeg")
    s3, sb = _chunks_on_device(s3_root, names, "nvjpeg", s3_server.endpoint_url)
    assert local.jpeg_at == s3.jpeg_at and len(s3.jpeg_at) >= 20            # the RGB/grey JPEGs
    assert [names[ids.index(i)] for i in lb.ids] == sb.ids and len(sb.ids) == 24
    assert [s["image"] for s in sb.skipped] == [names[ids.index("broken.jpg")]]
    assert torch.equal(lb.pixels, sb.pixels)
    _, tb = _chunks_on_device(s3_root, names, "torchvision", s3_server.endpoint_url)   # decode_jpeg too
    _, pb = _chunks_on_device(root, ids, "pil")
    assert tb.ids == sb.ids and torch.equal(tb.pixels, pb.pixels)
