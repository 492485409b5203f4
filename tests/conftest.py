"""Shared fixtures: tiny random models of each family, built once per test session.

Nothing is downloaded: HF_HUB_OFFLINE is forced before transformers is imported.
"""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# the tests' own home: the file-hash cache and demo outputs never touch the user's ~/.cache/vkd
os.environ.setdefault("VKD_HOME", tempfile.mkdtemp(prefix="vkd-test-home-"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see vkd/__init__.py: torch + faiss OpenMP
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vkd.models.tiny import build_tiny

    return build_tiny("clip", tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_clip_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, wider CLIP (different dimension from ``tiny_clip``)."""
    from vkd.models.tiny import build_tiny

    return build_tiny("clip", tmp_path_factory.mktemp("tiny-clip-teacher"), seed=1,
                      overrides={"hidden": 48, "proj": 48})


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vkd.models.tiny import build_tiny

    return build_tiny("siglip", tmp_path_factory.mktemp("tiny-siglip"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vkd.models.tiny import build_tiny

    return build_tiny("qwen3-vl", tmp_path_factory.mktemp("tiny-qwen3vl"), seed=0)


def make_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 32)) -> list[Image.Image]:
    """Random but reproducible RGB images."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def images() -> list[Image.Image]:
    return make_images(4)
