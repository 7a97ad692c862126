"""RunningTopK: exact top-k/bottom-k and stats, whatever the batching, sharding and merge order.

The end-to-end test runs efficientnet_lite0 over the 800 images of ../shared/datasets/imagenet-sample
with the model's real preprocessing and compares with an independent brute force (whole maps kept,
numpy max/argmax, Python's sorted)."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest

from deepvis.tasks.topk import RunningTopK

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "datasets", "imagenet-sample")


# ----------------------------------------------------------------------------- brute force
def brute(values: np.ndarray, ys, xs, ids: list[str], k: int) -> dict:
    """values (N, C): per unit, sorted() on (-act, id) / (act, id); NaN last in both."""
    n, c = values.shape
    out = {}
    for kind in ("top", "bottom"):
        sign = -1.0 if kind == "top" else 1.0
        rows = []
        for u in range(c):
            def key(i, u=u):
                v = float(values[i, u])
                return (np.isnan(v), 0.0 if np.isnan(v) else sign * v, ids[i])
            rows.append(sorted(range(n), key=key)[:k])
        rows = np.array(rows, dtype=np.int64).reshape(c, min(k, n))
        cols = np.arange(c)[:, None]
        out[kind] = {"activation": values.T[cols, rows], "image": np.array(ids, dtype=object)[rows],
                     "y": np.asarray(ys).T[cols, rows], "x": np.asarray(xs).T[cols, rows]}
    return out


def assert_same(res: dict, ref: dict, exact_values=True) -> None:
    for kind in ("top", "bottom"):
        got, exp = res[kind], ref[kind]
        assert got["image"].shape == exp["image"].shape
        bad = np.argwhere(got["image"] != exp["image"])
        assert not len(bad), f"{kind}: first mismatch at unit/rank {bad[0]}: {got['image'][tuple(bad[0])]} " \
                             f"vs {exp['image'][tuple(bad[0])]}"
        np.testing.assert_array_equal(got["y"], exp["y"])
        np.testing.assert_array_equal(got["x"], exp["x"])
        if exact_values:
            np.testing.assert_array_equal(got["activation"], exp["activation"].astype(np.float32))
        else:
            np.testing.assert_allclose(got["activation"], exp["activation"], rtol=1e-6, atol=1e-6)
        assert got["activation"].dtype == np.float32
        assert got["y"].dtype == np.int32 and got["x"].dtype == np.int32


def feed(values, ys, xs, ids, batch: int, k: int = 9, order=None) -> RunningTopK:
    r = RunningTopK(values.shape[1], k)
    idx = list(range(len(ids))) if order is None else list(order)
    for s in range(0, len(idx), batch):
        sel = idx[s:s + batch]
        r.add(values[sel], ys[sel], xs[sel], [ids[i] for i in sel])
    return r


def sharded(values, ys, xs, ids, bounds, batches, merge_tree, k=9) -> RunningTopK:
    parts = []
    for (a, b), bs in zip(zip(bounds[:-1], bounds[1:]), batches):
        parts.append(feed(values[a:b], ys[a:b], xs[a:b], ids[a:b], bs, k))
    return merge_tree(parts)


def synthetic(n=257, c=13, seed=0, levels=5):
    """Activations with many ties (few distinct levels), shuffled ids."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-levels, levels + 1, size=(n, c)).astype(np.float32) / 2
    ys = rng.integers(0, 7, size=(n, c)).astype(np.int32)
    xs = rng.integers(0, 7, size=(n, c)).astype(np.int32)
    ids = [f"class{rng.integers(0, 30):02d}/img_{i:04d}.jpg" for i in rng.permutation(n)]
    return values, ys, xs, ids


# ----------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_ties_and_batch_sizes_match_brute_force(batch):
    values, ys, xs, ids = synthetic()
    ref = brute(values, ys, xs, ids, 9)
    assert_same(feed(values, ys, xs, ids, batch).result(), ref)


