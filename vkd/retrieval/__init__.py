"""Two-stage search over a vkd index: student ANN candidates, teacher rerank.

Importing this package loads neither torch nor transformers (a search with ONNX models
never does).
"""

import os

# torch and faiss-cpu each bring their own OpenMP runtime; with both loaded, threads of one
# spin-wait while the other works, and on a 2-core machine a tiny model's query encode went
# from ~1 ms to ~300 ms. Passive waiting avoids it; it only takes effect when set before
# torch is imported, which a search usually does after this import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vkd.retrieval.results import Hit, SearchResult, StageTimings  # noqa: E402
from vkd.retrieval.retriever import Retriever, check_student, check_teacher, open_encoder  # noqa: E402

__all__ = ["Hit", "Retriever", "SearchResult", "StageTimings", "check_student", "check_teacher", "open_encoder"]
