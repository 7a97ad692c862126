"""The dataset pass's image decoding, in other processes (no GIL shared with the forward pass).

A `Decoder` keeps a pool of spawned processes for the lifetime of its actor. Each process reads and
decodes images (storage.datasets.read_image, or torchvision.io.decode_jpeg for JPEG files with
`kind="torchvision"`) and cuts the model's input crop (tasks.preprocess.crop_input: resize + centre
crop), and sends back uint8 pixels: 4x fewer bytes than floats, and no float work on the CPUs (the
actor normalizes on its device, tasks.activations.to_model_input). The pil processes never import
torch.

With `kind="nvjpeg"` the processes only read the files and check their headers (format, mode, the
size limits of storage.images) and send the JPEG bytes; the actor decodes a whole batch at once on its
device (tasks.preprocess.decode_jpegs: batched nvJPEG on a GPU) and cuts the crops there
(crop_tensor). Anything else (PNG, CMYK, an S3 dataset, a file the device decoder rejects, a
preprocessing whose geometry crop_tensor does not reproduce) is decoded on the CPU as with pil.

A process that dies (killed, out of memory) breaks the pool: `batches` then raises
concurrent.futures.process.BrokenProcessPool and the caller starts a new Decoder and redoes its shard.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import types
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from deepvis.cluster.config import DECODERS  # noqa: F401 (pil, torchvision, nvjpeg; re-exported)

CHUNK = 8          # images per task sent to a decode process


@dataclass
class Chunk:
    """What a decode process returns for a few consecutive image ids."""
    ids: list[str]                              # the images decoded, in order
    pixels: np.ndarray | None                   # uint8 (len(ids) - len(jpegs), H, W, 3), None when none
    skipped: list[dict] = field(default_factory=list)   # {"image", "reason"} of the unusable ones
    jpegs: list[bytes] = field(default_factory=list)    # nvjpeg: files left for the device to decode...
    jpeg_at: list[int] = field(default_factory=list)    # ...and their positions in ids (pixels: the rest)


@dataclass
class Batch:
    """One forward's worth of images: uint8 pixels (N, 3, H, W) (a channels-last view of the
    decoded (N, H, W, 3) array: no copy), their ids, and the ids skipped as unusable. With nvjpeg,
    the files at positions jpeg_at are still encoded (pixels holds the others): on_device decodes them."""
    ids: list[str]
    pixels: object                              # torch.Tensor uint8 (N, 3, H, W) or None
    skipped: list[dict]
    jpegs: list[bytes] = field(default_factory=list)
    jpeg_at: list[int] = field(default_factory=list)

    def on_device(self, device, pre: dict) -> "Batch":
        """This batch with every image as uint8 (N, 3, H, W) pixels on `device`: the CPU-decoded ones
        moved there, the JPEGs decoded and cut there. A JPEG the device decoder rejects is decoded on
        the CPU instead, and skipped (counted) if that fails too."""
        if not self.jpegs:
            return Batch(self.ids, None if self.pixels is None else self.pixels.to(device), self.skipped)
        return _device_batch(self, device, pre)


def _read_torchvision(root: str, image_id: str, endpoint_url: str | None):
    """torchvision's decode_jpeg (libjpeg-turbo: PIL's pixels exactly) for a whole RGB/grey JPEG within
    the limits, local or S3, read once; anything else decoded from the same bytes by storage.images."""
    import warnings

    import torch
    import torchvision.io as tio
    from PIL import Image

    from deepvis.storage.datasets import read_bytes
    from deepvis.storage.images import decode
    data = read_bytes(root, image_id, endpoint_url)
    if not _whole_jpeg(data):
        return decode(data)
    try:
        with warnings.catch_warnings():   # torchvision >= 0.29 says its decoders move to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            t = tio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tio.ImageReadMode.RGB)
    except RuntimeError:
        return decode(data)
    return Image.fromarray(t.permute(1, 2, 0).numpy(), "RGB")


def _whole_jpeg(data: bytes) -> bool:
    """torchvision and nvjpeg: whether decode_jpeg may take these bytes and agree with PIL: a whole JPEG
    (ending in its EOI marker: a truncated one goes to PIL, which refuses it) in RGB or grey, within
    storage.images' limits; the header is read, not the pixels. Any doubt: False, and PIL decides."""
    import io

    from PIL import Image

    from deepvis.storage.images import ImageLimits, check_size
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return False
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format != "JPEG" or probe.mode not in ("RGB", "L"):
                return False
            check_size(probe.width, probe.height, ImageLimits())
    except Exception:  # noqa: BLE001 - BadImage, PIL's errors: the CPU path gives the reason
        return False
    return True


def _read_decode(root: str, image_id: str, endpoint_url: str | None, kind: str):
    """(JPEG bytes for the device, None) or (None, the decoded image); BadImage when unusable. nvjpeg
    reads each file once (one GET from S3): bytes the device may not take are decoded from memory."""
    from deepvis.storage.datasets import read_bytes, read_image
    from deepvis.storage.images import decode

    if kind == "nvjpeg":
        data = read_bytes(root, image_id, endpoint_url)
        return (data, None) if _whole_jpeg(data) else (None, decode(data))
    if kind == "torchvision":
        return None, _read_torchvision(root, image_id, endpoint_url)
    return None, read_image(root, image_id, endpoint_url=endpoint_url)


