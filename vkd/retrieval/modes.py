"""The three search modes, what each needs from an index, and which one to use.

* ``two-stage`` (the default): the student's query vector finds ``candidates`` in the student
  FAISS index; the teacher's query vector re-scores them against the stored teacher vectors.
  The teacher runs on every image at index time and on every query.
* ``student-query``: the index holds teacher image vectors; the student's text (or image) tower
  encodes the query and its projection maps it into the teacher's space; the candidates come
  from each shard's teacher ANN index (``shard-N.teacher.faiss``: FAISS, chosen by
  ``choose_index`` like the student's, over the teacher vectors' Matryoshka prefix where the
  teacher has one, each prefix normalised again, else the full vectors) and are re-scored
  exactly on the full stored vectors. No teacher at query time. An index without the teacher
  ANN is refused with the command that adds it; ``scan=True`` (``vkd search --scan``) ranks
  every stored teacher vector instead (``scan_candidates``: exact, linear in the corpus).
* ``student-index``: the index holds the student's image vectors projected into the teacher's
  space (``vkd index --projected``); the teacher's text tower encodes the query. The candidates
  come from the student FAISS index searched with ``normalise(Wᵀ·q)`` (since
  ``q·(W·s) = (Wᵀ·q)·s``: the projected score up to each row's ``‖W·s‖``) and are re-scored
  exactly on the stored projected vectors. No teacher at index time.

With ``candidates`` at least the index's size every mode is exact: its ranking is the brute-force
ranking of its definition.

``recommend_mode`` is a pure function (no models, no files), like ``choose_index``: from the
corpus size, the expected queries per second, the measured costs of both models and each mode's
validation quality, the mode to use and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vkd.indexer import IndexMismatchError
from vkd.indexer.faiss_index import MATRYOSHKA_FAMILIES, MATRYOSHKA_PREFIX, teacher_ann_dim  # noqa: F401 - re-exported
from vkd.retrieval.stages import Candidates, merge_candidates

if TYPE_CHECKING:
    from vkd.indexer import Index

MODES = ("two-stage", "student-query", "student-index")
DEFAULT_MODE = "two-stage"
SCAN_ROWS = 65_536  # rows per block of the exact scan: bounded memory, whatever the shard size


class ModeUnavailableError(IndexMismatchError):
    """The index lacks the vectors a search mode needs; the message says what to run."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def teacher_ann(index: Index) -> dict[str, Any] | None:
    """The index's teacher ANN record (``vectors.teacher_vec.ann``: {"dim": prefix width}), or None."""
    return (index.vectors.get("teacher_vec") or {}).get("ann")


def require_vectors(index: Index, mode: str, *, scan: bool = False) -> None:
    """Refuse ``mode`` on an index without the vectors (or, for student-query, the teacher ANN
    index) it searches, saying what to run. ``scan``: student-query may rank every stored teacher
    vector instead (exact, linear in the corpus), so an index without a teacher ANN serves it."""
    check_mode(mode)
    vectors = index.vectors
    images = index.manifest.get("images_root", "IMAGES")
    student = index.student.get("name", "STUDENT")
    if mode == "student-query" and ("teacher_vec" not in vectors
                                    or not all(shard.teacher_dim for shard in index.shards)):
        raise ModeUnavailableError(
            f"{index.path}: search mode student-query ranks the stored teacher image vectors, and this index "
            f"has none; re-index with a teacher: `vkd index {images} --model STUDENT --teacher TEACHER "
            f"--out {index.path} --rebuild` (the student must be distilled with train_modes: [student-query])")
    if mode == "student-query" and not scan and (teacher_ann(index) is None
                                                 or not all(shard.teacher_ann for shard in index.shards)):
        teacher = (index.teacher or {}).get("name", "TEACHER")
        raise ModeUnavailableError(
            f"{index.path}: search mode student-query finds its candidates in a FAISS index over the stored "
            f"teacher vectors, and this index (written before it existed, or with --no-teacher-ann) has none; add "
            f"it from the stored vectors (no image is encoded again): `vkd index {images} --model {student} "
            f"--teacher {teacher} --out {index.path} --teacher-ann`, or rank every stored teacher vector instead "
            "(exact, slower on a large index): `vkd search --mode student-query --scan`")
    if mode == "student-index" and ("projected_vec" not in vectors
                                    or not all(shard.projected_dim for shard in index.shards)):
        raise ModeUnavailableError(
            f"{index.path}: search mode student-index ranks the student's image vectors projected into the "
            f"teacher's space, and this index has none. With a student distilled with train_modes: "
            f"[student-index], add them from the stored student vectors (no image is encoded again): "
            f"`vkd index {images} --model {student} --projected --out {index.path}`; with another student, "
            f"re-index: `vkd index {images} --model STUDENT --projected --out {index.path} --rebuild`")
    if mode == "two-stage" and "student_vec" not in vectors:  # pragma: no cover - every index has them
        raise ModeUnavailableError(f"{index.path}: no student vectors")


