"""Image files the reliability tests write: plain noise, and a decompression bomb.

A module of its own rather than ``conftest.py``: ``tests/conftest.py`` is imported as
``conftest`` too, and a test that imports helpers ``from conftest`` gets whichever of the
two was imported first when both folders are collected in one run.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise(rng: np.random.Generator, width: int = 40, height: int = 32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A valid black 1-bit PNG of ``width`` x ``height`` (400 Mpx by default) in a few KB.

    Written chunk by chunk rather than with PIL's ``save``, which would first allocate the
    whole image (a byte per pixel) in the test process.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path