def test_add_order_shards_and_merge_order_do_not_matter():
    values, ys, xs, ids = synthetic(n=400, c=9, seed=1, levels=3)
    ref = brute(values, ys, xs, ids, 5)
    rng = random.Random(3)
    order = list(range(400))
    rng.shuffle(order)
    assert_same(feed(values, ys, xs, ids, 33, k=5, order=order).result(), ref)
    bounds = [0, 50, 51, 230, 400]

    def left(parts):
        acc = parts[0]
        for p in parts[1:]:
            acc.merge(p)
        return acc

    def tree_reversed(parts):
        a = parts[3].merge(parts[2])
        b = parts[1].merge(parts[0])
        return RunningTopK(9, 5).merge(b).merge(a)

    for tree in (left, tree_reversed):
        r = sharded(values, ys, xs, ids, bounds, [7, 1, 64, 10], tree, k=5)
        assert_same(r.result(), ref)
        st = r.result()["stats"]
        assert st["count"] == 400


def test_stats_are_exact_enough_and_partition_independent():
    rng = np.random.default_rng(5)
    values = (rng.standard_normal((300, 6)) * 3 + 1).astype(np.float32)
    values[:, 2] = 0.0                                      # never positive, std 0
    ys = np.zeros((300, 6), np.int32)
    ids = [f"{i:05d}" for i in range(300)]
    a = feed(values, ys, ys, ids, 17).result()["stats"]
    b = sharded(values, ys, ys, ids, [0, 100, 101, 300], [3, 1, 50],
                lambda p: p[2].merge(p[0]).merge(p[1])).result()["stats"]
    v64 = values.astype(np.float64)
    for st in (a, b):
        assert st["count"] == 300
        np.testing.assert_allclose(st["mean"], v64.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st["std"], v64.std(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(st["max"], v64.max(0))
        np.testing.assert_array_equal(st["frac_positive"], (values > 0).mean(0))
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-14, atol=1e-15)
    assert a["std"][2] == 0 and a["frac_positive"][2] == 0


def test_fewer_images_than_k_and_empty():
    r = RunningTopK(3, k=9)
    res = r.result()
    assert res["top"]["image"].shape == (3, 0) and res["stats"]["count"] == 0
    assert np.isnan(res["stats"]["mean"]).all()
    v = np.array([[1, 2, 3], [3, 2, 1]], np.float32)
    r.add(v, np.zeros((2, 3), np.int32), np.ones((2, 3), np.int32), ["b", "a"])
    res = r.result()
    assert res["top"]["activation"].shape == (3, 2)
    assert res["top"]["image"].tolist() == [["a", "b"], ["a", "b"], ["b", "a"]]   # unit 1: tie -> id
    assert res["bottom"]["image"].tolist() == [["b", "a"], ["a", "b"], ["a", "b"]]
    assert res["top"]["x"].tolist() == [[1, 1]] * 3
    r.add(np.zeros((0, 3), np.float32), np.zeros((0, 3)), np.zeros((0, 3)), [])   # empty batch: no-op
    assert r.count == 2


def test_nan_sorts_last_and_signed_zero_ties_by_id():
    v = np.array([[np.nan], [-0.0], [0.0], [1.0], [-1.0]], np.float32)
    ids = ["a", "d", "c", "e", "b"]
    z = np.zeros((5, 1), np.int32)
    res = feed(v, z, z, ids, 2, k=5).result()
    assert res["top"]["image"][0].tolist() == ["e", "c", "d", "b", "a"]
    assert res["bottom"]["image"][0].tolist() == ["b", "c", "d", "e", "a"]


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    r = RunningTopK(2, k=2)
    r.add(torch.tensor([[1.0, 2.0], [3.0, 0.5]]), torch.zeros(2, 2, dtype=torch.int32),
          torch.tensor([[4, 5], [6, 7]]), ["x", "y"])
    res = r.result()
    assert res["top"]["image"].tolist() == [["y", "x"], ["x", "y"]]
    assert res["top"]["x"].tolist() == [[6, 4], [5, 7]]


def test_state_dict_round_trip_is_plain_and_resumable():
    values, ys, xs, ids = synthetic(n=120, c=4, seed=7)
    ref = brute(values, ys, xs, ids, 9)
    r = feed(values[:60], ys[:60], xs[:60], ids[:60], 8)
    d = r.state_dict()

    def plain(o):
        if isinstance(o, dict):
            return all(isinstance(k, str) and plain(v) for k, v in o.items())
        if isinstance(o, list):
            return all(isinstance(v, str) for v in o)
        return isinstance(o, (int, np.ndarray)) and (not isinstance(o, np.ndarray) or o.dtype != object)

    assert plain(d)
    assert len(d["ids"]) <= 2 * 9 * 4                       # only the ids still held
    r2 = RunningTopK.from_state_dict(pickle.loads(pickle.dumps(d)))
    r2.add(values[60:], ys[60:], xs[60:], ids[60:])
    assert_same(r2.result(), ref)
    np.testing.assert_allclose(r2.result()["stats"]["mean"], values.astype(np.float64).mean(0), rtol=1e-12)
    with pytest.raises(ValueError):
        RunningTopK.from_state_dict({**d, "version": 99})


def test_duplicate_ids_and_bad_shapes_raise():
    r = RunningTopK(2, k=3)
    z = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="twice"):
        r.add(z, z, z, ["a", "a"])
    r.add(z, z, z, ["a", "b"])
    with pytest.raises(ValueError, match="already"):
        r.add(z, z, z, ["b", "c"])
    other = RunningTopK(2, k=3)
    other.add(z, z, z, ["a", "q"])
    with pytest.raises(ValueError, match="already"):
        r.merge(other)
    with pytest.raises(ValueError):
        r.add(np.zeros((2, 3), np.float32), z, z, ["x", "y"])
    with pytest.raises(ValueError):
        r.merge(RunningTopK(2, k=4))


