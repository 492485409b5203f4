"""vkd: distill a large image-text embedding model into a small one and search with both.

The public API is imported lazily so that ``import vkd`` stays cheap (torch and
transformers load only when a model is touched).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "load_encoder": "vkd.models",
    "Encoder": "vkd.models",
    "DistillConfig": "vkd.config",
    "load_config": "vkd.config",
    "read_pairs": "vkd.data.pairs",
    "recall_at_k": "vkd.evaluate",
    "evaluate_encoder": "vkd.evaluate",
    "distill": "vkd.distill",
    "Index": "vkd.indexer",
    "Retriever": "vkd.retrieval",
    "Hit": "vkd.retrieval",
    "export_onnx": "vkd.export",
}

__all__ = sorted(_EXPORTS)

def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vkd' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
