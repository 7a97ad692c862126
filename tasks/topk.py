"""Streaming, exactly mergeable reducer of per-image unit activations (one instance per layer).

For every unit it keeps the k strongest and the k weakest images (activation, image id, argmax
position) and the running statistics of the activation over all images seen.

Exactness. The order is a total order on (activation, image id): top = activation descending, ties by
image id ascending; bottom = activation ascending, ties by image id ascending (FORMAT.md). Because it
is a total order, the top-k of a union is the top-k of the union of the parts' top-k, so the result is
the same whatever the batch size, the sharding and the order of `add`/`merge` calls. Details:
  - -0.0 and +0.0 compare equal (the id decides), as Python's `sorted` on (-act, id) does;
  - NaN activations sort after every number in both lists (they are kept only when fewer than k
    numbers were seen), ties among them by id;
  - every image id must be added once: an id seen twice in a batch, or already held when added or
    merged again, raises ValueError (an id that was seen but is no longer held cannot be detected).
The statistics are kept as float64 sums of x and x² (population std), an exact max and an integer
count of positives: max, frac_positive and count are exact; mean and std are independent of the
partition up to float64 rounding (~1e-15 relative), far below the float32 precision of the inputs.

Implementation: image ids are interned into a sorted table of the ids currently held, so that the
sort key of a candidate is one uint64 (order-preserving bits of the float32 activation << 32 | rank
of the id in the table) and the per-unit selection is a plain vectorized numpy sort. Once every unit
holds k entries, only candidates at least as good as a unit's k-th entry are looked at (after a few
batches, few are). Values given as torch tensors on a GPU are filtered (and their statistics summed)
there, and only those candidates are copied to the host.
"""
from __future__ import annotations

import numpy as np

STATE_VERSION = 1
_NAN_KEY = np.uint64(0xFFFFFFFF)


def _np(a, dtype) -> np.ndarray:
    if hasattr(a, "detach"):                      # torch tensor (CPU); no torch import needed here
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def _np2(a, dtype, units: int) -> np.ndarray:
    a = np.array(a, dtype=dtype)
    if a.ndim != 2 or a.shape[0] != units:
        raise ValueError(f"RunningTopK state holds an array of shape {a.shape}, expected ({units}, n)")
    return a


def _ordered_bits(act: np.ndarray, descending: bool) -> np.ndarray:
    """float32 -> uint64 holding a uint32 whose unsigned order is the float order (ascending, or
    descending when asked); -0.0 == +0.0; NaN -> 0xFFFFFFFF (last) either way."""
    a = np.ascontiguousarray(act, dtype=np.float32) + np.float32(0.0)   # -0.0 + 0.0 = +0.0
    bits = a.view(np.uint32)
    key = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    if descending:
        key = ~key
    key = key.astype(np.uint64)
    key[np.isnan(a)] = _NAN_KEY
    return key


