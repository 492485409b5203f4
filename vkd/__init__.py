"""vkd: distill a large image-text embedding model into a small one and search with both.

The public API is imported lazily so that ``import vkd`` stays cheap (torch and
transformers load only when a model is touched).
"""

from __future__ import annotations

import os

# torch and faiss each bring an OpenMP runtime; with the default active wait policy their
# idle threads spin against each other and a tiny model's forward pass became ~300x slower.
# It only takes effect if set before either library loads, hence here, first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vkd._lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
