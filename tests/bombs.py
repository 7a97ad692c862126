"""Hostile images for the decoder and server tests, made without ever holding their pixels: PNGs whose
header declares any width x height, with a real (zlib) pixel stream or garbage after it."""
from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, pixels: bool = True) -> bytes:
    """An 8-bit grayscale PNG of width x height black pixels (compressed row by row, so a 40 Mpx image
    takes ~40 KB and little memory to make). pixels=False: the header only, then a garbage IDAT, so a
    decoder that reads the pixels fails ('corrupt'), and one that refuses from the header does not get
    that far."""
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    if not pixels:
        return head + _chunk(b"IDAT", b"not a zlib stream") + _chunk(b"IEND", b"")
    z = zlib.compressobj(9)
    row = bytes(1 + width)                         # filter byte 0 + the row's zeros
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return head + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
