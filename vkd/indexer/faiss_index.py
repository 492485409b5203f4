"""Stage 4b — the FAISS index of one shard: which kind, how to build it, how to search it.

``choose_index`` is a pure function in the spirit of autofaiss: the shard's size and
dimension and a memory budget in, an ``IndexSpec`` (factory string + parameters) out.

* **Flat** (exact inner product) while a shard is small: up to 50 000 rows it answers a
  query in milliseconds and costs no recall.
* **HNSW** (M=32) for medium shards: sub-linear search, vectors stored in full, so its
  scores are exact; about ``4·d + 8·M`` bytes a row.
* **IVF-PQ** for large shards or tight budgets: ``nlist ≈ 4·√n`` coarse cells, product
  quantisation with ``m`` sub-quantisers (``m`` divides ``d``) of 8 bits, ``m + 8`` bytes a
  row. Its approximate scores are never returned: ``rescore_factor × k`` candidates are
  re-scored exactly against the float32 vectors in the memory-mapped Arrow shard.

The memory budget counts what search keeps in RAM (the FAISS index); the Arrow vectors used
for re-scoring are memory-mapped from disk and paged in on demand. faiss is imported
lazily so that choosing an index needs no faiss at all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX_ROWS = 50_000
HNSW_MAX_ROWS = 1_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
PQ_MAX_M = 64
PQ_NBITS = 8
MIN_POINTS_PER_CENTROID = 39  # below this k-means is poorly trained (faiss warns)
RESCORE_FACTOR = 4


class BudgetTooSmallError(ValueError):
    """No index kind fits the memory budget; ``needed`` is the smallest estimate in bytes."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class IndexSpec:
    """What to build: ``kind`` in flat/hnsw/ivfpq, a faiss factory string and parameters."""

    kind: str
    factory: str
    params: dict[str, Any] = field(default_factory=dict)
    estimated_bytes: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(kind=data["kind"], factory=data["factory"], params=dict(data.get("params", {})),
                   estimated_bytes=int(data.get("estimated_bytes", 0)), reason=data.get("reason", ""))


def flat_bytes(n_rows: int, dim: int) -> int:
    return n_rows * dim * 4


def hnsw_bytes(n_rows: int, dim: int, m: int = HNSW_M) -> int:
    # level 0 holds 2·M neighbour ids of 4 bytes; upper levels add ~1/(M-1) of that again
    return n_rows * (dim * 4 + int(2 * m * 4 * (1 + 1 / (m - 1))) + 8)


def ivfpq_bytes(n_rows: int, dim: int, nlist: int, m: int, nbits: int = PQ_NBITS) -> int:
    codes = n_rows * (math.ceil(m * nbits / 8) + 8)  # code + int64 id per row
    return codes + nlist * dim * 4 + (1 << nbits) * dim * 4


def _divisors(n: int) -> list[int]:
    return sorted(d for d in range(1, n + 1) if n % d == 0)


