"""Datasets of images: listing them and decoding one (no torch here).

A source is
  - a directory: every file below it whose name ends in an image extension (ImageFolder layout or
    any tree; symlinked folders are followed once; hidden files and folders, '.'-prefixed, are not
    listed);
  - a text file listing image paths, one a line, relative to the list file's directory or
    absolute; blank lines and '#' comments are ignored; every entry is listed whatever its
    extension (a missing or unreadable one is skipped at decode time);
  - a single image file (a dataset of one).
(`s3://bucket/prefix` sources list the image keys under the prefix and read them through storage.s3.)

Image id = the path relative to the dataset root (`dataset_root(source)`: the directory itself, or
the list file's / image file's directory), '/'-separated, normalized. A relative list entry stays
relative (`../other/x.jpg` too); an absolute one outside the root keeps its absolute path as id
(`image_path(root, id)` finds both). Ids are returned
sorted ascending (Python str order, the order that breaks ties in the atlas) and unique.

Decoding never fails the build: `read_image` raises BadImage(reason) for files that are missing,
empty, not images, truncated/corrupt, or larger than `max_pixels` or storage.images.ImageLimits
(decompression bombs, absurd sides or aspect ratios), and the caller skips, counts and lists them.
The decoding itself is storage.images (RGB out, no EXIF re-orientation), shared with `query`,
`activations` and `live`.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from deepvis.storage.errors import StoreError
# BadImage and DEFAULT_MAX_PIXELS are re-exported: callers import them from here
from deepvis.storage.images import DEFAULT_MAX_PIXELS, BadImage, ImageLimits, decode, open_image, read_file  # noqa: F401

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _split_source(source: str) -> tuple[str, str]:
    """(kind, path): kind is 'dir', 'list' or 'image'. StoreError when unusable."""
    source = os.fspath(source)
    if "://" in source:
        scheme = source.split("://", 1)[0]
        if scheme == "s3":
            return "s3", source.rstrip("/")
        from deepvis.storage.s3 import redact_url  # the address may hold user:secret@
        raise StoreError(f"dataset {redact_url(source)!r}: unknown scheme {scheme[:20]!r}; pass a local "
                         f"directory, s3://bucket/prefix or a text file listing image paths")
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        return "dir", path
    if os.path.isfile(path):
        return ("image" if is_image_name(path) else "list"), path
    if os.path.exists(path):
        raise StoreError(f"dataset {source!r} is neither a directory nor a file")
    raise StoreError(f"dataset {source!r} does not exist; pass a directory of images or a text file "
                     f"listing image paths")


def dataset_root(source: str) -> str:
    """The directory image ids are relative to."""
    kind, path = _split_source(source)
    return path if kind in ("dir", "s3") else os.path.dirname(path)


_stores: dict = {}
LIST_PAGE = 1000   # keys one S3 LIST returns


def _s3(root: str, endpoint_url: str | None = None):
    """One S3Store per (prefix, endpoint) and process (a worker reads many images from it)."""
    key = (root, endpoint_url)
    if key not in _stores:
        from deepvis.storage.store import open_store
        _stores[key] = open_store(root, endpoint_url)
    return _stores[key]


def _to_id(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        rel = os.path.normpath(path)                 # outside the root: keep it absolute
    return rel.replace(os.sep, "/")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:                       # undecodable bytes in a file name
        return False


def _walk(root: str) -> list[str]:
    ids = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:                             # a symlink cycle or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith(".") or not is_image_name(f):
                continue
            p = os.path.join(dirpath, f)
            if _utf8(p):
                ids.append(_to_id(root, p))
    return ids


def _read_list(list_file: str) -> list[str]:
    root = os.path.dirname(list_file)
    try:
        with open(list_file, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError:
        raise StoreError(f"dataset list {list_file!r} is not a UTF-8 text file; pass a directory of "
                         f"images or a text file with one image path a line") from None
    except OSError as e:
        raise StoreError(f"cannot read dataset list {list_file!r}: {e.strerror or e}") from None
    ids = []
    # an absolute entry under the list's directory is that prefix and its id: sliced off, not
    # os.path.relpath (24 of the 32 s that ImageNet's 1.28M entries took)
    base = os.path.join(os.path.abspath(root), "")
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entry = os.path.expanduser(entry)
        if os.path.isabs(entry):
            entry = os.path.normpath(entry)
            ids.append(entry[len(base):].replace(os.sep, "/") if entry.startswith(base) else _to_id(root, entry))
        else:                                        # relative: kept relative, '..' and all
            ids.append(os.path.normpath(entry).replace(os.sep, "/"))
    return ids


def check_list_entries(source: str, ids: list[str], sample: int = 16) -> None:
    """StoreError when `source` is a list file none of whose first `sample` ids exists here: a
    wrong list or a wrong base directory, not a dataset of unreadable files, and said before a build
    starts rather than as '100 skipped' after it. A few missing files among present ones are left
    to decode time (skipped and counted). Only for a driver that sees the workers' files (a
    ray:// client's machine need not)."""
    kind, list_file = _split_source(source)
    root, head = os.path.dirname(list_file), ids[:sample]
    if kind == "list" and head and not any(os.path.exists(image_path(root, i)) for i in head):
        first = image_path(root, head[0])
        raise StoreError(f"none of the first {len(head)} entries of dataset list {list_file!r} exists "
                         f"(the first resolves to {first!r}); relative entries are relative to the "
                         f"list file's directory: write absolute paths or move the list")


