"""``ServeConfig``: everything ``vkd serve`` is told, as one plain value.

It travels to uvicorn's worker processes as JSON in an environment variable
(``--workers N`` starts each worker from an import string, so no Python object can be
handed over), hence only plain types here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

#: the environment variable that carries the config to uvicorn's worker processes
CONFIG_ENV = "VKD_SERVE_CONFIG"
DEFAULT_MAX_UPLOAD_BYTES = 20_000_000  # 20 MB
# A 48 Mpx phone photo passes; each decoded upload costs 3 bytes a pixel while it is
# encoded, and several can be in flight, so the bound is lower than the indexer's 89.5 Mpx.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


@dataclass
class ServeConfig:
    """The server's settings; ``index`` is the index directory, the rest have defaults.

    ``student`` / ``teacher``: model directories or ONNX export directories, None for the
    ones the index records. ``prefer="onnx"`` takes a named model's ``<model>/onnx`` export
    when it has one; ``precision`` ("int8" or "fp32") picks the exports' files, default INT8
    where exported. ``images_root`` replaces the images folder the index records (an index
    built on one machine, served from a container that mounts the images elsewhere).
    ``thumb_cache``: where thumbnails are kept, default ``<index>/thumbs``.
    """

    index: str
    student: str | None = None
    teacher: str | None = None
    prefer: str = "onnx"
    precision: str | None = None
    images_root: str | None = None
    candidates: int = 1000
    max_k: int = 100
    max_candidates: int = 10_000
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    batch_window_ms: float = 2.0
    max_batch: int = 32
    max_queue: int = 256
    reload_interval_s: float = 2.0
    thumb_size: int = 256
    thumb_cache: str | None = None
    api_key: str | None = None
    root_path: str = ""

    def __post_init__(self) -> None:
        self.index = str(Path(self.index).expanduser())
        if self.prefer not in ("onnx", "torch"):
            raise ValueError(f"prefer={self.prefer!r}: choose onnx or torch")
        if self.precision not in (None, "int8", "fp32"):
            raise ValueError(f"precision={self.precision!r}: choose int8 or fp32")
        for name in ("candidates", "max_k", "max_candidates", "max_upload_bytes", "max_image_pixels",
                     "max_batch", "max_queue", "thumb_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.max_candidates < self.max_k:
            raise ValueError(f"max_candidates={self.max_candidates} is smaller than max_k={self.max_k}")
        if self.batch_window_ms < 0 or self.reload_interval_s < 0:
            raise ValueError("batch_window_ms and reload_interval_s cannot be negative")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty: give a long random string (e.g. `openssl rand -hex 32`)")
        self.root_path = self.root_path.rstrip("/")

    @property
    def thumb_dir(self) -> Path:
        return Path(self.thumb_cache) if self.thumb_cache else Path(self.index) / "thumbs"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        data: dict[str, Any] = json.loads(text)
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{CONFIG_ENV}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_env(cls) -> ServeConfig:
        text = os.environ.get(CONFIG_ENV)
        if not text:
            raise RuntimeError(f"{CONFIG_ENV} is not set: start the server with `vkd serve`, which sets it for "
                               "its worker processes")
        return cls.from_json(text)
