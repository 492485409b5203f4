"""Shared pieces of the reliability suite (see docs/reliability.md).

Long variants (many kills, long fuzz runs) are marked ``long`` and run only with
``VKD_RELIABILITY_LONG=1``; the default run keeps every probe, with fewer repetitions.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LONG = os.environ.get("VKD_RELIABILITY_LONG") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG:
        return
    skip = pytest.mark.skip(reason="long reliability variant: set VKD_RELIABILITY_LONG=1 to run it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def noise_image(rng: np.random.Generator, width: int = 40, height: int = 32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def plain_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` small random PNGs named img000.png, img001.png, ..."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise_image(rng).save(root / f"img{i:03d}.png")
    return root


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