class _Side:
    """The k best entries of every unit in one direction. Arrays (units, n), n <= k, best first."""
    __slots__ = ("act", "idx", "y", "x")

    def __init__(self, units: int):
        self.act = np.zeros((units, 0), np.float32)
        self.idx = np.zeros((units, 0), np.int64)      # row into the owner's sorted id table
        self.y = np.zeros((units, 0), np.int32)
        self.x = np.zeros((units, 0), np.int32)

    def select(self, k: int, act, idx, y, x, descending: bool, rows: np.ndarray | None = None) -> None:
        """Keep the k best of the existing entries plus the candidates (arrays (units, m)).
        rows: the candidates are for these units only (arrays (len(rows), m)); every unit must then
        already hold k entries."""
        if rows is not None:
            if len(rows):
                sub = _Side(0)
                sub.act, sub.idx, sub.y, sub.x = self.act[rows], self.idx[rows], self.y[rows], self.x[rows]
                sub.select(k, act, idx, y, x, descending)
                self.act[rows], self.idx[rows], self.y[rows], self.x[rows] = sub.act, sub.idx, sub.y, sub.x
            return
        act = np.concatenate([self.act, act], axis=1)
        idx = np.concatenate([self.idx, idx], axis=1)
        y = np.concatenate([self.y, y], axis=1)
        x = np.concatenate([self.x, x], axis=1)
        n = min(k, act.shape[1])
        key = (_ordered_bits(act, descending) << np.uint64(32)) | idx.astype(np.uint64)
        if act.shape[1] > 2 * n + 8:               # wide: partition first, then sort the n kept
            part = np.argpartition(key, n - 1, axis=1)[:, :n]
            order = np.take_along_axis(part, np.argsort(np.take_along_axis(key, part, 1), axis=1), 1)
        else:
            order = np.argsort(key, axis=1)[:, :n]
        self.act = np.take_along_axis(act, order, 1)
        self.idx = np.take_along_axis(idx, order, 1)
        self.y = np.take_along_axis(y, order, 1)
        self.x = np.take_along_axis(x, order, 1)


def _gather(ok: np.ndarray, act, idx, y, x):
    """The candidates flagged in ok (n, B) (every row has one), packed left per row and padded to
    the widest count with entries that sort after everything real (NaN, id row 2**32 - 1).
    Arrays act/idx/y/x are (n, B); returns four (n, m)."""
    counts = ok.sum(axis=1)
    n, m = ok.shape[0], int(counts.max())
    if m * 2 >= ok.shape[1]:                         # dense: no packing
        return act, idx, y, x
    r, c = np.nonzero(ok)
    slot = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)
    out_act = np.full((n, m), np.nan, np.float32)
    out_idx = np.full((n, m), 2**32 - 1, np.int64)
    out_y = np.zeros((n, m), np.int32)
    out_x = np.zeros((n, m), np.int32)
    out_act[r, slot], out_idx[r, slot], out_y[r, slot], out_x[r, slot] = act[r, c], idx[r, c], y[r, c], x[r, c]
    return out_act, out_idx, out_y, out_x


def _pack_pairs(unit: np.ndarray, act, idx, y, x):
    """Candidates as (unit, value...) pairs in any order -> (rows: the sorted distinct units,
    act/idx/y/x: (len(rows), m) packed left per unit, padded as in _gather)."""
    order = np.argsort(unit, kind="stable")
    unit = unit[order]
    rows, start, counts = np.unique(unit, return_index=True, return_counts=True)
    n, m = len(rows), int(counts.max())
    r = np.repeat(np.arange(n), counts)
    slot = np.arange(len(unit)) - np.repeat(start, counts)
    out_act = np.full((n, m), np.nan, np.float32)
    out_idx = np.full((n, m), 2**32 - 1, np.int64)
    out_y = np.zeros((n, m), np.int32)
    out_x = np.zeros((n, m), np.int32)
    out_act[r, slot], out_idx[r, slot] = act[order], idx[order]
    out_y[r, slot], out_x[r, slot] = y[order], x[order]
    return rows, out_act, out_idx, out_y, out_x


def _on_device(a) -> bool:
    """A torch tensor on an accelerator (the reducer then works next to it, see _add_device)."""
    dev = getattr(a, "device", None)
    return dev is not None and getattr(dev, "type", "cpu") != "cpu" and hasattr(a, "detach")


