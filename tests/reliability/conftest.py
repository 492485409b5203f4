"""Shared pieces of the reliability suite (see docs/reliability.md).

Long variants (many kills, long fuzz runs) are marked ``long`` and run only with
``VKD_RELIABILITY_LONG=1``; the default run keeps every probe, with fewer repetitions.
"""

from __future__ import annotations

import os
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