def list_images(source: str, endpoint_url: str | None = None) -> list[str]:
    """The image ids of a dataset, sorted ascending and unique. StoreError when the source does not
    exist or lists no image. An s3://bucket/prefix source lists the image keys under the prefix."""
    kind, path = _split_source(source)
    if kind == "s3":
        ids = [k for k in _s3_keys(_s3(path, endpoint_url)) if is_image_name(k.rsplit("/", 1)[-1])
               and not any(part.startswith(".") for part in k.split("/"))]
        what = f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {source!r}"
    elif kind == "dir":
        ids = _walk(path)
        what = f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {source!r}"
    elif kind == "list":
        ids = _read_list(path)
        what = f"dataset list {source!r} names no image (one path a line; '#' starts a comment)"
    else:
        ids = [os.path.basename(path)]
        what = ""
    if not ids:
        raise StoreError(what)
    return sorted(set(ids))


def _s3_keys(store, depth: int = 2, want: int = 16) -> list[str]:
    """Every key of an S3 dataset, its folders listed side by side (Store.list_many): ImageNet's
    <wnid>/ folders are 1,000 listings of ~1,300 keys, 2 pages each, 16 at a time, instead of 1,281
    pages one after another. A root of few folders ('train/', 'val/') is opened one level more, up
    to `depth` levels, until there are `want` folders. When the first `want` folders hold fewer
    than a page's share each, one plain listing takes fewer requests: that is used instead."""
    keys, folders = store.list_level("")
    for _ in range(depth - 1):
        if not folders or len(folders) >= want:
            break
        with ThreadPoolExecutor(len(folders)) as pool:          # fewer than `want`: side by side too
            opened = list(pool.map(store.list_level, folders))
        keys += [k for ks, _ in opened for k in ks]
        folders = [f for _, fs in opened for f in fs]
    if not folders:
        return sorted(keys)
    head, rest = folders[:want], folders[want:]
    first = store.list_many(head)
    if rest and len(first) < LIST_PAGE / want * len(head):
        return store.list("")
    return sorted(keys + first + store.list_many(rest))


def image_path(root: str, image_id: str) -> str:
    return os.path.join(root, *image_id.split("/")) if not image_id.startswith("/") else image_id


def read_image(root: str, image_id: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               endpoint_url: str | None = None) -> Image.Image:
    """Decode one image fully into memory as RGB (storage.images, the project's one decoder).
    BadImage(reason) when it cannot be used; an unreachable S3 store raises StoreError (every image
    would fail: it is not the image's fault)."""
    limits = ImageLimits(max_pixels=max_pixels)
    if root.startswith("s3://"):
        return decode(read_bytes(root, image_id, endpoint_url), limits)
    return open_image(image_path(root, image_id), limits)


def read_bytes(root: str, image_id: str, endpoint_url: str | None = None) -> bytes:
    """One image file's bytes, undecoded (for a decoder elsewhere: the device's). BadImage when it is
    missing, empty or unreadable; an unreachable S3 store raises StoreError, as in read_image."""
    if root.startswith("s3://"):
        try:
            data = _s3(root, endpoint_url).get(image_id)
        except KeyError:
            raise BadImage("file not found") from None
    else:
        data = read_file(image_path(root, image_id))
    if not data:
        raise BadImage("empty file")
    return data

