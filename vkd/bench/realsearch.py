"""A full query at real sizes: two-stage search against teacher-only, at 1M vectors.

For a (student, teacher) pair of real embedding sizes (CLIP B/32 → L/14: 512 → 768;
Qwen3-VL-Embedding 2B → 8B: 2048 → 4096), a corpus of synthetic vectors of those sizes
(``vkd.bench.realcorpus``) is searched by:

* **teacher only** — exact inner product over the float16 teacher vectors (a FAISS fp16
  scalar-quantizer flat index: the same numbers the index stores, scanned in full per query);
* **student ANN** — IVF-PQ over the student vectors with vkd's exact re-scoring
  (``FaissSearcher``), no rerank;
* **two-stage k1** — the student's top-k1 (vkd's own stage functions), re-scored against the
  stored teacher vectors of the candidates; top 10;
* **two-stage on a Matryoshka prefix** (Qwen3-VL) — stage 1 on the first ``prefix`` dimensions
  of the student vectors (their own IVF-PQ), the rest unchanged.

HNSW over 1M × 2048 vectors takes most of an hour to build on two cores, so stage 1 is IVF-PQ
(as vkd's ``choose_index`` picks above HNSW's range) with ``nlist`` lists trained on a sample;
the parameters are in the result. Quality: overlap@10 with the teacher-only top-10 and
Recall@10 against the ground truth. Latency: per query at batch 1, in ``rounds`` rounds of
``latency_queries`` queries each (the same queries for every method of a round, in a
rotating order); a full query adds the query encodings measured by the encoding benchmark,
round by round. Stage 1 is also timed through vkd against the same FAISS index called
directly, for vkd's overhead.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vkd.bench.realcorpus import FactorModel, make_factor_corpus
from vkd.bench.search import build_and_reload, overlap_at_k, recall_at_k
from vkd.bench.timing import MIB, ratio_spread, spread

TOP_K = 10
GIB = 1024.0**3


@dataclass(frozen=True)
class Pairing:
    name: str
    student_arch: str
    teacher_arch: str
    student_dim: int
    teacher_dim: int
    prefix: int | None = None  # Matryoshka stage-1 prefix, where the student family has one


#: The two (student, teacher) pairs of real sizes the design names: CLIP B/32 → L/14, and
#: Qwen3-VL-Embedding 2B → 8B (a Matryoshka model: stage 1 also on its 256-d prefix).
PAIRINGS: dict[str, Pairing] = {
    "clip": Pairing("CLIP ViT-B/32 → ViT-L/14", "clip-vit-b32", "clip-vit-l14", 512, 768),
    "qwen3-vl": Pairing("Qwen3-VL-Embedding 2B → 8B", "qwen3-vl-embedding-2b", "qwen3-vl-embedding-8b", 2048, 4096,
                        prefix=256),
}


@dataclass
class SearchSettings:
    corpus_size: int = 1_000_000
    quality_queries: int = 300
    latency_queries: int = 10
    rounds: int = 3
    k1: tuple[int, ...] = (100, 1000)
    nlist: int = 1024
    train_per_list: int = 40  # k-means training points per list (faiss asks for at least 39)
    kmeans_iterations: int = 10
    seed: int = 0


def ivfpq_params(n: int, dim: int, settings: SearchSettings) -> dict[str, Any]:
    """IVF-PQ for ``n`` vectors of ``dim``: ``settings.nlist`` lists (fewer for a small corpus),
    vkd's nprobe rule (max(8, √nlist)) and PQ size (the largest divisor of ``dim`` up to 64),
    re-scoring 4 × k candidates exactly, as vkd's IVF-PQ shards do."""
    from vkd.indexer.faiss_index import PQ_MAX_M, RESCORE_FACTOR

    nlist = max(1, min(settings.nlist, n // settings.train_per_list))
    nprobe = max(1, min(nlist, max(8, int(round(np.sqrt(nlist))))))
    m = max(d for d in range(1, min(PQ_MAX_M, dim // 2) + 1) if dim % d == 0)
    nbits = 8
    while nbits > 4 and (1 << nbits) * 39 > n:
        nbits -= 1
    return {"metric": "inner_product", "nlist": nlist, "nprobe": nprobe, "m": m, "nbits": nbits, "rescore": True,
            "rescore_factor": RESCORE_FACTOR, "train_points": min(n, settings.train_per_list * nlist),
            "kmeans_iterations": settings.kmeans_iterations}


def _build_ivfpq(vectors: np.ndarray, params: Mapping[str, Any], seed: int) -> Any:
    import faiss

    dim = vectors.shape[1]
    factory = f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}np"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = int(params["kmeans_iterations"])
    rows = np.sort(np.random.default_rng([seed, 21]).choice(len(vectors), size=params["train_points"], replace=False))
    index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    for start in range(0, len(vectors), 65_536):
        index.add(np.ascontiguousarray(vectors[start:start + 65_536], dtype=np.float32))
    ivf.nprobe = int(params["nprobe"])
    return index


class TeacherStore:
    """The teacher vectors, float16, held once: the memory of a FAISS fp16 flat index, which
    also serves as a numpy [n, d] array (what the rerank gathers rows from)."""

    def __init__(self, n: int, dim: int) -> None:
        import faiss

        self.index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        self.index.codes.resize(n * dim * 2)
        raw = faiss.rev_swig_ptr(self.index.codes.data(), n * dim * 2)
        self.vectors = raw.view(np.float16).reshape(n, dim)

    def seal(self) -> None:
        self.index.ntotal = len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def fetch(self, _shard: int, rows: np.ndarray) -> np.ndarray:
        return self.vectors[rows].astype(np.float32)  # what Shard.teacher_vectors does


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """Exact top-k rows by inner product over float16 ``vectors``, chunk by chunk with BLAS
    (the quality reference: many queries at once, unlike the timed teacher-only search)."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_scores = torch.full((len(queries), k), -float("inf"))
    best_rows = torch.full((len(queries), k), -1, dtype=torch.int64)
    for start in range(0, len(vectors), chunk):
        block = torch.from_numpy(vectors[start:start + chunk]).float()
        scores = q @ block.T
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        scores_all = torch.cat([best_scores, top.values], dim=1)
        rows_all = torch.cat([best_rows, top.indices + start], dim=1)
        keep = torch.topk(scores_all, k, dim=1)
        best_scores, best_rows = keep.values, torch.gather(rows_all, 1, keep.indices)
    return best_rows.numpy()


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def measure_pairing(pairing: Pairing, settings: SearchSettings, *, workdir: Path,
                    encode: Mapping[str, Mapping[str, Any] | None] | None = None,
                    model: FactorModel | None = None,
                    progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Every configuration of ``pairing`` at ``settings.corpus_size`` vectors (module docstring).

    ``encode``: per role ("student", "teacher") the query encoding to add — ``round_ms`` (one
    value per round), ``backend``, ``extrapolated``, ``peak_rss_bytes``, ``model_bytes`` — or
    None where that model was not measured.
    """
    from vkd.indexer.faiss_index import FaissSearcher, IndexSpec
    from vkd.retrieval import stages

    label = pairing.name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", pairing.name).strip("-").lower()  # file names, not labels
    n, ds, dt = settings.corpus_size, pairing.student_dim, pairing.teacher_dim
    n_queries = max(settings.quality_queries, settings.latency_queries * settings.rounds)
    progress(f"{label}: generating {n:,} vectors (student {ds}-d float32, teacher {dt}-d float16)")
    started = time.perf_counter()
    store = TeacherStore(n, dt)
    report_every = max(n // 8, 1)

    def generated(rows: int) -> None:
        if rows % report_every < 32_768 or rows == n:
            progress(f"{label}: generated {rows:,} / {n:,}")

    corpus = make_factor_corpus(n, n_queries, student_dim=ds, teacher_dim=dt, model=model, seed=settings.seed,
                                teacher_out=store.vectors, progress=generated)
    store.seal()
    generate_s = time.perf_counter() - started
    workdir.mkdir(parents=True, exist_ok=True)

    # -- indexes -----------------------------------------------------------------------
    built: dict[str, Any] = {}
    params = ivfpq_params(n, ds, settings)
    progress(f"{label}: building student IVF-PQ ({params['nlist']} lists, PQ{params['m']}, {ds}-d)")
    built["student"] = build_and_reload(lambda: _build_ivfpq(corpus.student, params, settings.seed), workdir,
                                        f"{slug}-student", "ivfpq", f"IVF{params['nlist']},PQ{params['m']}x"
                                        f"{params['nbits']}np", params)
    spec = IndexSpec("ivfpq", built["student"].factory, params)
    no_retired = np.zeros(0, dtype=np.int64)
    searcher = FaissSearcher(built["student"].index, spec, corpus.student, no_retired)
    prefix_vectors = prefix_searcher = prefix_spec = None
    if pairing.prefix and pairing.prefix < ds:
        prefix_vectors = _normalise(corpus.student[:, :pairing.prefix])
        prefix_params = ivfpq_params(n, pairing.prefix, settings)
        progress(f"{label}: building IVF-PQ on the {pairing.prefix}-d Matryoshka prefix")
        built["prefix"] = build_and_reload(lambda: _build_ivfpq(prefix_vectors, prefix_params, settings.seed),
                                           workdir, f"{slug}-prefix", "ivfpq",
                                           f"IVF{prefix_params['nlist']},PQ{prefix_params['m']}x"
                                           f"{prefix_params['nbits']}np", prefix_params)
        prefix_spec = IndexSpec("ivfpq", built["prefix"].factory, prefix_params)
        prefix_searcher = FaissSearcher(built["prefix"].index, prefix_spec, prefix_vectors, no_retired)

    def prefix_queries(qs: np.ndarray) -> np.ndarray:
        return _normalise(qs[:, :pairing.prefix]).astype(np.float32)

    # -- methods: (queries student, queries teacher, k) -> (rows, stage seconds) --------
    def teacher_only(qs: np.ndarray, qt: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
        tick = time.perf_counter()
        _scores, rows = store.search(qt, k)
        return rows, {"search": time.perf_counter() - tick}

    def student_ann(qs: np.ndarray, qt: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
        tick = time.perf_counter()
        _scores, rows = searcher.search(qs, k)
        return rows, {"ann": time.perf_counter() - tick}

    def two_stage(k1: int, use_prefix: bool = False) -> Callable[..., tuple[np.ndarray, dict[str, float]]]:
        def search(qs: np.ndarray, qt: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
            tick = time.perf_counter()
            stage1 = prefix_searcher if use_prefix else searcher
            found = stage1.search(prefix_queries(qs) if use_prefix else qs, k1)  # type: ignore[union-attr]
            candidates = stages.merge_candidates([found], k1, len(qs))
            ann = time.perf_counter() - tick
            tick = time.perf_counter()
            top, _positions = stages.rerank(candidates, qt, store.fetch, k)
            return top.row, {"ann": ann, "rerank": time.perf_counter() - tick}
        return search

    methods: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
        "teacher only": (teacher_only, {"kind": "exact", "index": "fp16 flat (FAISS SQfp16)", "stage1": None}),
        "student ANN": (student_ann, {"kind": "student", "index": built["student"].factory, "stage1": "student"}),
    }
    for k1 in settings.k1:
        if k1 <= n:
            methods[f"two-stage k1={k1}"] = (two_stage(k1), {"kind": "two-stage", "k1": k1,
                                                              "index": built["student"].factory, "stage1": "student"})
    if prefix_searcher is not None:
        k1 = max(k for k in settings.k1 if k <= n)
        methods[f"two-stage k1={k1}, {pairing.prefix}-d prefix"] = (
            two_stage(k1, use_prefix=True),
            {"kind": "two-stage", "k1": k1, "index": built["prefix"].factory, "stage1": "prefix",
             "prefix": pairing.prefix})

    # -- quality ----------------------------------------------------------------------
    nq = min(settings.quality_queries, corpus.n_queries)
    qs_all, qt_all, truth = corpus.query_student, corpus.query_teacher, corpus.ground_truth
    progress(f"{label}: exact teacher top-10 of {nq} queries (the reference)")
    reference = exact_top_k(corpus.teacher, qt_all[:nq], TOP_K)
    quality: dict[str, dict[str, Any]] = {}
    for name, (search, _info) in methods.items():
        progress(f"{label}: quality of {name}")
        if name == "teacher only":
            # the timed scan answers one query at a time; for 300 queries the BLAS reference is the same search
            found = reference
        else:
            found = np.concatenate([search(qs_all[i:i + 32], qt_all[i:i + 32], TOP_K)[0] for i in range(0, nq, 32)])
        quality[name] = {"recall@10": recall_at_k(found, truth[:nq]), "overlap@10": overlap_at_k(found, reference),
                         "queries": nq}

    # -- latency: rounds of the same queries for every method, rotating order ------------
    timings: dict[str, list[dict[str, list[float]]]] = {name: [] for name in methods}
    names = list(methods)
    base = nq if corpus.n_queries >= nq + settings.latency_queries * settings.rounds else 0
    for name in names:  # warm-up: first searches page in the index and the vectors they touch
        methods[name][0](qs_all[base:base + 1], qt_all[base:base + 1], TOP_K)
    for r in range(settings.rounds):
        progress(f"{label}: latency round {r + 1}/{settings.rounds}")
        block = range(base + r * settings.latency_queries, base + (r + 1) * settings.latency_queries)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            search = methods[name][0]
            samples: dict[str, list[float]] = {"total": []}
            for i in block:
                i %= corpus.n_queries
                tick = time.perf_counter()
                _rows, stage_seconds = search(qs_all[i:i + 1], qt_all[i:i + 1], TOP_K)
                samples["total"].append(time.perf_counter() - tick)
                for stage, seconds in stage_seconds.items():
                    samples.setdefault(stage, []).append(seconds)
            timings[name].append(samples)

    overhead = _stage1_overhead(searcher, built["student"].index, spec, qs_all, base, settings, max(settings.k1))

    # -- memory and disk, and the full query with encoding ------------------------------
    student_bytes = float(corpus.student.nbytes)
    teacher_bytes = float(n * dt * 2)
    encode = dict(encode or {})
    rows_out = []
    teacher_only_rounds = None
    for name, (_search, info) in methods.items():
        rounds = timings[name]
        search_ms = [1000.0 * float(np.median(sample["total"])) for sample in rounds]
        stage_ms = {stage: spread([1000.0 * float(np.median(sample[stage])) for sample in rounds])
                    for stage in rounds[0] if stage != "total"}
        roles = ["teacher"] if info["kind"] == "exact" else (["student"] if info["kind"] == "student"
                                                             else ["student", "teacher"])
        encoded = [encode.get(role) for role in roles]
        full_ms = None
        if all(e is not None for e in encoded):
            count = min([len(search_ms), *(len(e["round_ms"]) for e in encoded)])  # type: ignore[index]
            full_ms = [search_ms[r] + sum(e["round_ms"][r] for e in encoded) for r in range(count)]  # type: ignore[index]
        index_key = info.get("stage1")
        index_record = None
        if index_key:
            b = built[index_key]
            index_record = {"factory": b.factory, "params": b.params, "build_s": b.build_s,
                            "bytes_on_disk": b.bytes_on_disk, "resident_mib": b.resident_mib,
                            "memory_method": b.memory_method}
        if info["kind"] == "exact":
            resident = teacher_bytes
            mapped = 0.0
            disk = teacher_bytes
        else:
            b = built[index_key]
            resident = b.resident_mib * MIB
            mapped = student_bytes + (teacher_bytes if info["kind"] == "two-stage" else 0.0)
            disk = b.bytes_on_disk + mapped
        model_rss = sum(float(e["peak_rss_bytes"]) for e in encoded if e is not None and e.get("peak_rss_bytes"))
        row = {
            "method": name, **info, "quality": quality[name],
            "search_ms": spread(search_ms), "stage_ms": stage_ms, "search_round_ms": search_ms,
            "full_query_ms": spread(full_ms) if full_ms else None, "full_query_round_ms": full_ms,
            "encoders": {role: ({k: e[k] for k in ("backend", "extrapolated", "arch")} if e is not None else None)
                         for role, e in zip(roles, encoded, strict=True)},
            "memory": {"index_or_vectors_resident_bytes": resident, "vectors_read_on_demand_bytes": mapped,
                       "models_peak_rss_bytes": model_rss if all(e is not None for e in encoded) else None,
                       "disk_bytes": disk},
            "index": index_record,
        }
        if info["kind"] == "exact":
            teacher_only_rounds = row
        rows_out.append(row)
    for row in rows_out:
        if teacher_only_rounds is None or row is teacher_only_rounds:
            continue
        row["search_speedup_vs_teacher_only"] = ratio_spread(teacher_only_rounds["search_round_ms"][:len(row["search_round_ms"])],
                                                             row["search_round_ms"][:len(teacher_only_rounds["search_round_ms"])])
        a, b = teacher_only_rounds.get("full_query_round_ms"), row.get("full_query_round_ms")
        if a and b:
            count = min(len(a), len(b))
            row["full_query_speedup_vs_teacher_only"] = ratio_spread(a[:count], b[:count])
    result = {
        "pairing": pairing.name, "student_arch": pairing.student_arch, "teacher_arch": pairing.teacher_arch,
        "student_dim": ds, "teacher_dim": dt, "corpus_size": n, "generate_s": generate_s,
        "corpus": corpus.description, "methods": rows_out, "stage1_overhead": overhead,
        "encoders": {role: ({k: v for k, v in e.items() if k != "round_ms"} if e is not None else None)
                     for role, e in encode.items()},
        "vectors": {"student_bytes": student_bytes, "teacher_bytes": teacher_bytes},
    }
    for b in built.values():
        b.index = None
    return result  # the corpus, the indexes and the teacher store are freed with this frame


def _stage1_overhead(searcher: Any, index: Any, spec: Any, queries: np.ndarray, base: int,
                     settings: SearchSettings, k1: int) -> dict[str, Any]:
    """Stage 1 through vkd (``FaissSearcher.search`` + ``merge_candidates``) against the same
    FAISS index asked directly for the same number of rows (what vkd asks it for: k1 ×
    rescore factor), per query at batch 1, in the same rounds: vkd's own cost on top of FAISS
    (exact re-scoring of the fetched rows, merging, Python)."""
    import faiss

    from vkd.retrieval import stages

    fetch = min(int(index.ntotal), k1 * int(spec.params.get("rescore_factor", 1)))
    params = faiss.SearchParametersIVF(nprobe=int(spec.params["nprobe"]))

    def direct(q: np.ndarray) -> Any:
        return index.search(q, fetch, params=params)

    def through_vkd(q: np.ndarray) -> Any:
        return stages.merge_candidates([searcher.search(q, k1)], k1, len(q))

    calls = {"faiss direct": direct, "vkd stage 1": through_vkd}
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    count = settings.latency_queries
    for name in calls:
        calls[name](queries[base:base + 1])
    for r in range(settings.rounds):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for name in order:
            samples = []
            for i in range(base + r * count, base + (r + 1) * count):
                q = queries[i % len(queries):i % len(queries) + 1]
                tick = time.perf_counter()
                calls[name](q)
                samples.append(time.perf_counter() - tick)
            per_round[name].append(1000.0 * float(np.median(samples)))
    return {
        "k1": k1, "faiss_fetch": fetch, "nprobe": int(spec.params["nprobe"]),
        "ms": {name: spread(values) for name, values in per_round.items()},
        "round_ms": per_round,
        "vkd_over_faiss": ratio_spread(per_round["vkd stage 1"], per_round["faiss direct"]),
    }


def encode_summary(arch_record: Mapping[str, Any] | None, backends: Sequence[str],
                   memory_limit: float | None) -> dict[str, Any] | None:
    """The query encoding (text at batch 1) to add to a full query: the first of ``backends``
    this arch measured, whose peak RSS fits ``memory_limit`` (bytes; None: any)."""
    if arch_record is None:
        return None
    for name in backends:
        record = next((b for b in arch_record["backends"] if b["backend"] == name and b.get("status") == "measured"),
                      None)
        if record is None:
            continue
        call = record["calls"].get("text_b1") or {}
        rounds = call.get("round_seconds")
        if not rounds:
            continue
        rss = (record.get("peak_rss_bytes") or {}).get("value")
        if memory_limit is not None and rss is not None and rss > memory_limit:
            continue
        return {"arch": arch_record["arch"], "backend": name, "extrapolated": bool(record.get("extrapolated")),
                "round_ms": [1000.0 * v for v in rounds], "ms": call.get("ms_per_item"),
                "peak_rss_bytes": rss, "model_bytes": (record.get("model_bytes") or {}).get("value")}
    return None