def scan_prefix(teacher_family: str | None, dim: int, prefix: int | None = None) -> int:
    """How many leading dimensions student-query's scan reads: ``prefix`` when given, a
    Matryoshka prefix for a teacher trained with one, else the whole vector (the same rule as
    the teacher ANN index's, ``faiss_index.teacher_ann_dim``)."""
    try:
        return teacher_ann_dim(teacher_family, dim, prefix)
    except ValueError:
        raise ValueError(f"prefix_dim={prefix}: must lie in [1, {dim}]") from None


def scan_candidates(index: Index, column: str, queries: np.ndarray, k: int, *, prefix: int | None = None,
                    allowed: Sequence[Mapping[int, np.ndarray] | None] | None = None) -> Candidates:
    """Top-``k`` per query over every shard's vector ``column`` by exact inner product, in
    blocks of ``SCAN_ROWS`` rows of the memory map; with ``prefix``, on the first ``prefix``
    dimensions of both sides, each normalised again. ``allowed[q]`` maps a shard position to the
    rows query ``q`` may see (None: every live row)."""
    queries = np.asarray(queries, dtype=np.float32)
    n_queries, dim = queries.shape
    width = dim if prefix is None else int(prefix)
    heads = queries[:, :width]
    if width < dim:
        heads = heads / np.maximum(np.linalg.norm(heads, axis=1, keepdims=True), 1e-12)
    per_shard = []
    for position, shard in enumerate(index.shards):
        view = shard.vector_block(column)
        live = shard.live_mask()
        top = min(k, shard.live_rows)
        scores = np.full((n_queries, max(top, 0)), -np.inf, np.float32)
        rows = np.full((n_queries, max(top, 0)), -1, np.int64)
        if top > 0:
            best_s = [np.zeros(0, np.float32) for _ in range(n_queries)]
            best_r = [np.zeros(0, np.int64) for _ in range(n_queries)]
            for start in range(0, shard.rows, SCAN_ROWS):
                block = np.asarray(view[start:start + SCAN_ROWS, :width], dtype=np.float32)
                if width < dim:
                    block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
                block_scores = heads @ block.T  # [q, rows]
                block_rows = np.arange(start, start + block.shape[0], dtype=np.int64)
                block_scores[:, ~live[start:start + block.shape[0]]] = -np.inf
                for qi in range(n_queries):
                    row_scores = block_scores[qi]
                    if allowed is not None and allowed[qi] is not None:
                        keep = np.zeros(block.shape[0], dtype=bool)
                        mine = allowed[qi].get(position, np.zeros(0, np.int64))
                        mine = mine[(mine >= start) & (mine < start + block.shape[0])]
                        keep[mine - start] = True
                        row_scores = np.where(keep, row_scores, -np.inf)
                    block_r = block_rows
                    if row_scores.size > top:  # only a block's top can enter the running top
                        keep_top = np.argpartition(-row_scores, top - 1)[:top]
                        row_scores, block_r = row_scores[keep_top], block_rows[keep_top]
                    merged_s = np.concatenate([best_s[qi], row_scores])
                    merged_r = np.concatenate([best_r[qi], block_r])
                    # ties by row, as every other stage orders them
                    order = np.lexsort((merged_r, -merged_s.astype(np.float64)))[:top]
                    best_s[qi], best_r[qi] = merged_s[order], merged_r[order]
            for qi in range(n_queries):
                found = np.isfinite(best_s[qi])
                count = int(found.sum())
                scores[qi, :count] = best_s[qi][found]
                rows[qi, :count] = best_r[qi][found]
        per_shard.append((scores, rows))
    return merge_candidates(per_shard, k, n_queries)


# -- which mode: a pure function ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCosts:
    """Measured seconds of compute, per item, of the two models (one core, or whatever unit
    ``cores`` in ``recommend_mode`` counts): image towers at index time, text towers per query.
    ``ann_s``: a FAISS search of the student index per query (two-stage, student-index);
    ``teacher_ann_s``: a FAISS search of the teacher ANN index per query (student-query);
    ``scan_s_per_row``: student-query's exact scan of the teacher vectors, per row per query,
    the cost it has on an index without a teacher ANN (``teacher_ann_s`` 0)."""

    student_image_s: float
    teacher_image_s: float
    student_query_s: float
    teacher_query_s: float
    scan_s_per_row: float = 0.0
    ann_s: float = 0.0
    teacher_ann_s: float = 0.0


