"""The query model shared by the CLI, the library and the HTTP API.

A ``Query`` is weighted ``Term``s (text or image, a negative weight pushes its matches
down) plus ``Filters`` that restrict the rows *before* ranking. Both search stages use the
same combination: the weighted sum of each model's normalised term vectors, renormalised
(stage 1 with the student's vectors, the rerank with the teacher's).

The compact text syntax (``parse_compact``), as in rclip: terms joined by `` + `` or
`` - `` (with spaces on both sides, so "t-shirt" or "1+1" stay literal), each with an
optional ``WEIGHT:`` prefix: ``"2:cat + dog - grass"`` is cat x2, dog x1, grass x-1.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from vkd.indexer.index import Shard

#: the EXIF capture time, written by the indexer into new shards (nullable; older shards lack it)
CAPTURED_COLUMN = "captured"
ORIENTATIONS = ("landscape", "portrait", "square")
#: below this fraction of a shard's rows, the filtered search scores the allowed rows itself
FLAT_FRACTION = 0.2

_SPLIT = re.compile(r" ([+-]) ")
_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*:(.*)$", re.DOTALL)


class QueryError(ValueError):
    """A query that cannot be searched; the message says why and what would be accepted."""


#: Longer text is refused, not cut silently. Text encoders read far less anyway (CLIP: 77
#: tokens, about 300 characters); within this bound, text past the model's token limit is cut
#: by the tokenizer, as in training.
MAX_QUERY_CHARS = 2000


def check_text_query(query: str) -> str:
    """``query`` as it will be encoded, or ``QueryError``: empty, not valid UTF-8, too long."""
    if not query.strip():
        raise QueryError('empty query: give some words to search for, e.g. "a dog on a beach"')
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as error:
        # a shell argument with bytes that are not UTF-8 arrives as lone surrogates
        bad = query[error.start].encode("utf-8", "surrogateescape")
        raise QueryError(f"the query is not valid UTF-8 text (byte 0x{bad.hex()} at character {error.start}); "
                         "check the terminal's encoding (LANG=C.UTF-8) or the text's source") from None
    if len(query) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS} (text "
                         "encoders read only the first few hundred characters anyway): shorten it")
    return query


@dataclass(frozen=True)
class Term:
    """One part of a query: ``query`` is text (``str``) or an image (PIL image or
    ``pathlib.Path``); ``weight`` multiplies its normalised vector (negative: "not this")."""

    query: Any
    weight: float = 1.0

    def __post_init__(self) -> None:
        weight = float(self.weight)
        if not math.isfinite(weight) or weight == 0:
            raise QueryError(f"term weight {self.weight!r}: give a finite, non-zero number (e.g. 2 or -1)")
        object.__setattr__(self, "weight", weight)


@dataclass(frozen=True)
class Filters:
    """Which rows may be ranked. Every bound is inclusive; None: no bound.

    ``path_glob`` matches the path relative to the images root ('/'-separated, fnmatch:
    ``*`` crosses '/'), ``path_prefix`` is a prefix of it. Times are datetimes (naive =
    UTC); ``modified_*`` read the file's mtime, ``taken_*`` the EXIF capture time (a row
    without one never matches a ``taken_*`` bound). ``orientation``: landscape (wider than
    high), portrait, or square, after EXIF rotation.
    """

    path_glob: str | None = None
    path_prefix: str | None = None
    modified_after: datetime | None = None
    modified_before: datetime | None = None
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    orientation: str | None = None

    def __post_init__(self) -> None:
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise QueryError(f"orientation={self.orientation!r}: choose one of {', '.join(ORIENTATIONS)}")
        for name in ("modified_after", "modified_before", "taken_after", "taken_before"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, datetime):
                object.__setattr__(self, name, parse_time(value, name))

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return out

    def allowed_rows(self, shard: Shard) -> np.ndarray:
        """int64 row numbers of ``shard`` that are live and match, ascending.

        Vectorised over the Arrow columns (pyarrow.compute) except the glob, which runs in
        Python only on the rows the other conditions left.
        """
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        table = shard.table
        mask = pa.array(np.ones(shard.rows, dtype=bool))

        def both(condition: Any) -> None:
            nonlocal mask
            # a null (e.g. no capture time) must exclude the row, not propagate
            mask = pc.and_(mask, pc.fill_null(condition, False))

        if self.path_prefix is not None:
            both(pc.starts_with(table.column("path"), self.path_prefix))
        for column, low, high in (("mtime", self.modified_after, self.modified_before),
                                  (CAPTURED_COLUMN, self.taken_after, self.taken_before)):
            if low is None and high is None:
                continue
            if column not in table.column_names:  # a shard written before the column existed
                both(pa.array(np.zeros(shard.rows, dtype=bool)))
                continue
            values = table.column(column)
            if low is not None:
                both(pc.greater_equal(values, _ns(low)))
            if high is not None:
                both(pc.less_equal(values, _ns(high)))
        for column, low, high in (("width", self.min_width, self.max_width),
                                  ("height", self.min_height, self.max_height)):
            if low is not None:
                both(pc.greater_equal(table.column(column), int(low)))
            if high is not None:
                both(pc.less_equal(table.column(column), int(high)))
        if self.orientation is not None:
            compare = {"landscape": pc.greater, "portrait": pc.less, "square": pc.equal}[self.orientation]
            both(compare(table.column("width"), table.column("height")))
        rows = np.asarray(pc.indices_nonzero(mask).to_numpy(), dtype=np.int64)
        if len(shard.retired_rows):
            rows = rows[~np.isin(rows, shard.retired_rows)]
        if self.path_glob is not None and rows.size:
            pattern = re.compile(fnmatch.translate(self.path_glob))
            paths = table.column("path").take(rows).to_pylist()
            rows = rows[np.fromiter((pattern.match(p) is not None for p in paths), dtype=bool, count=len(paths))]
        return rows


NO_FILTERS = Filters()


@dataclass(frozen=True)
class Query:
    """Weighted terms and filters: ``Query([Term("a dog"), Term("a cat", -1)], Filters(...))``."""

    terms: tuple[Term, ...]
    filters: Filters = field(default_factory=Filters)

    def __post_init__(self) -> None:
        terms = tuple(term if isinstance(term, Term) else Term(*term) for term in self.terms)
        if not terms:
            raise QueryError('no query terms: give some text or an image, e.g. "a dog on a beach"')
        if not any(term.weight > 0 for term in terms):
            raise QueryError("every term has a negative weight: add at least one positive term (what to find)")
        object.__setattr__(self, "terms", terms)

    @property
    def has_images(self) -> bool:
        from vkd.retrieval.retriever import is_image_query

        return any(is_image_query(term.query) for term in self.terms)

    def describe(self) -> str:
        """The compact syntax for the query (images by path or size)."""
        from vkd.retrieval.results import describe_query

        parts = []
        for i, term in enumerate(self.terms):
            weight = abs(term.weight)
            text = describe_query(term.query) if weight == 1 else f"{weight:g}:{describe_query(term.query)}"
            parts.append(text if i == 0 and term.weight > 0 else f"{'-' if term.weight < 0 else '+'} {text}")
        return " ".join(parts).removeprefix("+ ")


def parse_compact(text: str, *, raw: bool = False) -> list[Term]:
    """``"2:cat + dog - grass"`` -> [Term("cat", 2), Term("dog", 1), Term("grass", -1)].

    Splits only on " + " / " - " with a space each side; a leading "N:" (a plain number) is
    the weight. ``raw=True``: the whole text is one term of weight 1, nothing parsed.
    """
    check_text_query(text)  # the whole text first: an empty or overlong query gets the same message as ever
    if raw:
        return [Term(text, 1.0)]
    pieces = _SPLIT.split(text)
    terms = []
    for i in range(0, len(pieces), 2):
        sign = -1.0 if i and pieces[i - 1] == "-" else 1.0
        piece = pieces[i]
        weight = 1.0
        match = _WEIGHT.match(piece)
        if match:
            weight, piece = float(match.group(1)), match.group(2)
        if not piece.strip():
            raise QueryError(f"term {i // 2 + 1} of {text!r} is empty: write terms like \"2:cat + dog - grass\" "
                             "(or use --raw to search the text as it is)")
        terms.append(Term(piece.strip(), sign * weight))
    return terms


def as_query(query: Any, filters: Filters | None = None) -> Query:
    """A ``Query`` from what ``Retriever.search`` accepts: a ``Query``; one text or image
    (not parsed: the library takes text literally); or a list of ``(query, weight)`` pairs
    or ``Term``s. ``filters`` apply unless the ``Query`` has filters of its own."""
    if isinstance(query, Query):
        # a Query's own filters win; ``filters`` is the default for those without any
        if filters is not None and filters.active and not query.filters.active:
            return Query(query.terms, filters)
        return query
    if isinstance(query, Term):
        terms: Sequence[Any] = [query]
    elif isinstance(query, list | tuple) and not isinstance(query, str):
        terms = [item if isinstance(item, Term) else _pair(item) for item in query]
    else:
        terms = [Term(query, 1.0)]
    return Query(tuple(terms), filters or NO_FILTERS)


def _pair(item: Any) -> Term:
    if isinstance(item, list | tuple) and len(item) == 2:
        return Term(item[0], item[1])
    raise TypeError(f"a query term must be (query, weight) or a Term, got {item!r:.60}")


def combine(vectors: np.ndarray, weights: Iterable[float]) -> np.ndarray:
    """The weighted sum of the L2-normalised rows of ``vectors``, L2-normalised again."""
    import numpy as np

    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-12)
    total = (np.asarray(list(weights), dtype=np.float32)[:, None] * unit).sum(axis=0)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:  # e.g. "cat - cat": nothing left to search for
        raise QueryError("the terms cancel out (their weighted sum is zero): change a weight or a term")
    return (total / norm).astype(np.float32)


def parse_time(value: Any, name: str = "date") -> datetime:
    """An ISO date or date-time (``2024-05-01``, ``2024-05-01T12:30``) as an aware datetime;
    without a zone it is UTC."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise QueryError(f"{name}={value!r}: not an ISO date; give e.g. 2024-05-01 or 2024-05-01T12:30") from None
    else:
        raise QueryError(f"{name}={value!r}: give an ISO date such as 2024-05-01")
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def _ns(moment: datetime) -> int:
    # exact integer nanoseconds; a float timestamp would lose the last digits
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def search_allowed(shard: Shard, queries: np.ndarray, k: int, allowed: np.ndarray, *,
                   vectors: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``shard`` for each query among the ``allowed`` rows (live, matching),
    exactly: (scores [q, k] float32, rows [q, k] int64), padded with -inf / -1.

    A selective filter (allowed rows under ``FLAT_FRACTION`` of the shard, or any filter on
    a flat index) scores the allowed rows' vectors from the memory map directly: exact, and
    it reads only those rows, which beats any index for a few thousand rows. A broad filter
    on an HNSW / IVF index uses FAISS with an ``IDSelectorBatch`` over the allowed rows
    (retired rows are already left out of ``allowed``), as approximate as the unfiltered
    search, then re-scores its finds exactly.

    ``shard`` is anything with a shard's ``spec``, ``rows`` and ``searcher`` (a ``Shard``, or
    one of its ``ShardAnn`` indexes); ``vectors(rows)`` gives the rows as its index holds them
    (default: ``shard.student_vectors``).
    """
    import numpy as np

    n_queries = queries.shape[0]
    scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
    rows = np.full((n_queries, k), -1, dtype=np.int64)
    if k <= 0 or allowed.size == 0 or n_queries == 0:
        return scores, rows
    take = min(k, allowed.size)
    fetch = vectors if vectors is not None else shard.student_vectors
    if shard.spec.kind == "flat" or allowed.size <= FLAT_FRACTION * shard.rows:
        exact = queries @ fetch(allowed).T  # [q, allowed]
        for qi in range(n_queries):
            # ties by row, as every other stage orders them
            order = np.lexsort((allowed, -exact[qi].astype(np.float64)))[:take]
            scores[qi, :take] = exact[qi, order]
            rows[qi, :take] = allowed[order]
        return scores, rows
    return _faiss_allowed(shard, queries, k, allowed, fetch_rows=fetch)


def _faiss_allowed(shard: Shard, queries: np.ndarray, k: int, allowed: np.ndarray, *,
                   fetch_rows: Any) -> tuple[np.ndarray, np.ndarray]:
    import faiss
    import numpy as np

    searcher = shard.searcher
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    spec = searcher.spec
    factor = int(spec.params.get("rescore_factor", 1)) if spec.params.get("rescore") else 1
    fetch = min(int(allowed.size), k * factor)
    if spec.kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(int(spec.params.get("efSearch", 0)), fetch), sel=selector)
    else:
        params = faiss.SearchParametersIVF(nprobe=int(spec.params.get("nprobe", 1)), sel=selector)
    _, found = searcher.index.search(np.ascontiguousarray(queries), fetch, params=params)
    scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    rows = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for qi in range(queries.shape[0]):
        picked = np.sort(found[qi][found[qi] >= 0])
        if not picked.size:
            continue
        exact = fetch_rows(picked) @ queries[qi]
        order = np.lexsort((picked, -exact.astype(np.float64)))[:k]
        scores[qi, : len(order)] = exact[order]
        rows[qi, : len(order)] = picked[order]
    return scores, rows


def encode_terms(encode: Any, queries: Sequence[Query]) -> np.ndarray:
    """float32 [len(queries), d]: each query's combined vector. ``encode(list_of_terms)``
    encodes term queries (text and images) in one batch per kind."""
    import numpy as np

    flat = [term.query for query in queries for term in query.terms]
    vectors = encode(flat)
    out = []
    start = 0
    for query in queries:
        n = len(query.terms)
        out.append(combine(vectors[start:start + n], [term.weight for term in query.terms]))
        start += n
    return np.stack(out) if out else np.zeros((0, vectors.shape[1]), np.float32)


def check_path_glob(pattern: str) -> str:
    """A glob over '/'-separated relative paths; refuses an absolute one with the fix."""
    if pattern.startswith("/") or os.path.isabs(pattern):
        raise QueryError(f"path glob {pattern!r} is absolute; globs match the path relative to the images folder, "
                         "e.g. 'holidays/*.jpg' or '*/2024/*'")
    return pattern
