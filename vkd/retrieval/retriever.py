"""``Retriever``: two-stage search over a vkd index.

1. the student encodes the query (ONNX when the student has an export, see ``prefer``);
2. every shard returns its ANN top-``candidates``; they are merged by score;
3. the teacher encodes the query and the candidates are scored exactly against their
   stored teacher vectors (gathered per shard from the memory map, only those rows);
   the top ``k`` by that score are the result. An index without teacher vectors is
   re-scored with the exact student vectors instead; ``rerank=False`` stops after 2.

Models default to the ones the index manifest records, opened with the options it records
for them (``load_encoder`` keywords such as Qwen3-VL's ``query_instruction``: a text query is
a query, encoded with the instruction the index was built for; an image query is encoded as
the indexed images were, with the document instruction, so an image finds itself first).
A model named instead gets the same recorded options. A model whose fingerprint
differs from the one the vectors were made with is refused (a teacher of the right
dimension but another fingerprint only warns: its scores are comparable, just not the
ones the index was built for).

``mode`` (per retriever, or per search) picks one of ``vkd.retrieval.modes.MODES``: two-stage as
above, or an asymmetric mode that needs the teacher at only one end (student-query: the
projected student encodes queries against the stored teacher vectors; student-index: the
teacher encodes queries against the stored projected student vectors). A mode whose vectors the
index lacks is refused (``ModeUnavailableError``, saying what to run).

The retriever is safe to share between threads: a search reads one immutable snapshot
(index + models), ``reload()`` swaps in a newer one, and encoders that are not
thread-safe (transformers tokenizers change their state on every call) run under a lock.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vkd.indexer import Index, IndexMismatchError
from vkd.retrieval import stages
from vkd.retrieval.modes import DEFAULT_MODE, ModeUnavailableError, check_mode, require_vectors
from vkd.retrieval.query import (  # noqa: F401 - check_text_query, MAX_QUERY_CHARS: re-exported, their old home
    MAX_QUERY_CHARS,
    Filters,
    Query,
    QueryError,
    as_query,
    check_text_query,
    encode_terms,
    search_allowed,
)
from vkd.retrieval.results import Hit, SearchResult, StageTimings
from vkd.retrieval.stages import Candidates, merge_candidates

if TYPE_CHECKING:
    from vkd.models.base import Encoder

DEFAULT_CANDIDATES = 1000
PREFER = ("onnx", "torch")
def open_encoder(name: str, *, prefer: str = "onnx", device: Any = None, batch_size: int = 32,
                 options: dict[str, Any] | None = None) -> Encoder:
    """An encoder by name: an ONNX export directory itself, or a model (directory or hub
    id) through ``load_encoder`` with ``options`` — which takes ``<dir>/onnx`` when
    ``prefer="onnx"`` and the export was made with those options. An export directory named
    directly has fixed options: the fingerprint check says when they are not the index's."""
    from vkd.export.onnx_encoder import EXPORT_MANIFEST

    if (Path(name) / EXPORT_MANIFEST).is_file():
        from vkd.export.onnx_encoder import OnnxEncoder

        return OnnxEncoder(name, batch_size=batch_size)
    from vkd.models import load_encoder

    given = {key: value for key, value in (options or {}).items() if value is not None}
    return load_encoder(name, prefer=prefer, device=device, batch_size=batch_size, **given)


def is_image_query(query: Any) -> bool:
    """Text is a ``str``; an image is a PIL image or a path object (``pathlib.Path``)."""
    if isinstance(query, str):
        return False
    if isinstance(query, os.PathLike):
        return True
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency
        return False
    return isinstance(query, Image.Image)


@dataclass(frozen=True)
class _Snapshot:
    """What one search reads: never mutated, replaced whole by ``reload``."""

    index: Index
    student: Encoder
    teacher: Encoder | None  # None: no teacher vectors, or the teacher is not loaded yet