# ----------------------------------------------------------------------------- real images
@pytest.fixture(scope="module")
def sample_pass():
    """One pass of efficientnet_lite0 over the 800 sample images (real preprocessing, batches of
    32): what batch_unit_maxima returns, and, from the same forward, the whole maps reduced
    independently (numpy max / argmax over the flattened map)."""
    if not os.path.isdir(SAMPLE):
        pytest.skip("../shared/datasets/imagenet-sample is not there")
    torch = pytest.importorskip("torch")
    from deepvis.storage.datasets import dataset_root, list_images, read_image
    from deepvis.tasks.activations import batch_unit_maxima
    from deepvis.tasks.models import load_model
    from deepvis.tasks.preprocess import preprocess

    ids = list_images(SAMPLE)
    root = dataset_root(SAMPLE)
    assert len(ids) == 800
    lm = load_model("efficientnet_lite0")
    layers = ["_blocks.3", "_fc"]
    brute_parts = {name: [] for name in layers}
    ours = {name: [] for name in layers}

    def plain_hook(name):
        def hook(_m, _i, out):
            a = out.detach().cpu().numpy().copy()
            if a.ndim == 2:
                brute_parts[name].append((a, np.zeros(a.shape, np.int64), np.zeros(a.shape, np.int64)))
            else:
                b, c, h, w = a.shape
                flat = a.reshape(b, c, h * w)
                pos = flat.argmax(axis=2)                  # numpy: first occurrence
                brute_parts[name].append((flat.max(axis=2), pos // w, pos % w))
        return hook

    handles = [lm.module.get_submodule(n).register_forward_hook(plain_hook(n)) for n in layers]
    try:
        for s in range(0, len(ids), 32):
            x = torch.stack([preprocess(read_image(root, i), lm.preprocessing) for i in ids[s:s + 32]])
            for name, (v, y, xx) in batch_unit_maxima(lm.module, layers, x).items():
                assert v.dtype == torch.float32 and y.dtype == torch.int32 and xx.dtype == torch.int32
                ours[name].append((v.numpy(), y.numpy(), xx.numpy()))
    finally:
        for h in handles:
            h.remove()
    cat = lambda parts: tuple(np.concatenate([p[j] for p in parts]) for j in range(3))  # noqa: E731
    return ids, {n: cat(ours[n]) for n in layers}, {n: cat(brute_parts[n]) for n in layers}


@pytest.mark.parametrize("layer", ["_blocks.3", "_fc"])
def test_imagenet_sample_matches_brute_force(sample_pass, layer):
    ids, ours, brute_maps = sample_pass
    v, y, x = ours[layer]
    bv, by, bx = brute_maps[layer]
    # the per-image reduction: same values, same first-occurrence argmax
    np.testing.assert_array_equal(v, bv.astype(np.float32))
    np.testing.assert_array_equal(y, by)
    np.testing.assert_array_equal(x, bx)
    ref = brute(bv.astype(np.float64), by, bx, ids, 9)

    single = feed(v, y, x, ids, 32)
    assert_same(single.result(), ref, exact_values=False)
    bounds = [0, 200, 400, 600, 800]                        # contiguous shards of the sorted ids
    merged = sharded(v, y, x, ids, bounds, [32, 17, 64, 5],
                     lambda p: p[3].merge(p[1]).merge(p[2].merge(p[0])))
    assert_same(merged.result(), ref, exact_values=False)
    st, st2 = single.result()["stats"], merged.result()["stats"]
    assert st["count"] == st2["count"] == 800
    np.testing.assert_allclose(st["mean"], bv.astype(np.float64).mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(st["std"], bv.astype(np.float64).std(0), rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(st["max"], st2["max"])
    np.testing.assert_array_equal(st["frac_positive"], st2["frac_positive"])

    # the same data quantized to a few levels: ties everywhere, broken by image id
    q = np.round(v * 2) / 2
    ref_q = brute(q.astype(np.float64), y, x, ids, 9)
    assert_same(sharded(q, y, x, ids, bounds, [9, 32, 1, 100],
                        lambda p: p[2].merge(p[3]).merge(p[0]).merge(p[1])).result(), ref_q)


# ----------------------------------------------------------------------------- device path
@pytest.fixture
def device_path(monkeypatch):
    """Run RunningTopK's accelerator path (stats and filter in torch, candidates to host) with CPU
    tensors; on a machine with CUDA, the tests below also run it on the GPU."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(RunningTopK, "_device_path_on_cpu", True)
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_device_path_matches_brute_force_and_host_path(device_path):
    import torch
    values, ys, xs, ids = synthetic(n=300, c=11, seed=11, levels=4)
    values[5, 3] = values[77, 3] = np.nan
    values[9, :] = -0.0
    ref = brute(values, ys, xs, ids, 9)
    for dev in device_path:
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        r = RunningTopK(11, 9)
        for s in range(0, 300, 23):
            r.add(t(values[s:s + 23]), t(ys[s:s + 23]), t(xs[s:s + 23]), ids[s:s + 23])
        assert_same(r.result(), ref)
        host = feed(values, ys, xs, ids, 23).result()["stats"]
        st = r.result()["stats"]
        assert st["count"] == 300
        for key in ("max", "frac_positive"):
            np.testing.assert_array_equal(st[key], host[key])
        np.testing.assert_allclose(st["mean"], host["mean"], rtol=1e-12, equal_nan=True)
        # mixed: device batches, a host batch, a state_dict round trip, a merge
        a = RunningTopK(11, 9)
        a.add(t(values[:100]), t(ys[:100]), t(xs[:100]), ids[:100])
        a.add(values[100:150], ys[100:150], xs[100:150], ids[100:150])
        a = RunningTopK.from_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
        a.add(t(values[150:200]), t(ys[150:200]), t(xs[150:200]), ids[150:200])
        other = RunningTopK(11, 9)
        other.add(t(values[200:]), t(ys[200:]), t(xs[200:]), ids[200:])
        assert_same(other.merge(a).result(), ref)


# ----------------------------------------------------------------------------- DeviceTopK
def device_feed(values, ys, xs, ids, batch, widths=None, k=9, dev="cpu", order=None):
    import torch
    from deepvis.tasks.topk import DeviceTopK
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    r = DeviceTopK(values.shape[1], k, ids, device=dev)
    idx = list(range(len(ids))) if order is None else list(order)
    for s in range(0, len(idx), batch):
        sel = idx[s:s + batch]
        r.add(t(values[sel]), t(ys[sel]), t(xs[sel]), [ids[i] for i in sel])
    return r.to_host(widths)


def assert_same_stats(got: dict, exp: dict) -> None:
    assert got["count"] == exp["count"]
    for key in ("max", "frac_positive"):
        np.testing.assert_array_equal(got[key], exp[key])
    for key in ("mean", "std"):
        np.testing.assert_allclose(got[key], exp[key], rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_device_topk_is_identical_to_the_host_reducer(batch):
    """Ties everywhere, NaN, -0.0, shuffled add order, several layers in one state: DeviceTopK gives
    exactly what RunningTopK gives, and its states merge and round-trip like any host state."""
    pytest.importorskip("torch")
    values, ys, xs, ids = synthetic(n=300, c=11, seed=5, levels=3)
    values[5, 3] = values[77, 3] = np.nan
    values[9, :] = -0.0
    values[10, :] = 0.0
    order = np.random.default_rng(1).permutation(300)
    devs = ["cpu"] + (["cuda"] if __import__("torch").cuda.is_available() else [])
    for dev in devs:
        parts = device_feed(values, ys, xs, ids, batch, widths=[4, 7], dev=dev, order=order)
        for part, sl in zip(parts, (slice(0, 4), slice(4, 11))):
            host = feed(values[:, sl], ys[:, sl], xs[:, sl], ids, batch)
            assert_same(part.result(), host.result())
            assert_same(part.result(), brute(values[:, sl], ys[:, sl], xs[:, sl], ids, 9))
            assert_same_stats(part.result()["stats"], host.result()["stats"])
            back = RunningTopK.from_state_dict(pickle.loads(pickle.dumps(part.state_dict())))
            assert_same(back.result(), host.result())
        # shards reduced on the device merge with host-reduced ones, as the build's merge does
        a = device_feed(values[:120], ys[:120], xs[:120], ids[:120], batch, dev=dev)[0]
        b = feed(values[120:], ys[120:], xs[120:], ids[120:], batch)
        assert_same(b.merge(a).result(), brute(values, ys, xs, ids, 9))


def test_device_topk_fewer_images_than_k_and_none():
    pytest.importorskip("torch")
    values, ys, xs, ids = synthetic(n=5, c=3, seed=2)
    got = device_feed(values, ys, xs, ids, 2)[0].result()
    assert got["top"]["image"].shape == (3, 5)
    assert_same(got, feed(values, ys, xs, ids, 2).result())
    empty = device_feed(values[:0], ys[:0], xs[:0], [], 4)[0]
    assert empty.count == 0 and empty.result()["top"]["image"].shape == (3, 0)
    from deepvis.tasks.topk import DeviceTopK
    with pytest.raises(ValueError, match="distinct"):
        DeviceTopK(3, 2, ["a", "a"])


def test_device_topk_on_the_imagenet_sample(sample_pass):
    """The two layers of the sample pass in one device state: identical to the host reducer."""
    ids, ours, _ = sample_pass
    layers = ["_blocks.3", "_fc"]
    cat = [np.concatenate([ours[n][j] for n in layers], axis=1) for j in range(3)]
    parts = device_feed(*cat, ids, 32, widths=[ours[n][0].shape[1] for n in layers])
    for part, name in zip(parts, layers):
        host = feed(*ours[name], ids, 32).result()
        assert_same(part.result(), host)
        assert_same_stats(part.result()["stats"], host["stats"])