@dataclass(frozen=True)
class ModeEstimate:
    mode: str
    index_s: float  # compute to index the corpus
    query_s: float  # compute per query
    quality: float | None  # validation quality (e.g. overlap@10 with the teacher-only ranking)
    quality_ok: bool
    keeps_up: bool  # qps × query_s within the cores
    total_s: float  # index_s + queries over the horizon × query_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recommendation:
    mode: str
    reason: str
    estimates: list[ModeEstimate] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "estimates": [e.to_dict() for e in self.estimates]}


def mode_costs(mode: str, corpus_size: int, costs: ModelCosts) -> tuple[float, float]:
    """(index compute, per-query compute) of ``mode`` as vkd runs it: every index holds the
    student's vectors (its FAISS index serves two-stage and student-index), student-query's adds
    the teacher's, student-index's adds no model run (the projection is a matrix product)."""
    n = int(corpus_size)
    if mode == "two-stage":
        return n * (costs.student_image_s + costs.teacher_image_s), (costs.student_query_s + costs.teacher_query_s
                                                                     + costs.ann_s)
    if mode == "student-query":
        stage1 = costs.teacher_ann_s if costs.teacher_ann_s > 0 else n * costs.scan_s_per_row
        return n * (costs.student_image_s + costs.teacher_image_s), costs.student_query_s + stage1
    if mode == "student-index":
        return n * costs.student_image_s, costs.teacher_query_s + costs.ann_s
    raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")


def recommend_mode(corpus_size: int, queries_per_s: float, costs: ModelCosts, quality: Mapping[str, float | None],
                   *, min_quality: float = 0.9, cores: float = 1.0, horizon_days: float = 30.0) -> Recommendation:
    """The search mode for a corpus: the cheapest in compute over ``horizon_days`` (indexing once,
    then ``queries_per_s`` around the clock) among the modes whose validation ``quality`` reaches
    ``min_quality`` × the best mode's and whose per-query compute keeps up with ``queries_per_s`` on
    ``cores``. ``quality`` maps mode → a higher-is-better figure (overlap@10 with the teacher-only
    ranking, or R@1); a mode missing from it (or None) is not considered, except two-stage, the
    reference, which is always eligible. When no eligible mode keeps up, the one with the cheapest
    queries is named, and the reason says so."""
    if corpus_size < 0 or queries_per_s < 0 or cores <= 0 or horizon_days < 0:
        raise ValueError("corpus_size and queries_per_s must be >= 0, cores and horizon_days positive")
    known = {m: q for m, q in quality.items() if q is not None and m in MODES}
    best = max(known.values(), default=None)
    queries = queries_per_s * horizon_days * 86_400
    estimates = []
    for mode in MODES:
        index_s, query_s = mode_costs(mode, corpus_size, costs)
        q = known.get(mode)
        ok = mode == "two-stage" or (q is not None and best is not None and q >= min_quality * best)
        estimates.append(ModeEstimate(mode, index_s, query_s, q, ok, queries_per_s * query_s <= cores,
                                      index_s + queries * query_s))
    eligible = [e for e in estimates if e.quality_ok]
    fast = [e for e in eligible if e.keeps_up]
    if fast:
        chosen = min(fast, key=lambda e: (e.total_s, MODES.index(e.mode)))
        why = (f"cheapest over {horizon_days:g} days at {queries_per_s:g} queries/s on {corpus_size:,} images "
               f"({_human(chosen.total_s)} of compute: {_human(chosen.index_s)} to index, "
               f"{chosen.query_s * 1000:.1f} ms a query)")
    else:
        chosen = min(eligible, key=lambda e: (e.query_s, MODES.index(e.mode)))
        why = (f"no mode keeps up with {queries_per_s:g} queries/s on {cores:g} core(s); this one has the "
               f"cheapest queries ({chosen.query_s * 1000:.1f} ms each): add cores or replicas")
    dropped = [e.mode for e in estimates if not e.quality_ok and e.quality is not None]
    unmeasured = [e.mode for e in estimates if not e.quality_ok and e.quality is None]
    if dropped:
        why += f"; left out for quality under {min_quality:.0%} of the best: {', '.join(dropped)}"
    if unmeasured:
        why += f"; not considered (no validation quality given): {', '.join(unmeasured)}"
    return Recommendation(chosen.mode, why, estimates)


def _human(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "∞"
    for unit, size in (("years", 365 * 86_400), ("days", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2f} s"


# -- quality of each mode against the teacher alone ------------------------------------------------


def ranking_agreement(scores: np.ndarray, reference: np.ndarray, relevant: np.ndarray, k: int = 10) -> dict[str, float]:
    """overlap@k of each query's top-k under ``scores`` with its top-k under ``reference`` (the
    teacher-only ranking), and R@1 of ``scores`` (``relevant[q]`` = the right column)."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ref = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top.tolist(), ref.tolist(), strict=True)]))
    r1 = float(np.mean(top[:, 0] == np.asarray(relevant)))
    return {f"overlap@{k}": overlap, "R@1": r1}