class RunningTopK:
    """Per layer: top-k / bottom-k images and running stats of each of `units` units."""

    def __init__(self, units: int, k: int = 9):
        if int(units) < 0 or int(k) < 1:
            raise ValueError(f"RunningTopK needs units >= 0 and k >= 1 (got units={units}, k={k})")
        self.units = int(units)
        self.k = int(k)
        self.count = 0
        self._ids = np.empty(0, dtype=object)        # sorted, unique: the ids held by top/bottom
        self._top = _Side(self.units)
        self._bottom = _Side(self.units)
        self._sum = np.zeros(self.units, np.float64)
        self._sumsq = np.zeros(self.units, np.float64)
        self._max = np.full(self.units, -np.inf, np.float64)
        self._npos = np.zeros(self.units, np.int64)
        self._dev = None          # device-side stats and k-th thresholds (see _add_device)

    # tests set this to run the device path with CPU torch tensors
    _device_path_on_cpu = False

    # ------------------------------------------------------------------ id table
    def _intern(self, new_ids: np.ndarray) -> np.ndarray:
        """Insert `new_ids` (object array of str, unique among themselves and not held) into the
        sorted table; re-number the held entries; return the table rows of new_ids (input order)."""
        order = np.argsort(new_ids, kind="stable")
        sorted_new = new_ids[order]
        if len(sorted_new) > 1:
            dup = sorted_new[1:] == sorted_new[:-1]
            if dup.any():
                raise ValueError(f"image id {sorted_new[1:][dup][0]!r} given twice")
        pos = np.searchsorted(self._ids, sorted_new)
        inside = pos < len(self._ids)
        if inside.any():
            clash = self._ids[pos[inside]] == sorted_new[inside]
            if clash.any():
                raise ValueError(f"image id {sorted_new[inside][clash][0]!r} was already added")
        m = len(self._ids)
        remap = np.arange(m, dtype=np.int64) + np.searchsorted(pos, np.arange(m), side="right")
        for side in (self._top, self._bottom):
            side.idx = remap[side.idx]
        self._ids = np.insert(self._ids, pos, sorted_new)
        rows = np.empty(len(new_ids), np.int64)
        rows[order] = pos + np.arange(len(new_ids))
        return rows

    def _prune(self) -> None:
        """Drop the ids no longer held by any unit."""
        if not len(self._ids):
            return
        keep = np.zeros(len(self._ids), bool)
        keep[self._top.idx.ravel()] = True
        keep[self._bottom.idx.ravel()] = True
        if keep.all():
            return
        newpos = np.cumsum(keep) - 1
        for side in (self._top, self._bottom):
            side.idx = newpos[side.idx]
        self._ids = self._ids[keep]

    # ------------------------------------------------------------------ public API
    def add(self, values, ys, xs, image_ids) -> None:
        """values, ys, xs: (B, units) (numpy or CPU torch); image_ids: B distinct ids.
        Torch tensors on an accelerator (batch_unit_maxima(..., to_cpu=False)) are reduced there:
        statistics and the "can it enter?" filter run on the device and only the candidates that
        can enter a top/bottom list come to the host. Same result either way."""
        if _on_device(values) or (self._device_path_on_cpu and hasattr(values, "detach")):
            return self._add_device(values, ys, xs, image_ids)
        self._fold()
        v = _np(values, np.float32)
        ids = np.empty(len(image_ids), dtype=object)
        ids[:] = [str(i) for i in image_ids]
        b = len(ids)
        if v.ndim != 2 or v.shape != (b, self.units):
            raise ValueError(f"values must be (B={b}, units={self.units}), got {tuple(v.shape)}")
        y = _np(ys, np.int32)
        x = _np(xs, np.int32)
        if y.shape != v.shape or x.shape != v.shape:
            raise ValueError(f"ys and xs must have the shape of values {tuple(v.shape)}")
        if b == 0:
            return
        rows = self._intern(ids)
        bmax, bmin = v.max(axis=0), v.min(axis=0)      # NaN where a unit got a NaN
        nan_units = np.isnan(bmax)
        for side, desc in ((self._top, True), (self._bottom, False)):
            if self.count < self.k:
                side.select(self.k, v.T, np.broadcast_to(rows, (self.units, b)), y.T, x.T, descending=desc)
                continue
            # every unit holds k entries: only candidates at least as good as a unit's k-th entry
            # can enter (a tie may, by id); a NaN k-th entry lets every candidate of its unit in
            kth = side.act[:, -1]
            kth_nan = np.isnan(kth)
            with np.errstate(invalid="ignore"):
                units = np.flatnonzero(((bmax >= kth) if desc else (bmin <= kth)) | kth_nan | nan_units)
                if not len(units):
                    continue
                vr, kr = v[:, units], kth[units]
                ok = ((vr >= kr) if desc else (vr <= kr)) | kth_nan[units]   # (B, n)
            hit = ok.any(axis=0)
            if not hit.all():
                units, vr, ok = units[hit], vr[:, hit], ok[:, hit]
            if len(units):
                side.select(self.k, *_gather(ok.T, vr.T, np.broadcast_to(rows, (len(units), b)),
                                             y[:, units].T, x[:, units].T), descending=desc, rows=units)
        self._prune()
        self._sum += v.sum(axis=0, dtype=np.float64)
        v64 = v.astype(np.float64)
        self._sumsq += np.einsum("ij,ij->j", v64, v64)
        self._max = np.maximum(self._max, bmax)
        self._npos += np.count_nonzero(v > 0, axis=0)
        self.count += b

    def _add_device(self, values, ys, xs, image_ids) -> None:
        import torch

        v = values.detach().to(torch.float32)
        b = len(image_ids)
        if v.dim() != 2 or tuple(v.shape) != (b, self.units) or tuple(ys.shape) != tuple(v.shape) \
                or tuple(xs.shape) != tuple(v.shape):
            raise ValueError(f"values, ys, xs must be (B={b}, units={self.units}), got "
                             f"{tuple(v.shape)}, {tuple(ys.shape)}, {tuple(xs.shape)}")
        if b == 0:
            return
        ids = np.empty(b, dtype=object)
        ids[:] = [str(i) for i in image_ids]
        rows = self._intern(ids)
        dev = v.device
        if self._dev is None or self._dev["device"] != dev:
            self._fold()
            z = torch.zeros(self.units, dtype=torch.float64, device=dev)
            self._dev = {"device": dev, "sum": z, "sumsq": z.clone(), "max": torch.full_like(z, -np.inf),
                         "npos": torch.zeros(self.units, dtype=torch.int64, device=dev), "kth": None}
        d = self._dev
        vd = v.double()
        d["sum"] += vd.sum(0)
        d["sumsq"] += (vd * vd).sum(0)
        d["max"] = torch.maximum(d["max"], v.amax(0).double())
        d["npos"] += (v > 0).sum(0)
        if self.count < self.k:                            # filling up: every value is a candidate
            host = torch.stack([v.view(torch.int32), ys.to(torch.int32), xs.to(torch.int32)]).cpu().numpy()
            vh, yh, xh = host[0].view(np.float32), host[1], host[2]
            full = np.broadcast_to(rows, (self.units, b))
            self._top.select(self.k, vh.T, full, yh.T, xh.T, descending=True)
            self._bottom.select(self.k, vh.T, full, yh.T, xh.T, descending=False)
        else:
            if d["kth"] is None:
                d["kth"] = torch.from_numpy(np.stack([self._top.act[:, -1], self._bottom.act[:, -1]])).to(dev)
            kt, kb = d["kth"][0], d["kth"][1]
            ok_t = (v >= kt) | torch.isnan(kt)
            ok_b = (v <= kb) | torch.isnan(kb)
            bi, ui = torch.nonzero(ok_t | ok_b, as_tuple=True)
            if len(bi):
                host = torch.stack([v[bi, ui].view(torch.int32), ys[bi, ui].to(torch.int32),
                                    xs[bi, ui].to(torch.int32), ok_t[bi, ui].to(torch.int32),
                                    ok_b[bi, ui].to(torch.int32), bi.to(torch.int32),
                                    ui.to(torch.int32)]).cpu().numpy()
                act = host[0].view(np.float32)
                for side, desc, flag in ((self._top, True, host[3]), (self._bottom, False, host[4])):
                    sel = flag.astype(bool)
                    if sel.any():
                        units, a, i, yy, xx = _pack_pairs(host[6][sel], act[sel], rows[host[5][sel]],
                                                          host[1][sel], host[2][sel])
                        side.select(self.k, a, i, yy, xx, descending=desc, rows=units)
        self._prune()
        self.count += b
        if self.count >= self.k:
            d["kth"] = torch.from_numpy(np.stack([self._top.act[:, -1], self._bottom.act[:, -1]])).to(dev)

    def _fold(self) -> None:
        """Move device-side statistics into the host arrays."""
        d = self._dev
        if d is None:
            return
        self._sum += d["sum"].cpu().numpy()
        self._sumsq += d["sumsq"].cpu().numpy()
        self._max = np.maximum(self._max, d["max"].cpu().numpy())
        self._npos += d["npos"].cpu().numpy()
        self._dev = None

    def merge(self, other: "RunningTopK") -> "RunningTopK":
        """Fold `other` (covering images disjoint from ours) into self, in place; returns self."""
        if not isinstance(other, RunningTopK):
            raise TypeError(f"can only merge a RunningTopK, not {type(other).__name__}")
        if other is self:
            raise ValueError("cannot merge a RunningTopK with itself")
        if (other.units, other.k) != (self.units, self.k):
            raise ValueError(f"cannot merge RunningTopK(units={other.units}, k={other.k}) into "
                             f"RunningTopK(units={self.units}, k={self.k})")
        if other.count == 0:
            return self
        self._fold()
        other._fold()
        rows = self._intern(other._ids)
        for mine, theirs, desc in ((self._top, other._top, True), (self._bottom, other._bottom, False)):
            mine.select(self.k, theirs.act, rows[theirs.idx], theirs.y, theirs.x, descending=desc)
        self._prune()
        self._sum += other._sum
        self._sumsq += other._sumsq
        self._max = np.maximum(self._max, other._max)
        self._npos += other._npos
        self.count += other.count
        return self

    def result(self) -> dict:
        """{"top"/"bottom": {"activation", "image", "y", "x"}: arrays (units, min(k, count)),
        rank 0 first; "stats": {"count", "mean", "std", "max", "frac_positive"} over all images}."""
        self._fold()
        out = {}
        for name, side in (("top", self._top), ("bottom", self._bottom)):
            out[name] = {"activation": side.act.copy(), "image": self._ids[side.idx] if side.idx.size
                         else np.empty(side.idx.shape, dtype=object),
                         "y": side.y.copy(), "x": side.x.copy()}
        n = self.count
        if n:
            mean = self._sum / n
            var = np.maximum(self._sumsq / n - mean * mean, 0.0)
            stats = {"count": n, "mean": mean, "std": np.sqrt(var), "max": self._max.copy(),
                     "frac_positive": self._npos / n}
        else:
            nan = np.full(self.units, np.nan)
            stats = {"count": 0, "mean": nan, "std": nan.copy(), "max": nan.copy(),
                     "frac_positive": nan.copy()}
        out["stats"] = stats
        return out

    def state_dict(self) -> dict:
        """Plain numpy arrays, lists and ints (picklable); holds only the ids still referenced."""
        self._fold()
        d = {"version": STATE_VERSION, "units": self.units, "k": self.k, "count": self.count,
             "ids": [str(s) for s in self._ids],
             "sum": self._sum.copy(), "sumsq": self._sumsq.copy(), "max": self._max.copy(),
             "npos": self._npos.copy()}
        for name, side in (("top", self._top), ("bottom", self._bottom)):
            d[f"{name}_act"] = side.act.copy()
            d[f"{name}_idx"] = side.idx.astype(np.int32 if len(self._ids) < 2**31 else np.int64)
            d[f"{name}_y"] = side.y.copy()
            d[f"{name}_x"] = side.x.copy()
        return d

    @classmethod
    def from_state_dict(cls, d: dict) -> "RunningTopK":
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported RunningTopK state version {d.get('version')!r}")
        self = cls(int(d["units"]), int(d["k"]))
        self.count = int(d["count"])
        ids = np.empty(len(d["ids"]), dtype=object)
        ids[:] = list(d["ids"])
        self._ids = ids
        self._sum = np.array(d["sum"], np.float64)
        self._sumsq = np.array(d["sumsq"], np.float64)
        self._max = np.array(d["max"], np.float64)
        self._npos = np.array(d["npos"], np.int64)
        for name, side in (("top", self._top), ("bottom", self._bottom)):
            side.act = _np2(d[f"{name}_act"], np.float32, self.units)
            side.idx = _np2(d[f"{name}_idx"], np.int64, self.units)
            side.y = _np2(d[f"{name}_y"], np.int32, self.units)
            side.x = _np2(d[f"{name}_x"], np.int32, self.units)
        return self

    def __repr__(self) -> str:
        return f"RunningTopK(units={self.units}, k={self.k}, count={self.count})"