def _ivf_shape(n_rows: int) -> tuple[int, int, int]:
    """(nlist, nprobe, nbits) for ``n_rows``: enough training points per centroid."""
    nlist = max(1, min(int(round(4 * math.sqrt(max(n_rows, 1)))), n_rows // MIN_POINTS_PER_CENTROID))
    nprobe = max(1, min(nlist, max(8, int(round(math.sqrt(nlist))))))
    nbits = PQ_NBITS
    while nbits > 1 and (1 << nbits) * MIN_POINTS_PER_CENTROID > n_rows:
        nbits -= 1  # a forced IVF-PQ on a small shard: fewer PQ centroids than 256
    return nlist, nprobe, nbits


def _flat(n_rows: int, dim: int, reason: str) -> IndexSpec:
    return IndexSpec("flat", "Flat", {"metric": "inner_product"}, flat_bytes(n_rows, dim), reason)


def _hnsw(n_rows: int, dim: int, reason: str) -> IndexSpec:
    params = {"metric": "inner_product", "M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION,
              "efSearch": HNSW_EF_SEARCH, "rescore": True}
    return IndexSpec("hnsw", f"HNSW{HNSW_M}", params, hnsw_bytes(n_rows, dim), reason)


def _ivfpq(n_rows: int, dim: int, budget: int | None, reason: str, *, forced: bool) -> IndexSpec:
    nlist, nprobe, nbits = _ivf_shape(n_rows)
    candidates = [m for m in _divisors(dim) if m <= PQ_MAX_M and (dim // m >= 2 or dim == 1)]
    candidates = candidates or [1]
    chosen = None
    for m in reversed(candidates):  # the most bytes per code that fits: best recall before re-scoring
        if budget is None or forced or ivfpq_bytes(n_rows, dim, nlist, m, nbits) <= budget:
            chosen = m
            break
    if chosen is None:
        need = ivfpq_bytes(n_rows, dim, nlist, candidates[0], nbits)
        raise BudgetTooSmallError(
            f"a memory budget of {budget} bytes is too small for {n_rows} vectors of dim {dim}: even the "
            f"smallest IVF-PQ index (PQ{candidates[0]}) needs {need} bytes; raise the budget", need)
    params = {"metric": "inner_product", "nlist": nlist, "nprobe": nprobe, "m": chosen, "nbits": nbits,
              "rescore": True, "rescore_factor": RESCORE_FACTOR}
    # "np": no polysemous training; it costs seconds and only serves Hamming-filtered search
    return IndexSpec("ivfpq", f"IVF{nlist},PQ{chosen}x{nbits}np", params,
                     ivfpq_bytes(n_rows, dim, nlist, chosen, nbits), reason)


def choose_index(n_rows: int, dim: int, memory_budget_bytes: int | None = None,
                 index_type: str = "auto") -> IndexSpec:
    """Pick the FAISS index for a shard of ``n_rows`` vectors of ``dim`` floats.

    Pure: builds nothing. ``memory_budget_bytes`` (None = unbounded) caps the estimated
    RAM of the index; ``index_type`` other than "auto" forces a kind (its parameters still
    follow the shard size). Raises ``ValueError`` when nothing fits the budget.
    """
    if n_rows < 0 or dim <= 0:
        raise ValueError(f"choose_index: n_rows={n_rows}, dim={dim}; need n_rows >= 0 and dim > 0")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type={index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if memory_budget_bytes is not None and memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes={memory_budget_bytes}: must be positive (or None)")
    budget = memory_budget_bytes
    if index_type == "flat":
        return _flat(n_rows, dim, "forced by index_type=flat")
    if index_type == "hnsw":
        return _hnsw(n_rows, dim, "forced by index_type=hnsw")
    if index_type == "ivfpq":
        return _ivfpq(n_rows, dim, budget, "forced by index_type=ivfpq", forced=True)

    def fits(size: int) -> bool:
        return budget is None or size <= budget

    if n_rows <= FLAT_MAX_ROWS and fits(flat_bytes(n_rows, dim)):
        return _flat(n_rows, dim, f"{n_rows} rows <= {FLAT_MAX_ROWS}: exact search is fast enough")
    if n_rows <= HNSW_MAX_ROWS and fits(hnsw_bytes(n_rows, dim)):
        why = "flat exceeds the memory budget" if n_rows <= FLAT_MAX_ROWS else f"{n_rows} rows > {FLAT_MAX_ROWS}"
        return _hnsw(n_rows, dim, f"{why}; HNSW fits")
    why = f"{n_rows} rows > {HNSW_MAX_ROWS}" if n_rows > HNSW_MAX_ROWS else "HNSW exceeds the memory budget"
    return _ivfpq(n_rows, dim, budget, f"{why}; IVF-PQ with exact re-scoring", forced=False)


#: the Matryoshka prefix a teacher trained with one is searched on (Qwen3-VL-Embedding: 256 of 2048/4096)
MATRYOSHKA_PREFIX = 256
MATRYOSHKA_FAMILIES = ("qwen3_vl", "qwen3-vl")  # model_type, and the family name


def teacher_ann_dim(family: str | None, dim: int, requested: int | None = None) -> int:
    """How many leading dimensions of the teacher's vectors its ANN index (student-query search)
    holds: ``requested`` when given, a Matryoshka prefix for a teacher trained with one (its
    prefix is a good embedding on its own, so a smaller index finds the candidates, which are
    then re-scored on the full vectors), else the whole vector. Pure, like ``choose_index``."""
    if requested is not None:
        if not 1 <= int(requested) <= dim:
            raise ValueError(f"teacher ANN dim {requested}: must lie in [1, {dim}] (the teacher's dimension)")
        return int(requested)
    if family in MATRYOSHKA_FAMILIES and dim > MATRYOSHKA_PREFIX:
        return MATRYOSHKA_PREFIX
    return dim


def split_share(share: int | None, widths: tuple[int, ...]) -> tuple[int | None, ...]:
    """A shard's memory budget share divided between its FAISS indexes (student, teacher ANN) in
    proportion to their vector widths, so that the budget still caps all of them together."""
    if share is None:
        return tuple(None for _ in widths)
    total = max(sum(widths), 1)
    return tuple(max(1, share * width // total) for width in widths)


def _faiss() -> Any:
    import faiss

    return faiss


def build_faiss(vectors: np.ndarray, spec: IndexSpec) -> Any:
    """Build the index ``spec`` describes over ``vectors`` (float32 [n, d], rows = ids 0..n-1)."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = int(spec.params.get("efConstruction", HNSW_EF_CONSTRUCTION))
        index.hnsw.efSearch = int(spec.params.get("efSearch", HNSW_EF_SEARCH))
    if not index.is_trained:
        index.train(vectors)
    if spec.kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = int(spec.params.get("nprobe", 1))
    if len(vectors):
        index.add(vectors)
    return index


def deserialize_faiss(data: bytes) -> Any:
    """An index from the bytes ``faiss.serialize_index`` wrote (what a ``.faiss`` file holds)."""
    return _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))


class FaissSearcher:
    """Searches one shard's FAISS index, leaving out retired rows and re-scoring exactly.

    ``vectors`` is the shard's float32 [n, d] vector view (memory-mapped); it is read only
    for the candidate rows.
    """

    def __init__(self, index: Any, spec: IndexSpec, vectors: np.ndarray, retired_rows: np.ndarray) -> None:
        faiss = _faiss()
        self.index = index
        self.spec = spec
        self.vectors = vectors
        self.n_live = int(index.ntotal) - len(retired_rows)
        self._selector = None
        if len(retired_rows):
            # keep the inner selector referenced: IDSelectorNot only holds a raw pointer to it
            self._retired = faiss.IDSelectorBatch(np.ascontiguousarray(retired_rows, dtype=np.int64))
            self._selector = faiss.IDSelectorNot(self._retired)

    def _params(self, fetch: int) -> Any:
        faiss = _faiss()
        kwargs: dict[str, Any] = {}
        if self._selector is not None:
            kwargs["sel"] = self._selector
        if self.spec.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(int(self.spec.params.get("efSearch", 0)), fetch),
                                              **kwargs)
        if self.spec.kind == "ivfpq":
            return faiss.SearchParametersIVF(nprobe=int(self.spec.params.get("nprobe", 1)), **kwargs)
        return faiss.SearchParameters(**kwargs) if kwargs else None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n_queries = queries.shape[0]
        scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        rows = np.full((n_queries, k), -1, dtype=np.int64)
        if k <= 0 or self.n_live <= 0 or n_queries == 0:
            return scores, rows
        rescore = bool(self.spec.params.get("rescore", False))
        factor = int(self.spec.params.get("rescore_factor", 1)) if rescore else 1
        fetch = min(int(self.index.ntotal), k * factor)
        params = self._params(fetch)
        found_scores, found_rows = self.index.search(queries, fetch, params=params)
        if rescore:
            found_scores = self._exact_scores(queries, found_rows)
            order = np.argsort(-found_scores, axis=1, kind="stable")
            found_scores = np.take_along_axis(found_scores, order, axis=1)
            found_rows = np.take_along_axis(found_rows, order, axis=1)
        take = min(k, fetch)
        scores[:, :take] = found_scores[:, :take]
        rows[:, :take] = found_rows[:, :take]
        scores[rows < 0] = -np.inf
        return scores, rows

    def _exact_scores(self, queries: np.ndarray, candidate_rows: np.ndarray) -> np.ndarray:
        exact = np.full(candidate_rows.shape, -np.inf, dtype=np.float32)
        for qi in range(candidate_rows.shape[0]):
            valid = candidate_rows[qi] >= 0
            picked = candidate_rows[qi][valid]
            if picked.size:
                # fancy indexing reads only the candidate rows from the memory map
                exact[qi, valid] = self.vectors[picked] @ queries[qi]
        return exact
