"""Search over a vkd index: two-stage (student ANN candidates, teacher rerank) and the
asymmetric modes (``vkd.retrieval.modes``).

Importing this package loads neither torch nor transformers (a search with ONNX models
never does), and names load on first use so that ``vkd --help`` does not load pyarrow.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vkd._lazy import lazy_exports

# torch and faiss-cpu each bring their own OpenMP runtime; with both loaded, threads of one
# spin-wait while the other works, and on a 2-core machine a tiny model's query encode went
# from ~1 ms to ~300 ms. Passive waiting avoids it; it only takes effect when set before
# torch is imported, which a search usually does after this import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_EXPORTS: dict[str, str] = {
    "Hit": "vkd.retrieval.results",
    "SearchResult": "vkd.retrieval.results",
    "StageTimings": "vkd.retrieval.results",
    "QueryError": "vkd.retrieval.query",
    "Query": "vkd.retrieval.query",
    "Term": "vkd.retrieval.query",
    "Filters": "vkd.retrieval.query",
    "parse_compact": "vkd.retrieval.query",
    "Retriever": "vkd.retrieval.retriever",
    "check_student": "vkd.retrieval.retriever",
    "check_teacher": "vkd.retrieval.retriever",
    "open_encoder": "vkd.retrieval.retriever",
    "MODES": "vkd.retrieval.modes",
    "ModeUnavailableError": "vkd.retrieval.modes",
    "ModelCosts": "vkd.retrieval.modes",
    "recommend_mode": "vkd.retrieval.modes",
}

__all__ = ["Filters", "Hit", "Query", "QueryError", "Term", "parse_compact", "Retriever", "SearchResult", "StageTimings", "check_student", "check_teacher", "open_encoder", "MODES", "ModeUnavailableError", "ModelCosts", "recommend_mode"]

if TYPE_CHECKING:  # pragma: no cover
    from vkd.retrieval.modes import MODES, ModelCosts, ModeUnavailableError, recommend_mode
    from vkd.retrieval.query import Filters, Query, QueryError, Term, parse_compact
    from vkd.retrieval.results import Hit, SearchResult, StageTimings
    from vkd.retrieval.retriever import Retriever, check_student, check_teacher, open_encoder

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