def decode_chunk(root: str, ids: list[str], pre: dict, endpoint_url: str | None = None,
                 kind: str = "pil") -> Chunk:
    """In a decode process: read, decode and crop `ids` -> Chunk (nvjpeg: the JPEGs only read)."""
    from deepvis.storage.datasets import BadImage
    from deepvis.tasks.preprocess import crop_input, device_geometry

    keep, arrays, skipped, jpegs, jpeg_at = [], [], [], [], []
    if kind == "nvjpeg" and not device_geometry(pre):
        kind = "pil"                     # bicubic preprocessing: cut on the CPU (see tasks.preprocess)
    for image_id in ids:
        try:
            data, img = _read_decode(root, image_id, endpoint_url, kind)
        except BadImage as e:
            skipped.append({"image": image_id, "reason": str(e)})
            continue
        if data is not None:
            jpeg_at.append(len(keep))
            jpegs.append(data)
        else:
            arrays.append(np.asarray(crop_input(img, pre), dtype=np.uint8))
        keep.append(image_id)
    return Chunk(keep, np.stack(arrays) if arrays else None, skipped, jpegs, jpeg_at)


def _device_batch(batch: Batch, device, pre: dict) -> Batch:
    """Batch.on_device for a batch holding JPEG bytes (nvjpeg)."""
    import torch

    from deepvis.storage.images import BadImage, decode
    from deepvis.tasks.preprocess import crop_input, crop_tensor, decode_jpegs

    crop = int(pre["crop"])
    decoded = decode_jpegs(batch.jpegs, device)
    at = set(batch.jpeg_at)
    cpu_at = [i for i in range(len(batch.ids)) if i not in at]
    out = torch.empty((len(batch.ids), 3, crop, crop), dtype=torch.uint8, device=device)
    if cpu_at:
        out[cpu_at] = batch.pixels.to(device)
    keep = [True] * len(batch.ids)
    skipped = list(batch.skipped)
    for i, data, img in zip(batch.jpeg_at, batch.jpegs, decoded):
        if img is not None:
            out[i] = crop_tensor(img, pre)
            continue
        try:     # the device decoder refused it: the CPU decides (a bad file is skipped, as with pil)
            px = np.array(crop_input(decode(data), pre), dtype=np.uint8)    # writable: torch shares it
            out[i] = torch.from_numpy(px).permute(2, 0, 1).to(device)
        except BadImage as e:
            keep[i] = False
            skipped.append({"image": batch.ids[i], "reason": str(e)})
    if not all(keep):
        rows = [i for i, k in enumerate(keep) if k]
        out = out[rows] if rows else None
    ids = [x for x, k in zip(batch.ids, keep) if k]
    return Batch(ids, out, skipped)


def _ready(_=None) -> int:
    return os.getpid()


@contextmanager
def _bare_main():
    """A spawned process first imports its parent's __main__; in a Ray actor that is Ray's worker
    script (which imports ray: seconds and ~100 MB per decode process). They need nothing from it."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class Decoder:
    """A pool of `processes` decode processes for one dataset (root), model preprocessing and kind."""

    def __init__(self, root: str, pre: dict, processes: int, endpoint_url: str | None = None,
                 kind: str = "pil", ahead: int = 3):
        if kind not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {kind!r}")
        self.root, self.pre, self.endpoint_url, self.kind = root, pre, endpoint_url, kind
        self.processes, self.ahead = max(1, int(processes)), max(1, int(ahead))
        # spawn, not fork: the actor holds threads (Ray's, torch's) that a fork would copy mid-state
        self.pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
        with _bare_main():
            list(self.pool.map(_ready, range(self.processes)))   # all started now, not mid-shard

    def pids(self) -> list[int]:
        """The decode processes' ids (tests kill one)."""
        return sorted(self.pool._processes or {})

    def batches(self, ids: list[str], batch_size: int) -> "Stream":
        """The Batches of the consecutive slices of `ids` (batch_size each, the last shorter), decoded
        `ahead` batches in advance; the first `ahead` are submitted now, before iteration starts (an
        actor makes the stream of its next shard while the last one still computes)."""
        return Stream(self, [ids[s:s + batch_size] for s in range(0, len(ids), batch_size)])

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Stream:
    """Decoder.batches: an iterable of Batch whose decoding starts when it is made."""

    def __init__(self, decoder: Decoder, slices: list[list[str]]):
        self.decoder, self.slices, self.pending = decoder, slices, deque()
        for i in range(min(decoder.ahead, len(slices))):
            self._submit(i)

    def _submit(self, i: int) -> None:
        d, part = self.decoder, self.slices[i]
        self.pending.append([d.pool.submit(decode_chunk, d.root, part[s:s + CHUNK], d.pre, d.endpoint_url, d.kind)
                             for s in range(0, len(part), CHUNK)])

    def __iter__(self):
        import torch

        for i in range(len(self.slices)):
            chunks = [f.result() for f in self.pending.popleft()]
            if i + self.decoder.ahead < len(self.slices):
                self._submit(i + self.decoder.ahead)
            keep, jpeg_at = [], []
            for c in chunks:
                jpeg_at += [len(keep) + j for j in c.jpeg_at]
                keep += c.ids
            arrays = [c.pixels for c in chunks if c.pixels is not None]
            pixels = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2) if arrays else None
            yield Batch(keep, pixels, [s for c in chunks for s in c.skipped],
                        [d for c in chunks for d in c.jpegs], jpeg_at)