class Retriever:
    """Search an index: ``Retriever(index_dir).search("a dog on a beach", k=10)``.

    ``student`` / ``teacher``: a model name, an ``Encoder``, or None for the ones the
    index manifest records. ``prefer`` picks the ONNX export of a named model when it has
    one (``<model>/onnx``), else torch. ``candidates`` is stage 1's top-k; ``rerank``
    the default for ``search``; ``device`` is passed to torch models.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike[str] | None = None,
        *,
        student: str | Encoder | None = None,
        teacher: str | Encoder | None = None,
        candidates: int = DEFAULT_CANDIDATES,
        prefer: str = "onnx",
        rerank: bool = True,
        device: Any = None,
        mode: str = DEFAULT_MODE,
        prefix_dim: int | None = None,
        scan: bool = False,
    ) -> None:
        from vkd.paths import default_index_dir

        if prefer not in PREFER:
            raise ValueError(f"prefer={prefer!r}: choose one of {', '.join(PREFER)}")
        if int(candidates) < 1:
            raise ValueError(f"candidates={candidates}: must be at least 1")
        self.path = Path(index_dir) if index_dir is not None else default_index_dir()
        self.candidates = int(candidates)
        self.prefer = prefer
        self.rerank = bool(rerank)
        self.device = device
        self._student_arg = student
        self._teacher_arg = teacher
        self.mode = check_mode(mode)
        # student-query: rank every stored teacher vector (exact, linear in the corpus) instead of the
        # teacher ANN index; what serves an index without one. prefix_dim: the scan's prefix (None:
        # a Matryoshka prefix or the full vector); the ANN's is the index's own
        self.scan = bool(scan)
        self.prefix_dim = prefix_dim
        self._lock = threading.RLock()
        self._encoder_locks: dict[int, threading.Lock] = {}
        # the asymmetric modes' query encoders and projection, keyed by what they depend on
        self._mode_cache: dict[tuple[str, str], Any] = {}
        index = Index.open(self.path)
        require_vectors(index, self.mode, scan=self.scan)  # refused now, not at the first search
        self._state = self._snapshot(index, previous=None, load_teacher=self.rerank and self.mode == DEFAULT_MODE)

    # -- models and snapshots -------------------------------------------------------

    @property
    def index(self) -> Index:
        return self._state.index

    @property
    def student(self) -> Encoder:
        return self._state.student

    @property
    def teacher(self) -> Encoder | None:
        """The teacher used for rerank (loaded on first use when ``rerank=False``)."""
        return self._state.teacher

    def _load(self, name: str, role: str, *, recorded: bool, options: dict[str, Any] | None = None) -> Encoder:
        try:
            return open_encoder(name, prefer=self.prefer, device=self.device, options=options)
        except (OSError, ValueError, TypeError) as error:  # TypeError: options another family does not take
            if not recorded:
                raise ValueError(
                    f"{role} {name!r}: cannot load it ({error}); give a model directory, an ONNX export "
                    "directory (with export.json) or a hub id"
                ) from error
            raise IndexMismatchError(
                f"{self.path}: cannot load the {role} {name!r} recorded in the index ({error}); pass "
                f"{role}=... (CLI: --{role} MODEL) naming where that model is now"
            ) from error

    def _snapshot(self, index: Index, previous: _Snapshot | None, load_teacher: bool) -> _Snapshot:
        recorded = index.student
        if self._student_arg is None:
            reuse = previous is not None and previous.student.fingerprint == recorded["fingerprint"]
            student = previous.student if reuse else self._load(str(recorded["name"]), "student", recorded=True,
                                                                 options=recorded.get("options"))
        elif isinstance(self._student_arg, str | os.PathLike):
            student = (previous.student if previous is not None
                       else self._load(str(self._student_arg), "student", recorded=False,
                                       options=recorded.get("options")))
        else:
            student = self._student_arg
        check_student(index, student)

        teacher: Encoder | None = None
        if _has_teacher_vectors(index):
            if self._teacher_arg is not None and not isinstance(self._teacher_arg, str | os.PathLike):
                teacher = self._teacher_arg
            elif previous is not None and previous.teacher is not None and (
                self._teacher_arg is not None or previous.teacher.fingerprint == index.teacher["fingerprint"]
            ):
                teacher = previous.teacher
            elif load_teacher:
                options = index.teacher.get("options")
                if self._teacher_arg is not None:
                    teacher = self._load(str(self._teacher_arg), "teacher", recorded=False, options=options)
                else:
                    teacher = self._load(str(index.teacher["name"]), "teacher", recorded=True, options=options)
            if teacher is not None:
                check_teacher(index, teacher)
        elif self._teacher_arg is not None:
            raise IndexMismatchError(
                f"{index.path}: this index stores no teacher vectors, so a teacher cannot rerank it; search "
                "without --teacher (the student's exact scores rerank), or re-index with --teacher MODEL --rebuild"
            )
        return _Snapshot(index, student, teacher)

    def _ensure_teacher(self, state: _Snapshot) -> _Snapshot:
        if state.teacher is not None or not _has_teacher_vectors(state.index):
            return state
        with self._lock:
            if self._state.index is state.index and self._state.teacher is None:
                self._state = self._snapshot(state.index, previous=state, load_teacher=True)
            return self._state

    def reload(self) -> bool:
        """Open the index's latest committed manifest; True when it changed.

        Models taken from the manifest follow it (a newly recorded student or teacher is
        loaded); a model you named or passed must still match the new vectors, else
        ``IndexMismatchError`` is raised and the old snapshot stays in use.
        """
        with self._lock:
            current = self._state
            index = Index.open(self.path)
            if index.manifest == current.index.manifest:
                return False
            self._state = self._snapshot(index, previous=current, load_teacher=current.teacher is not None)
            return True

    # -- search ---------------------------------------------------------------------

    def search(self, query: Any, k: int = 10, *, rerank: bool | None = None, candidates: int | None = None,
               filters: Filters | None = None, min_score: float | None = None,
               mode: str | None = None) -> SearchResult:
        """The top ``k`` images for a query: a text (``str``, taken literally), an image (PIL
        image or ``Path``), a list of ``(query, weight)`` pairs (negative weight: "not
        this"), or a ``Query``. ``filters`` restrict the rows before ranking; ``min_score``
        drops hits whose final score (teacher's, or student's without rerank) is lower. ``mode``
        overrides the retriever's (see the module docstring)."""
        return self.search_batch([query], k, rerank=rerank, candidates=candidates, filters=filters,
                                 min_score=min_score, mode=mode)[0]

    def search_batch(self, queries: Sequence[Any], k: int = 10, *, rerank: bool | None = None,
                     candidates: int | None = None, filters: Filters | None = None,
                     min_score: float | None = None, mode: str | None = None) -> list[SearchResult]:
        """``search`` for many queries at once: one encoder batch per model and term kind,
        one ANN call per shard for the unfiltered ones. Each result's ``timings`` are the
        whole batch's. ``filters`` apply to every query without filters of its own."""
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError("search_batch takes a list of queries; use search() for one")
        k = int(k)
        if k < 1:
            raise ValueError(f"k={k}: must be at least 1")
        n_candidates = self.candidates if candidates is None else int(candidates)
        if n_candidates < k:
            raise ValueError(f"candidates={n_candidates} is smaller than k={k}; stage 1 must find at least k")
        do_rerank = self.rerank if rerank is None else bool(rerank)
        if not queries:
            return []
        models = [as_query(query, filters) for query in queries]
        for model in models:
            for term in model.terms:
                if isinstance(term.query, str):
                    check_text_query(term.query)
        mode = self.mode if mode is None else check_mode(mode)
        if mode != DEFAULT_MODE:
            return self._search_mode(self._state, mode, queries, models, k, n_candidates, do_rerank, min_score)
        state = self._ensure_teacher(self._state) if do_rerank else self._state
        started = time.perf_counter()
        timings = StageTimings(batch_size=len(queries))

        tick = time.perf_counter()
        student_queries = encode_terms(lambda items: self._encode(state.student, items), models)
        timings.student_encode_ms = _ms(tick)

        tick = time.perf_counter()
        found = self._ann(state.index, student_queries, n_candidates if do_rerank else k,
                          [model.filters for model in models])
        timings.ann_ms = _ms(tick)

        reranked: str | None = None
        # stage 1 already merged by (score, shard, row) and holds at most k when not reranking
        top, student_scores = found, found.score
        if do_rerank and found.row.size:
            rerank_queries = student_queries
            reranked = "student"
            if state.teacher is not None:
                tick = time.perf_counter()
                # the same weights over the teacher's own term vectors
                rerank_queries = encode_terms(lambda items: self._encode(state.teacher, items), models)
                timings.teacher_encode_ms = _ms(tick)
                reranked = "teacher"
            tick = time.perf_counter()
            top, positions = stages.rerank(found, rerank_queries, _fetch(state.index, reranked), k)
            timings.rerank_ms = _ms(tick)
            if reranked == "teacher":  # carry each hit's stage-1 score along
                student_scores = np.where(positions >= 0,
                                          np.take_along_axis(found.score, np.maximum(positions, 0), 1), -np.inf)
            else:
                student_scores = top.score  # the exact ones

        hits = self._hits(state.index, top, student_scores, teacher=reranked == "teacher")
        timings.total_ms = _ms(started)
        results = []
        for i, (query, model, query_hits) in enumerate(zip(queries, models, hits, strict=True)):
            # a plain text or image keeps itself as the result's query (as before); else the Query
            shown = query if len(model.terms) == 1 and not model.filters.active and not isinstance(
                query, list | tuple | Query) else model
            result = SearchResult(query_hits, query=shown, timings=timings, reranked=reranked,
                                  candidates=int(found.valid[i].sum()))
            results.append(cut_min_score(result, min_score))
        return results

    # -- the asymmetric modes -----------------------------------------------------------

    def _search_mode(self, state: _Snapshot, mode: str, queries: Sequence[Any], models: list[Query], k: int,
                     n_candidates: int, do_rerank: bool, min_score: float | None) -> list[SearchResult]:
        from vkd.indexer.shards import PROJECTED_COLUMN, TEACHER_COLUMN
        from vkd.models.base import l2_normalize
        from vkd.retrieval.modes import scan_candidates, scan_prefix, teacher_ann

        index = state.index
        require_vectors(index, mode, scan=self.scan)
        started = time.perf_counter()
        timings = StageTimings(batch_size=len(queries))
        encoder, projection = self._mode_models(state, mode)
        tick = time.perf_counter()
        vectors = encode_terms(lambda items: self._encode(encoder, items), models)  # in the teacher's space
        if mode == "student-query":
            timings.student_encode_ms = _ms(tick)
        else:
            timings.teacher_encode_ms = _ms(tick)
        width = n_candidates if do_rerank else k
        tick = time.perf_counter()
        if mode == "student-query" and not self.scan:
            ann_dim = int(teacher_ann(index)["dim"])
            if self.prefix_dim is not None and self.prefix_dim != ann_dim:
                raise ValueError(f"prefix_dim={self.prefix_dim}: {index.path}'s teacher ANN index holds the first "
                                 f"{ann_dim} dimensions of the teacher vectors; leave prefix_dim out, or pass "
                                 "scan=True (--scan) to rank every stored vector on another prefix")
            heads = vectors[:, :ann_dim]  # what the ANN holds: the prefix, normalised again
            heads = l2_normalize(heads) if ann_dim < vectors.shape[1] else heads
            found = self._ann(index, np.ascontiguousarray(heads, dtype=np.float32), width,
                              [model.filters for model in models], column=TEACHER_COLUMN)
            rescore = True  # prefix (or IVF-PQ) scores: the full stored vectors give the final ones

            def fetch(shard: int, rows: np.ndarray) -> np.ndarray:
                return index.shards[shard].teacher_vectors(rows)
        elif mode == "student-query":
            prefix = scan_prefix(index.teacher.get("family"), vectors.shape[1], self.prefix_dim)
            found = scan_candidates(index, TEACHER_COLUMN, vectors, width, prefix=prefix,
                                    allowed=_allowed_rows(index, models))
            rescore = prefix < vectors.shape[1]  # a full-width scan's scores are the exact ones already

            def fetch(shard: int, rows: np.ndarray) -> np.ndarray:
                return index.shards[shard].teacher_vectors(rows)
        else:
            if projection is not None:
                # q·(W·s) = (Wᵀ·q)·s: the student FAISS index finds the candidates
                found = self._ann(index, l2_normalize(vectors @ projection.weight), width,
                                  [model.filters for model in models])
                rescore = True  # stage 1 ranked by (Wᵀ·q)·s, not by the projected score
            else:  # the student's projection is not at hand: scan the stored projected vectors
                found = scan_candidates(index, PROJECTED_COLUMN, vectors, width, allowed=_allowed_rows(index, models))
                rescore = False

            def fetch(shard: int, rows: np.ndarray) -> np.ndarray:
                return index.shards[shard].projected_vectors(rows)
        timings.ann_ms = _ms(tick)
        top, stage1 = found, found.score
        if found.row.size and (do_rerank or rescore):
            tick = time.perf_counter()
            top, positions = stages.rerank(found, vectors, fetch, k)
            timings.rerank_ms = _ms(tick)
            stage1 = np.where(positions >= 0, np.take_along_axis(found.score, np.maximum(positions, 0), 1), -np.inf)
        hits = self._hits(index, top, stage1, teacher=False)
        timings.total_ms = _ms(started)
        results = []
        for i, (query, model, query_hits) in enumerate(zip(queries, models, hits, strict=True)):
            shown = query if len(model.terms) == 1 and not model.filters.active and not isinstance(
                query, list | tuple | Query) else model
            result = SearchResult(query_hits, query=shown, timings=timings, reranked="exact" if do_rerank else None,
                                  candidates=int(found.valid[i].sum()), mode=mode)
            results.append(cut_min_score(result, min_score))
        return results

    def _mode_models(self, state: _Snapshot, mode: str) -> tuple[Encoder, Any]:
        """(query encoder, projection or None) of an asymmetric mode, loaded once."""
        from vkd.models.projection import ProjectedEncoder, ProjectionError, projection_for, read_projection

        index = state.index
        if mode == "student-query":
            space = f"teacher:{index.teacher['fingerprint']}"
            key = (mode, f"{state.student.fingerprint}|{space}")
            with self._lock:
                if key not in self._mode_cache:
                    base = state.student
                    if isinstance(base, ProjectedEncoder):
                        encoder = base
                    else:
                        try:
                            encoder = ProjectedEncoder(base, projection_for(base.name, space))
                        except ProjectionError as error:
                            raise ModeUnavailableError(f"search mode student-query: {error}") from None
                    if int(encoder.dim) != int(index.teacher["dim"]):
                        raise ModeUnavailableError(
                            f"search mode student-query: {encoder.name} projects into {encoder.dim}-d vectors but "
                            f"the index stores {index.teacher['dim']}-d teacher vectors")
                    self._mode_cache[key] = (encoder, None)
                return self._mode_cache[key]
        record = index.vectors["projected_vec"]
        key = (mode, str(record["space"]))
        with self._lock:
            if key not in self._mode_cache:
                teacher = self._teacher_arg
                if teacher is not None and not isinstance(teacher, str | os.PathLike):
                    encoder = teacher
                elif state.teacher is not None and state.teacher.fingerprint == record["teacher"]["fingerprint"]:
                    encoder = state.teacher
                else:
                    name = str(teacher) if teacher is not None else str(record["teacher"]["name"])
                    encoder = self._load(name, "teacher", recorded=teacher is None,
                                         options=record["teacher"].get("options"))
                if int(encoder.dim) != int(record["dim"]):
                    raise ModeUnavailableError(
                        f"search mode student-index: the index's projected vectors are {record['dim']}-d (teacher "
                        f"{record['teacher']['name']}) but the teacher given gives {encoder.dim}-d vectors")
                if encoder.fingerprint != record["teacher"]["fingerprint"]:
                    warnings.warn(f"{index.path}: teacher {encoder.name} (fingerprint {encoder.fingerprint}) is not "
                                  f"the one the projected vectors were trained for ({record['teacher']['name']}, "
                                  f"fingerprint {record['teacher']['fingerprint']})", UserWarning, stacklevel=4)
                projection = None
                try:  # the projection's matrix lets the student FAISS index find the candidates
                    found = read_projection(str(index.student["name"]))
                    if found is not None and found.sha256 == record.get("projection_sha256"):
                        projection = found
                except (ProjectionError, OSError):
                    projection = None
                self._mode_cache[key] = (encoder, projection)
            return self._mode_cache[key]

    def _encode(self, encoder: Encoder, queries: Sequence[Any]) -> np.ndarray:
        """float32 [len(queries), dim]: texts and images each in one batch."""
        kinds = [is_image_query(query) for query in queries]
        images = [i for i, is_image in enumerate(kinds) if is_image]
        texts = [i for i, is_image in enumerate(kinds) if not is_image]
        for i in texts:
            if not isinstance(queries[i], str):
                raise TypeError(f"query {i} is a {type(queries[i]).__name__}; pass text as str and images as "
                                "PIL images or pathlib.Path")
        out = np.zeros((len(queries), encoder.dim), dtype=np.float32)
        lock = self._encoder_lock(encoder)
        with lock:
            if texts:
                out[texts] = encoder.encode_text([queries[i] for i in texts], batch_size=len(texts))
            if images:
                out[images] = encoder.encode_images([queries[i] for i in images], batch_size=len(images))
        return out

    def _encoder_lock(self, encoder: Encoder) -> Any:
        if getattr(encoder, "thread_safe", False):
            return _NO_LOCK
        with self._lock:
            return self._encoder_locks.setdefault(id(encoder), threading.Lock())

    @staticmethod
    def _ann(index: Index, queries: np.ndarray, k: int, filters: Sequence[Filters] | None = None, *,
             column: str = "student_vec") -> Candidates:
        """Stage 1 over every shard's FAISS index over ``column`` (the student's, or the teacher
        ANN for teacher_vec), filtered queries among their allowed rows, merged."""
        filters = filters or [Filters()] * len(queries)
        plain = [i for i, f in enumerate(filters) if not f.active]
        per_shard = []
        # the allowed rows of each distinct filter, computed once per shard and batch
        allowed_cache: dict[tuple[Filters, int], np.ndarray] = {}
        for position, shard in enumerate(index.shards):
            target = shard.ann(column)
            scores = np.full((len(queries), 0), -np.inf, np.float32)
            rows = np.full((len(queries), 0), -1, np.int64)
            width = min(k, shard.live_rows)
            if shard.live_rows and width:
                scores = np.full((len(queries), width), -np.inf, np.float32)
                rows = np.full((len(queries), width), -1, np.int64)
                if plain:
                    scores[plain], rows[plain] = target.search(queries[plain], width)
                for i, query_filter in enumerate(filters):
                    if not query_filter.active:
                        continue
                    key = (query_filter, position)
                    if key not in allowed_cache:
                        allowed_cache[key] = query_filter.allowed_rows(shard)
                    scores[i:i + 1], rows[i:i + 1] = search_allowed(target, queries[i:i + 1], width,
                                                                    allowed_cache[key], vectors=target.vectors)
            per_shard.append((scores, rows))
        return merge_candidates(per_shard, k, len(queries))

    @staticmethod
    def _hits(index: Index, top: Candidates, student_scores: np.ndarray, *, teacher: bool) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        for qi in range(top.row.shape[0]):
            hits: list[Hit] = []
            valid = np.flatnonzero(top.row[qi] >= 0)
            records: dict[int, dict[str, Any]] = {}
            for shard in np.unique(top.shard[qi, valid]):
                positions = valid[top.shard[qi, valid] == shard]
                fetched = index.shards[int(shard)].records(top.row[qi, positions])
                records.update(zip(positions.tolist(), fetched, strict=True))
            for rank, position in enumerate(valid.tolist(), start=1):
                record = records[position]
                score = float(top.score[qi, position])
                hits.append(Hit(
                    rank=rank, id=str(record["id"]), path=str(record["path"]), score=score,
                    student_score=float(student_scores[qi, position]),
                    teacher_score=score if teacher else None,
                    shard=index.shards[int(top.shard[qi, position])].name, row=int(top.row[qi, position]),
                    width=record.get("width"), height=record.get("height"),
                ))
            results.append(hits)
        return results

    def describe(self) -> dict[str, Any]:
        state = self._state
        return {
            "index": str(state.index.path),
            "images": len(state.index),
            "shards": len(state.index.shards),
            "student": state.student.describe(),
            "teacher": state.teacher.describe() if state.teacher is not None else None,
            "index_teacher": state.index.teacher,
            "candidates": self.candidates,
            "mode": self.mode,
            "vectors": state.index.vectors,
        }

    def __repr__(self) -> str:
        return f"Retriever({str(self.path)!r}, images={len(self._state.index)}, student={self._state.student!r})"


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


def cut_min_score(result: SearchResult, min_score: float | None) -> SearchResult:
    """``result`` without the hits scoring below ``min_score`` (None: all kept)."""
    if min_score is None:
        return result
    kept = [hit for hit in result if hit.score >= float(min_score)]
    if len(kept) == len(result):
        return result
    return SearchResult(kept, query=result.query, timings=result.timings, reranked=result.reranked,
                        candidates=result.candidates, mode=result.mode)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def _allowed_rows(index: Index, models: Sequence[Query]) -> list[dict[int, np.ndarray] | None] | None:
    """Per query, the rows each shard lets it see (None: no filter), for the exact scans."""
    if not any(model.filters.active for model in models):
        return None
    cache: dict[tuple[Filters, int], np.ndarray] = {}
    out: list[dict[int, np.ndarray] | None] = []
    for model in models:
        if not model.filters.active:
            out.append(None)
            continue
        rows = {}
        for position, shard in enumerate(index.shards):
            key = (model.filters, position)
            if key not in cache:
                cache[key] = model.filters.allowed_rows(shard)
            rows[position] = cache[key]
        out.append(rows)
    return out


def _has_teacher_vectors(index: Index) -> bool:
    return index.teacher is not None and all(shard.teacher_dim for shard in index.shards)


def _fetch(index: Index, which: str) -> Any:
    if which == "teacher":
        return lambda shard, rows: index.shards[shard].teacher_vectors(rows)
    return lambda shard, rows: index.shards[shard].student_vectors(rows)


def check_student(index: Index, student: Encoder) -> None:
    """Refuse a student whose vectors are not the ones the index holds."""
    recorded = index.student
    if student.fingerprint != recorded["fingerprint"] or int(student.dim) != int(recorded["dim"]):
        raise IndexMismatchError(
            f"{index.path}: built with student {recorded['name']} (fingerprint {recorded['fingerprint']}, dim "
            f"{recorded['dim']}), but the student given is {student.name} (fingerprint {student.fingerprint}, dim "
            f"{student.dim}): its query vectors would not match the stored ones. Search with the index's "
            "student (omit --student), or re-index with this one (`vkd index IMAGES --model STUDENT --rebuild`)"
        )


def check_teacher(index: Index, teacher: Encoder) -> None:
    """Refuse a teacher of another dimension than the stored vectors; warn on another
    fingerprint (comparable shape, but not the model the vectors came from)."""
    recorded = index.teacher or {}
    stored_dims = {shard.teacher_dim for shard in index.shards if shard.teacher_dim}
    expected = int(recorded.get("dim") or next(iter(stored_dims), 0))
    if int(teacher.dim) != expected or (stored_dims and stored_dims != {expected}):
        raise IndexMismatchError(
            f"{index.path}: stores {expected}-d teacher vectors of {recorded.get('name')} (fingerprint "
            f"{recorded.get('fingerprint')}), but the teacher given is {teacher.name} with {teacher.dim}-d vectors. "
            "Rerank with the index's teacher (omit --teacher), or re-index with this one (--teacher MODEL --rebuild)"
        )
    if teacher.fingerprint != recorded.get("fingerprint"):
        warnings.warn(
            f"{index.path}: teacher {teacher.name} (fingerprint {teacher.fingerprint}) is not the one whose vectors "
            f"the index stores ({recorded.get('name')}, fingerprint {recorded.get('fingerprint')}); rerank scores "
            "compare its query vectors with the other model's image vectors",
            UserWarning, stacklevel=3,
        )
