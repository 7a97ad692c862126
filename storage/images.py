"""The one image decoder of the project (PIL only, no torch): the build's dataset pass, `deepvis tune`,
`query --image`, `activations` and `live` all decode through `decode` / `open_image`, so an image
that one of them accepts the others accept too, and every one of them has the same bomb limits.

What it does, in order:
  1. read the header only (PIL's `Image.open` parses it, no pixels yet) and refuse, before any pixel
     is decoded, an image whose width, height, pixel count or aspect ratio exceeds `ImageLimits`:
     a 39 KB PNG can declare 400000 x 100 pixels; the model's preprocessing resizes the shorter side
     to 256, so its aspect ratio, not only its pixel count, decides the memory it takes (1.5 GB);
  2. decode fully into memory (the file can be closed at once);
  3. any mode -> RGB: grayscale, palette, CMYK, 16-bit, float and alpha images (alpha composited on
     white, as tasks.preprocess.to_rgb). Pixels are not re-oriented by EXIF tags (as torchvision's
     ImageFolder loader).
Every failure is a BadImage whose str() is a short one-line reason (ImageTooLarge for the limits, so
a server can answer 413 instead of 415)."""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485          # PIL's own decompression-bomb threshold


@dataclass(frozen=True)
class ImageLimits:
    """What an image may declare in its header. The defaults take any photo a dataset holds (JPEG's own
    side limit is 65,535); servers pass tighter ones."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = 65_535
    # the preprocessing scales the shorter side to ~256: an aspect ratio of A makes ~256*256*A pixels
    max_aspect: float = 100.0


class BadImage(Exception):
    """A file that cannot be used as an image; str(e) is the short reason."""


class ImageTooLarge(BadImage):
    """An image whose header declares more than ImageLimits allows (refused before decoding)."""


def check_size(width: int, height: int, limits: ImageLimits) -> None:
    """ImageTooLarge when width x height is beyond `limits`, BadImage when it is empty."""
    if width <= 0 or height <= 0:
        raise BadImage(f"empty image ({width}x{height})")
    if width > limits.max_side or height > limits.max_side:
        raise ImageTooLarge(f"too large: {width}x{height}; each side may be at most {limits.max_side:,} pixels")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"too large: {width}x{height} = {width * height} pixels > {limits.max_pixels} "
                            f"(decompression bomb?)")
    if max(width, height) > limits.max_aspect * min(width, height):
        raise ImageTooLarge(f"too elongated: {width}x{height}; the longer side may be at most "
                            f"{limits.max_aspect:g} times the shorter")


def decode(source, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes or a binary file object -> a fully loaded RGB image. BadImage(reason) when unusable."""
    fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fh)     # the caller's file object: nothing here to close
            check_size(img.width, img.height, limits)
            img.load()
            return to_rgb(img)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"too large (decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unknown format)") from None
    except OSError as e:
        raise BadImage(_os_reason(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise many types on garbage (incl. OverflowError)
        raise BadImage(f"corrupt: {type(e).__name__}: {e}") from None


def _os_reason(e: OSError) -> str:
    msg = str(e) or type(e).__name__
    if "truncated" in msg:
        return f"truncated: {msg}"
    if isinstance(e, PermissionError):
        return f"unreadable: {e.strerror or msg}"
    return f"corrupt: {msg}"


def _check_file(path: str | os.PathLike) -> None:
    """BadImage for a missing, unreadable or empty file or a directory, before anything is read."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if os.path.isdir(path):
        raise BadImage("a directory, not a file")
    if size == 0:
        raise BadImage("empty file")


def open_image(path: str | os.PathLike, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """A local image file -> RGB image. BadImage for a missing, empty, unreadable or bad file. Read as
    decoding goes: a bomb is refused from its header, before the rest of the file is read."""
    _check_file(path)
    try:
        with open(path, "rb") as fh:
            return decode(fh, limits)
    except PermissionError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None


def read_file(path: str | os.PathLike) -> bytes:
    """A local image file's bytes, undecoded (for decode_jpeg); BadImage as open_image's."""
    _check_file(path)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (alpha composited on white, as tasks.preprocess.to_rgb)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _deep_to_rgb(img)
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.split()[-1])
        return bg
    return img.convert("RGB")


def _deep_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images -> 8-bit gray -> RGB."""
    mode = img.mode
    arr = np.asarray(img, dtype=np.float64)
    if mode.startswith("I;16") or (mode == "I" and arr.size and 0 <= arr.min() and arr.max() <= 65535
                                   and arr.max() > 255):
        arr = arr / 257.0                            # 16-bit range -> 8-bit
    elif mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
        arr = arr * 255.0                            # float images in [0, 1]
    gray = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
