"""What a search returns: ``Hit`` per image, ``SearchResult`` (a list of hits) with the
stage timings of the search that produced it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

# The stages in the order a search runs them.
STAGES = ("student_encode_ms", "ann_ms", "teacher_encode_ms", "rerank_ms")


@dataclass(frozen=True)
class Hit:
    """One result image.

    ``score`` is what the ranking used: the teacher's cosine when reranked with teacher
    vectors, else the student's. ``teacher_score`` is None without teacher rerank.
    """

    rank: int
    id: str
    path: str
    score: float
    student_score: float
    teacher_score: float | None = None
    shard: str = ""
    row: int = -1
    width: int | None = None
    height: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageTimings:
    """Wall time per stage in milliseconds. In ``search_batch`` these are the batch's
    times (shared by its results); ``batch_size`` says how many queries they cover."""

    student_encode_ms: float = 0.0
    ann_ms: float = 0.0
    teacher_encode_ms: float = 0.0
    rerank_ms: float = 0.0
    total_ms: float = 0.0
    batch_size: int = 1

    def to_dict(self) -> dict[str, float]:
        return {key: round(value, 3) if isinstance(value, float) else value for key, value in asdict(self).items()}


class SearchResult(list[Hit]):
    """The hits of one query, best first, with ``timings``, ``reranked`` (whether stage 2
    ran and with which vectors: "teacher", "student" or None) and the ``query``."""

    def __init__(self, hits: list[Hit], *, query: Any, timings: StageTimings, reranked: str | None,
                 candidates: int = 0, mode: str = "two-stage") -> None:
        super().__init__(hits)
        #: the search mode that made it (vkd.retrieval.modes.MODES)
        self.mode = mode
        self.query = query
        self.timings = timings
        self.reranked = reranked
        self.candidates = candidates

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": describe_query(self.query),
            "reranked": self.reranked,
            "mode": self.mode,
            "candidates": self.candidates,
            "timings": self.timings.to_dict(),
            "hits": [hit.to_dict() for hit in self],
        }

    def __repr__(self) -> str:
        return f"SearchResult({len(self)} hits, reranked={self.reranked!r}, total_ms={self.timings.total_ms:.1f})"


def describe_query(query: Any) -> str:
    """A printable name for a query: the text, the image's path, or its size."""
    if isinstance(query, str):
        return query
    if hasattr(query, "terms") and hasattr(query, "describe"):  # a combined Query
        return str(query.describe())
    if isinstance(query, os.PathLike):
        return os.fspath(query)
    filename = getattr(query, "filename", "")
    return filename or f"<image {getattr(query, 'width', '?')}x{getattr(query, 'height', '?')}>"
