"""The two search stages as functions over arrays (no models, no files).

Stage 1 merges each shard's ANN top-k into one candidate list per query; stage 2 scores
the candidates exactly against vectors gathered per shard and keeps the top k. Every
ordering here is by (score descending, shard, row): ties are broken the same way by every
stage and by an exact search over the whole index, so results are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: fetch(shard_position, rows) -> float32 [len(rows), d] vectors of those rows
VectorFetch = Callable[[int, np.ndarray], np.ndarray]


@dataclass
class Candidates:
    """Per query, candidates best first: positions into the index's shard list, rows in
    that shard, and scores; padded with shard -1 / row -1 / score -inf."""

    shard: np.ndarray  # int64 [q, k]
    row: np.ndarray  # int64 [q, k]
    score: np.ndarray  # float32 [q, k]

    @property
    def valid(self) -> np.ndarray:
        return self.row >= 0

    def take(self, positions: np.ndarray, scores: np.ndarray) -> Candidates:
        """The candidates at ``positions`` [q, k] (-1 = padding) with new ``scores``."""
        safe = np.maximum(positions, 0)
        pad = positions < 0
        shard = np.where(pad, -1, np.take_along_axis(self.shard, safe, axis=1))
        row = np.where(pad, -1, np.take_along_axis(self.row, safe, axis=1))
        return Candidates(shard, row, np.where(pad, -np.inf, scores).astype(np.float32))


def top_k_order(scores: np.ndarray, shard: np.ndarray, row: np.ndarray, k: int) -> np.ndarray:
    """Positions [q, min(k, n)] of the best ``k`` per query by (score desc, shard, row);
    padding (row -1) sorts last."""
    scores = np.where(row < 0, -np.inf, scores)
    # lexsort's last key is the primary one; -inf padding becomes +inf and goes last.
    order = np.lexsort((row, shard, -scores.astype(np.float64)), axis=-1)
    return order[:, : min(k, scores.shape[1])]


def merge_candidates(per_shard: Sequence[tuple[np.ndarray, np.ndarray]], k: int, n_queries: int) -> Candidates:
    """Stage 1's merge: each shard's (scores [q, k_s], rows [q, k_s]) into the best ``k``
    over all shards. ``per_shard[i]`` belongs to shard position ``i``."""
    if not per_shard:
        empty = np.zeros((n_queries, 0))
        return Candidates(empty.astype(np.int64), empty.astype(np.int64), empty.astype(np.float32))
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in per_shard], axis=1)
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for _, r in per_shard], axis=1)
    shard = np.concatenate(
        [np.full(np.shape(r), position, dtype=np.int64) for position, (_, r) in enumerate(per_shard)], axis=1
    )
    order = top_k_order(scores, shard, rows, k)
    merged = Candidates(
        np.take_along_axis(shard, order, axis=1),
        np.take_along_axis(rows, order, axis=1),
        np.take_along_axis(scores, order, axis=1),
    )
    pad = ~merged.valid
    merged.shard[pad] = -1
    merged.score[pad] = -np.inf
    return merged


def exact_scores(candidates: Candidates, queries: np.ndarray, fetch: VectorFetch) -> np.ndarray:
    """float32 [q, k]: each candidate's vector (``fetch`` per shard, rows ascending so the
    memory map is read in file order) dotted with its query; -inf on padding."""
    out = np.full(candidates.row.shape, -np.inf, dtype=np.float32)
    for qi in range(candidates.row.shape[0]):
        valid = candidates.row[qi] >= 0
        for shard in np.unique(candidates.shard[qi][valid]):
            positions = np.flatnonzero(valid & (candidates.shard[qi] == shard))
            rows = candidates.row[qi, positions]
            ascending = np.argsort(rows, kind="stable")
            vectors = np.asarray(fetch(int(shard), rows[ascending]), dtype=np.float32)
            if vectors.shape[1] != queries.shape[1]:
                raise ValueError(f"stored vectors have dimension {vectors.shape[1]} but the query vectors "
                                 f"have {queries.shape[1]}")
            out[qi, positions[ascending]] = vectors @ queries[qi].astype(np.float32)
    return out


def rerank(candidates: Candidates, queries: np.ndarray, fetch: VectorFetch, k: int) -> tuple[Candidates, np.ndarray]:
    """Stage 2: exact scores for the candidates, top ``k`` by them.

    Returns (the reranked top-k with the exact scores, their positions [q, k] in
    ``candidates`` so the stage-1 scores can be carried along)."""
    scores = exact_scores(candidates, queries, fetch)
    order = top_k_order(scores, candidates.shard, candidates.row, k)
    picked = np.take_along_axis(scores, order, axis=1)
    positions = np.where(np.take_along_axis(candidates.row, order, axis=1) >= 0, order, -1)
    return candidates.take(positions, picked), positions
