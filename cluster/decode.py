"""The dataset pass's image decoding, in other processes (no GIL shared with the forward pass).

A `Decoder` keeps a pool of spawned processes for the lifetime of its actor. Each process reads and
decodes images (storage.datasets.read_image, or torchvision.io.decode_jpeg for JPEG files with
`kind="torchvision"`) and cuts the model's input crop (tasks.preprocess.crop_input: resize + centre
crop), and sends back uint8 pixels: 4x fewer bytes than floats, and no float work on the CPUs (the
actor normalizes on its device, tasks.activations.to_model_input). The pil processes never import
torch.

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

DECODERS = ("pil", "torchvision")
CHUNK = 8          # images per task sent to a decode process


@dataclass
class Chunk:
    """What a decode process returns for a few consecutive image ids."""
    ids: list[str]                              # the images decoded, in order
    pixels: np.ndarray | None                   # uint8 (len(ids), H, W, 3), None when none decoded
    skipped: list[dict] = field(default_factory=list)   # {"image", "reason"} of the unusable ones


@dataclass
class Batch:
    """One forward's worth of images: uint8 pixels (N, 3, H, W) (a channels-last view of the
    decoded (N, H, W, 3) array: no copy), their ids, and the ids skipped as unusable."""
    ids: list[str]
    pixels: object                              # torch.Tensor uint8 (N, 3, H, W) or None
    skipped: list[dict]


def _read_torchvision(root: str, image_id: str, endpoint_url: str | None):
    """decode_jpeg for a local JPEG (libjpeg-turbo, as PIL); anything else through read_image."""
    from PIL import Image

    from deepvis.storage.datasets import image_path, read_image
    if root.startswith("s3://"):
        return read_image(root, image_id, endpoint_url=endpoint_url)
    path = image_path(root, image_id)
    try:
        with Image.open(path) as probe:       # header only: the format and the size (bomb check)
            is_jpeg = probe.format == "JPEG" and probe.mode in ("RGB", "L")
    except Exception:  # noqa: BLE001 - read_image gives the reason
        is_jpeg = False
    if not is_jpeg:
        return read_image(root, image_id, endpoint_url=endpoint_url)
    import warnings

    import torchvision.io as tio
    try:
        with warnings.catch_warnings():   # torchvision >= 0.29 says its decoders move to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            t = tio.decode_jpeg(tio.read_file(path), mode=tio.ImageReadMode.RGB)
    except RuntimeError:
        return read_image(root, image_id, endpoint_url=endpoint_url)
    return Image.fromarray(t.permute(1, 2, 0).numpy(), "RGB")


def decode_chunk(root: str, ids: list[str], pre: dict, endpoint_url: str | None = None,
                 kind: str = "pil") -> Chunk:
    """In a decode process: read, decode and crop `ids` -> Chunk."""
    from deepvis.storage.datasets import BadImage, read_image
    from deepvis.tasks.preprocess import crop_input

    keep, arrays, skipped = [], [], []
    for image_id in ids:
        try:
            img = (_read_torchvision(root, image_id, endpoint_url) if kind == "torchvision"
                   else read_image(root, image_id, endpoint_url=endpoint_url))
            arrays.append(np.asarray(crop_input(img, pre), dtype=np.uint8))
            keep.append(image_id)
        except BadImage as e:
            skipped.append({"image": image_id, "reason": str(e)})
    return Chunk(keep, np.stack(arrays) if arrays else None, skipped)


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

    def batches(self, ids: list[str], batch_size: int):
        """Batches of the consecutive slices of `ids` (batch_size each, the last shorter), decoded
        `ahead` batches in advance. Yields Batch."""
        import torch

        slices = [ids[s:s + batch_size] for s in range(0, len(ids), batch_size)]
        pending: deque = deque()

        def submit(i):
            part = slices[i]
            pending.append([self.pool.submit(decode_chunk, self.root, part[s:s + CHUNK], self.pre,
                                             self.endpoint_url, self.kind) for s in range(0, len(part), CHUNK)])
        for i in range(min(self.ahead, len(slices))):
            submit(i)
        for i in range(len(slices)):
            chunks = [f.result() for f in pending.popleft()]
            if i + self.ahead < len(slices):
                submit(i + self.ahead)
            keep = [x for c in chunks for x in c.ids]
            arrays = [c.pixels for c in chunks if c.pixels is not None]
            pixels = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2) if arrays else None
            yield Batch(keep, pixels, [s for c in chunks for s in c.skipped])

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