# ---------------------------------------------------------------------------------- on the device
_INT32_MAX = 2**31 - 1
_EMPTY = 2**63 - 1            # the key of an empty slot: after every real entry


def _device_keys(v, ranks):
    """float32 (B, C) + id ranks (B,) -> int64 (C, B) keys (descending, ascending) whose ascending
    order is the reducer's total order for the top and the bottom list: the activation's
    order-preserving int32 bits (inverted for the top) in the high half, the id's rank in the low
    half; -0.0 == +0.0; NaN last in both directions (as _ordered_bits). The bits are taken once."""
    import torch

    bits = (v + 0.0).view(torch.int32).to(torch.int64)          # -0.0 + 0.0 = +0.0
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)          # monotone in the float value
    nan = torch.isnan(v)
    rank = ranks.view(-1, 1)
    desc = (-key - 1).masked_fill_(nan, _INT32_MAX)
    asc = key.masked_fill_(nan, _INT32_MAX)
    return (desc * 2**32 + rank).T, (asc * 2**32 + rank).T


class DeviceTopK:
    """RunningTopK's top-k / bottom-k and statistics kept where the activations are (a GPU): per side
    a [units, k] state merged with each batch by one torch.topk, no host work per batch, and one
    host copy at the end (`to_host`). Every image id the reducer may see is given up front (a
    dataset shard's): the rank of an id in sorted order breaks ties, so the order is RunningTopK's
    (activation, then id ascending) and the result is identical to it (statistics up to float64
    rounding). Give it the concatenated units of several layers and split them in `to_host`."""

    def __init__(self, units: int, k: int, ids: list[str], device="cpu", merge_every: int = 64):
        import torch

        self.units, self.k, self.count = int(units), int(k), 0
        self.ids = sorted(str(i) for i in ids)
        self.rank = {s: r for r, s in enumerate(self.ids)}
        if len(self.rank) != len(self.ids):
            raise ValueError("DeviceTopK needs distinct image ids")
        dev = torch.device(device)
        shape = (2, self.units, self.k)           # side 0: top, side 1: bottom
        self.key = torch.full(shape, _EMPTY, dtype=torch.int64, device=dev)
        self.act = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(shape, dtype=torch.int32, device=dev)     # y << 16 | x
        self.sum = torch.zeros(self.units, dtype=torch.float64, device=dev)
        self.sumsq = torch.zeros_like(self.sum)
        self.max = torch.full_like(self.sum, -np.inf)
        self.npos = torch.zeros(self.units, dtype=torch.int64, device=dev)
        self.merge_every = merge_every
        self._pending: list = []                  # (values, pos, ranks) of batches not merged yet
        self._npending = 0

    def add(self, values, ys, xs, image_ids) -> None:
        """values (B, units) float, ys/xs (B, units) int (< 65536), tensors on the reducer's device.
        Batches are held until `merge_every` images are pending, then merged in one step: the merge
        costs about units x (k + pending), so small forward batches (the faster ones on a CPU) would
        otherwise pay k per image again and again."""
        import torch

        b = len(image_ids)
        if tuple(values.shape) != (b, self.units):
            raise ValueError(f"values must be (B={b}, units={self.units}), got {tuple(values.shape)}")
        if b == 0:
            return
        ranks = torch.tensor([self.rank[str(i)] for i in image_ids], dtype=torch.int64)
        pos = ys.to(torch.int32) * 65536 + xs.to(torch.int32)
        self._pending.append((values.to(torch.float32), pos, ranks.to(self.key.device)))
        self._npending += b
        if self._npending >= self.merge_every:
            self._merge_pending()

    def _merge_pending(self) -> None:
        """The pending batches into the [units, k] lists and the statistics."""
        import torch

        if not self._pending:
            return
        parts, self._pending, self._npending = self._pending, [], 0
        v, pos, ranks = (torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts))
        for side, key in enumerate(_device_keys(v, ranks)):
            key = torch.cat([self.key[side], key], dim=1)
            self.key[side], order = torch.topk(key, self.k, dim=1, largest=False, sorted=True)
            self.act[side] = torch.cat([self.act[side], v.T], dim=1).gather(1, order)
            self.pos[side] = torch.cat([self.pos[side], pos.T], dim=1).gather(1, order)
        vd = v.double()
        self.sum += vd.sum(0)
        self.sumsq += (vd * vd).sum(0)
        self.max = torch.maximum(self.max, vd.amax(0))
        self.npos += (v > 0).sum(0)
        self.count += len(ranks)

    def to_host(self, widths: list[int] | None = None) -> list[RunningTopK]:
        """One device->host copy; RunningTopK per group of `widths` consecutive units (default: one)."""
        import torch

        self._merge_pending()
        parts = [self.key, self.act.view(torch.int32), self.pos, self.sum, self.sumsq, self.max, self.npos]
        flat = torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts]).cpu().numpy()
        arrays, at = [], 0
        for p in parts:
            n = p.numel() * p.element_size()
            arrays.append(flat[at:at + n].view(_NP_DTYPE[str(p.dtype)]).reshape(p.shape))
            at += n
        key, act_bits, pos, s, sq, mx, npos = arrays
        widths = widths or [self.units]
        if sum(widths) != self.units:
            raise ValueError(f"widths add up to {sum(widths)}, not {self.units} units")
        out, start = [], 0
        for w in widths:
            sl = slice(start, start + w)
            out.append(self._host_part(key[:, sl], act_bits[:, sl].view(np.float32), pos[:, sl],
                                       (s[sl], sq[sl], mx[sl], npos[sl])))
            start += w
        return out

    def _host_part(self, key, act, pos, stats) -> RunningTopK:
        n = min(self.k, self.count)
        r = RunningTopK(key.shape[1], self.k)
        r.count = self.count
        ranks = (key[:, :, :n] & 0xFFFFFFFF).astype(np.int64)
        held = np.unique(ranks)
        r._ids = np.empty(len(held), dtype=object)
        r._ids[:] = [self.ids[i] for i in held]
        for side, i in ((r._top, 0), (r._bottom, 1)):
            side.idx = np.searchsorted(held, ranks[i]).astype(np.int64)
            side.act = np.ascontiguousarray(act[i, :, :n])
            side.y = (pos[i, :, :n] >> 16).astype(np.int32)
            side.x = (pos[i, :, :n] & 0xFFFF).astype(np.int32)
        r._sum, r._sumsq, r._max = (np.array(a, np.float64) for a in stats[:3])
        r._npos = np.array(stats[3], np.int64)
        return r


_NP_DTYPE = {"torch.int64": np.int64, "torch.int32": np.int32, "torch.float64": np.float64}
