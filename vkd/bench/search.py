"""Search benchmark: teacher-only exact vs student exact vs student ANN vs two-stage.

For each corpus size (10k, 100k, 1M; ``--quick``: 10k) the corpus comes from
:mod:`vkd.bench.synthetic` (real encoded demo vectors first when there are any, structured
synthetic vectors for the rest; the result says so), and every method searches the same
query vectors:

* ``teacher exact`` — exact inner product over the teacher vectors: the reference;
* ``student exact`` — exact inner product over the student vectors;
* ``student ANN`` — the FAISS index ``vkd.indexer.choose_index`` picks for the corpus
  (flat / HNSW / IVF-PQ, searched with ``vkd.indexer``'s searcher, exact re-scoring included);
* ``two-stage k1=100`` / ``k1=1000`` — student ANN top-k1, then the candidates' stored
  float16 teacher vectors re-score them against the teacher query and the best 10 are kept
  (``vkd.retrieval.stages.merge_candidates`` and ``rerank``: the Retriever's own code);
* ``filtered`` — the two-stage search restricted by a filter keeping 1% of the rows
  (``vkd.retrieval.query.search_allowed``, as a filtered ``vkd search``), per size.

Quality: Recall@10 against the ground truth, overlap@10 with the teacher-only top-10.
Speed: per-query latency (p50/p95/p99) per stage and end to end at batch 1, QPS at batch 1
and 32, index bytes on disk and resident memory, build time. Query vectors are given, so
encoding is measured apart, on the real models, in the same run (``encode`` rows).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vkd.bench.report import BenchResult, Figure, markdown_table
from vkd.bench.synthetic import RealVectors, VectorCorpus, describe_model, make_corpus
from vkd.bench.timing import (
    MIB,
    PeakMemory,
    allocated_bytes,
    format_ratio,
    format_spread,
    latency_summary,
    qps_from_batches,
    ratio_spread,
    rss_bytes,
    split_rounds,
    spread,
    time_calls,
)

if TYPE_CHECKING:
    from vkd.models.base import Encoder

FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000,)
TOP_K = 10
TWO_STAGE_K1 = (100, 1000)
# extra points for the recall-latency curves (the headline k1 values are always measured)
CURVE_K1 = (20, 50, 300)
HNSW_EF_CURVE = (16, 32, 64, 256)
IVF_NPROBE_FACTORS = (0.25, 0.5, 2.0, 4.0)


@dataclass
class SearchSettings:
    sizes: Sequence[int] = FULL_SIZES
    quality_queries: int = 1000
    latency_queries: int = 200
    curve_latency_queries: int = 100
    batch: int = 32
    batches: int = 10
    warmup: int = 5
    #: latency is measured in this many interleaved rounds; figures are medians over rounds
    rounds: int = 5
    index_type: str = "auto"
    memory_budget: int | None = None
    seed: int = 0

    @classmethod
    def quick(cls) -> SearchSettings:
        return cls(sizes=QUICK_SIZES, quality_queries=300, latency_queries=100, curve_latency_queries=50,
                   batches=5, rounds=3)


# ---------------------------------------------------------------- quality math


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = TOP_K) -> float:
    """Percent of queries whose ground-truth row is among their first ``k`` results."""
    found = np.asarray(found)
    if found.ndim != 2 or len(found) != len(truth):
        raise ValueError(f"found must be [q, >=k] with one row per truth entry; got {found.shape} and {len(truth)}")
    return float(100.0 * np.mean((found[:, :k] == np.asarray(truth)[:, None]).any(axis=1)))


def overlap_at_k(found: np.ndarray, reference: np.ndarray, k: int = TOP_K) -> float:
    """Mean share (percent) of the reference top-``k`` that ``found``'s top-``k`` holds.

    Padding rows (-1) never count as shared.
    """
    found, reference = np.asarray(found)[:, :k], np.asarray(reference)[:, :k]
    if found.shape[0] != reference.shape[0]:
        raise ValueError(f"found has {found.shape[0]} queries, reference {reference.shape[0]}")
    shared = [len(set(a[a >= 0].tolist()) & set(b[b >= 0].tolist())) for a, b in zip(found, reference, strict=True)]
    return float(100.0 * np.mean(shared) / k)


# ---------------------------------------------------------------- methods


@dataclass
class Method:
    """One way of answering queries: ``search(student_q, teacher_q, k) -> (rows, stage seconds)``."""

    name: str
    family: str  # curve the point belongs to
    search: Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, dict[str, float]]]
    params: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    headline: bool = True


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def flat_method(name: str, index: Any, *, teacher_side: bool, record: dict[str, Any]) -> Method:
    """Exact search with a FAISS flat index over the teacher or the student vectors."""

    def search(qs: np.ndarray, qt: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
        (_scores, rows), seconds = _timed(lambda: index.search(qt if teacher_side else qs, k))
        return rows, {"search": seconds}

    return Method(name, name, search, index=record)


@dataclass
class BuiltIndex:
    index: Any
    build_s: float
    build_peak_delta_mib: float
    bytes_on_disk: int
    resident_mib: float
    memory_method: str
    rss_delta_mib: float
    kind: str
    factory: str
    params: dict[str, Any]


def build_and_reload(build: Callable[[], Any], workdir: Path, name: str, kind: str, factory: str,
                     params: dict[str, Any]) -> BuiltIndex:
    """Build an index (timed, peak memory sampled), write it, read it back, free the built copy.

    Searching the copy read from disk is what a server does, and the resident-memory
    increase of reading it is the index's memory as served.
    """
    import faiss

    with PeakMemory() as peak:
        index, seconds = _timed(build)
    path = workdir / f"{name}.faiss"
    faiss.write_index(index, str(path))
    # read back while the built copy is still alive, so the allocator cannot hand the
    # reader memory the builder freed; heap bytes where glibc tells them, else RSS
    heap_before, rss_before = allocated_bytes(), rss_bytes()
    loaded = faiss.read_index(str(path))
    heap_after, rss_delta = allocated_bytes(), (rss_bytes() - rss_before) / MIB
    if heap_before is not None and heap_after is not None:
        resident, how = (heap_after - heap_before) / MIB, "heap bytes allocated while loading (glibc mallinfo2)"
    else:
        resident, how = rss_delta, "resident-set increase while loading (psutil)"
    del index
    size = path.stat().st_size
    path.unlink()
    return BuiltIndex(loaded, seconds, peak.delta_bytes / MIB, size, resident, how, rss_delta, kind, factory,
                      params)


def build_methods(corpus: VectorCorpus, settings: SearchSettings, workdir: Path,
                  progress: Callable[[str], None]) -> tuple[list[Method], dict[str, BuiltIndex]]:
    import faiss

    from vkd.indexer.faiss_index import FaissSearcher, IndexSpec, build_faiss, choose_index
    from vkd.retrieval import stages

    n, ds = corpus.student.shape
    dt = corpus.teacher.shape[1]

    def teacher_flat() -> Any:
        index = faiss.IndexFlatIP(dt)
        for start in range(0, n, 65_536):  # widen float16 in chunks: no second full copy
            index.add(np.ascontiguousarray(corpus.teacher[start:start + 65_536], dtype=np.float32))
        return index

    def student_flat() -> Any:
        index = faiss.IndexFlatIP(ds)
        index.add(corpus.student)
        return index

    progress(f"{n:,}: building teacher exact (Flat, {dt}-d)")
    built = {"teacher_exact": build_and_reload(teacher_flat, workdir, "teacher", "flat", "Flat", {})}
    progress(f"{n:,}: building student exact (Flat, {ds}-d)")
    built["student_exact"] = build_and_reload(student_flat, workdir, "student", "flat", "Flat", {})
    spec = choose_index(n, ds, settings.memory_budget, settings.index_type)
    progress(f"{n:,}: building student ANN ({spec.factory}: {spec.reason})")
    built["student_ann"] = build_and_reload(lambda: build_faiss(corpus.student, spec), workdir, "ann",
                                            spec.kind, spec.factory, dict(spec.params))
    ann_index = built["student_ann"].index
    if spec.kind == "ivfpq":
        faiss.extract_index_ivf(ann_index).nprobe = int(spec.params.get("nprobe", 1))
    no_retired = np.zeros(0, dtype=np.int64)

    def searcher(params: dict[str, Any]) -> Any:
        return FaissSearcher(ann_index, IndexSpec(spec.kind, spec.factory, params), corpus.student, no_retired)

    def index_record(key: str) -> dict[str, Any]:
        b = built[key]
        return {"kind": b.kind, "factory": b.factory, "build_s": b.build_s, "bytes_on_disk": b.bytes_on_disk,
                "resident_mib": b.resident_mib, "memory_method": b.memory_method,
                "load_rss_delta_mib": b.rss_delta_mib,
                "build_peak_delta_mib": b.build_peak_delta_mib}

    methods = [
        flat_method("teacher exact", built["teacher_exact"].index, teacher_side=True,
                    record=index_record("teacher_exact")),
        flat_method("student exact", built["student_exact"].index, teacher_side=False,
                    record=index_record("student_exact")),
    ]

    def ann_method(params: dict[str, Any], headline: bool, label: str) -> Method:
        s = searcher(params)

        def search(qs: np.ndarray, qt: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
            (_scores, rows), seconds = _timed(lambda: s.search(qs, k))
            return rows, {"ann": seconds}

        return Method(label, "student ANN", search, params=_curve_params(spec.kind, params),
                      index=index_record("student_ann"), headline=headline)

    def fetch_teacher(_shard: int, rows: np.ndarray) -> np.ndarray:
        return corpus.teacher[rows].astype(np.float32)  # what Shard.teacher_vectors does

    def two_stage(k1: int, headline: bool) -> Method:
        s = searcher(dict(spec.params))

        def search(qs: np.ndarray, qt: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
            # the Retriever's own stage functions, over one shard holding the whole corpus
            candidates, ann_s = _timed(lambda: stages.merge_candidates([s.search(qs, k1)], k1, len(qs)))
            (top, _positions), rerank_s = _timed(lambda: stages.rerank(candidates, qt, fetch_teacher, k))
            return top.row, {"ann": ann_s, "rerank": rerank_s}

        record = index_record("student_ann")
        record["teacher_vectors_bytes"] = int(corpus.teacher.nbytes)
        return Method(f"two-stage k1={k1}", "two-stage", search, params={"k1": k1}, index=record,
                      headline=headline)

    methods.append(ann_method(dict(spec.params), True, "student ANN"))
    for variant in _ann_variants(spec.kind, spec.params):
        methods.append(ann_method(variant, False, f"student ANN ({_describe_params(spec.kind, variant)})"))
    for k1 in sorted(set(TWO_STAGE_K1) | set(CURVE_K1)):
        if k1 <= n:
            methods.append(two_stage(k1, k1 in TWO_STAGE_K1))
    return methods, built


def _ann_variants(kind: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    if kind == "hnsw":
        return [{**params, "efSearch": ef} for ef in HNSW_EF_CURVE if ef != params.get("efSearch")]
    if kind == "ivfpq":
        base = int(params.get("nprobe", 1))
        nlist = int(params.get("nlist", base))
        probes = sorted({max(1, min(nlist, round(base * f))) for f in IVF_NPROBE_FACTORS} - {base})
        return [{**params, "nprobe": p} for p in probes]
    return []


def _curve_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    if kind == "hnsw":
        return {"efSearch": params.get("efSearch")}
    if kind == "ivfpq":
        return {"nprobe": params.get("nprobe")}
    return {}


def _describe_params(kind: str, params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in _curve_params(kind, params).items())


# ---------------------------------------------------------------- measuring


def run_queries(method: Method, qs: np.ndarray, qt: np.ndarray, k: int, batch: int = 64) -> np.ndarray:
    parts = [method.search(qs[i:i + batch], qt[i:i + batch], k)[0] for i in range(0, len(qs), batch)]
    return np.concatenate(parts)


def measure_quality(method: Method, corpus: VectorCorpus, reference: np.ndarray,
                    settings: SearchSettings) -> dict[str, Any]:
    """Recall@10 and overlap@10 with the teacher-only top-10, on the quality queries."""
    qs, qt, truth = corpus.query_student, corpus.query_teacher, corpus.ground_truth
    n_quality = min(settings.quality_queries, len(qs))
    found = run_queries(method, qs[:n_quality], qt[:n_quality], TOP_K)
    quality: dict[str, Any] = {
        "recall@10": recall_at_k(found, truth[:n_quality]),
        "overlap@10": overlap_at_k(found, reference[:n_quality]),
        "queries": n_quality,
    }
    n_real = min(corpus.n_real_queries, n_quality)
    if n_real:
        quality["recall@10_real"] = recall_at_k(found[:n_real], truth[:n_real])
        quality["overlap@10_real"] = overlap_at_k(found[:n_real], reference[:n_real])
        quality["real_queries"] = n_real
    return quality


def measure_method_latency(methods: Sequence[Method], corpus: VectorCorpus,
                           settings: SearchSettings) -> dict[str, Any]:
    """Latency of every method in ``settings.rounds`` interleaved rounds.

    The latency queries are cut into one block per round; in round r every method (in an
    order that rotates between rounds) answers block r one query at a time, then the
    headline methods answer their share of the batches. Per method: the pooled per-query
    summary (p50/p95/p99 over all rounds, as before), each round's p50 as a spread, and the
    speed-up over the first method (teacher exact) within each round.
    """
    qs, qt = corpus.query_student, corpus.query_teacher
    rounds = max(1, settings.rounds)
    b = settings.batch
    n_batches = max(1, min(settings.batches, len(qs) // b))
    batches = [(qs[i * b:(i + 1) * b], qt[i * b:(i + 1) * b]) for i in range(n_batches)]
    per_round_batches = max(1, n_batches // rounds)
    blocks: dict[str, list[list[int]]] = {}
    for method in methods:
        n_lat = min(settings.latency_queries if method.headline else settings.curve_latency_queries, len(qs))
        blocks[method.name] = split_rounds(list(range(n_lat)), rounds)
        for i in range(min(settings.warmup, n_lat)):
            method.search(qs[i:i + 1], qt[i:i + 1], TOP_K)
        if method.headline:
            method.search(*batches[0], TOP_K)
    e2e: dict[str, list[list[float]]] = {m.name: [] for m in methods}
    stage_times: dict[str, dict[str, list[float]]] = {m.name: {} for m in methods}
    batch_times: dict[str, list[list[float]]] = {m.name: [] for m in methods if m.headline}
    cursor = 0
    for r in range(rounds):
        shift = r % len(methods)
        for method in list(methods[shift:]) + list(methods[:shift]):
            block = blocks[method.name][r] if r < len(blocks[method.name]) else []
            times = []
            for i in block:
                start = time.perf_counter()
                _, stage = method.search(qs[i:i + 1], qt[i:i + 1], TOP_K)
                times.append(time.perf_counter() - start)
                for name, seconds in stage.items():
                    stage_times[method.name].setdefault(name, []).append(seconds)
            e2e[method.name].append(times)
            if method.headline:
                calls = []
                for j in range(per_round_batches):
                    batch = batches[(cursor + j) % n_batches]
                    start = time.perf_counter()
                    method.search(*batch, TOP_K)
                    calls.append(time.perf_counter() - start)
                batch_times[method.name].append(calls)
        cursor += per_round_batches
    reference = methods[0].name
    reference_p50 = [1000.0 * float(np.median(t)) for t in e2e[reference] if t]
    out: dict[str, Any] = {}
    for method in methods:
        pooled = [t for block in e2e[method.name] for t in block]
        round_p50 = [1000.0 * float(np.median(t)) for t in e2e[method.name] if t]
        record: dict[str, Any] = {"batch1": {
            "end_to_end": latency_summary(pooled),
            "stages": {name: latency_summary(values) for name, values in stage_times[method.name].items()},
            "qps": qps_from_batches(1, pooled),
            "warmup": min(settings.warmup, len(pooled)),
            "rounds": len(round_p50),
            "p50_ms_rounds": spread(round_p50),
            "round_p50_ms": round_p50,
        }}
        if method.name != reference and len(round_p50) == len(reference_p50):
            record["batch1"]["speedup_vs_teacher_exact"] = ratio_spread(reference_p50, round_p50)
        if method.headline:
            pooled_batches = [t for calls in batch_times[method.name] for t in calls]
            record[f"batch{b}"] = {
                "per_batch": {**latency_summary(pooled_batches), "warmup": 1},
                "qps": qps_from_batches(b, pooled_batches),
                "qps_rounds": spread([qps_from_batches(b, calls) for calls in batch_times[method.name]]),
                "batch_size": b,
            }
        out[method.name] = record
    return out


def encode_real(student: Encoder, teacher: Encoder, pairs: str | os.PathLike[str], *,
                max_images: int | None = None, batch_size: int = 32) -> RealVectors:
    """Both models' vectors of a pair file's images and captions (the real part of every corpus)."""
    from vkd.bench.encoders import encode_split, load_split

    split = load_split(pairs, max_images=max_images)
    student_images, student_texts = encode_split(student, split, batch_size=batch_size)
    teacher_images, teacher_texts = encode_split(teacher, split, batch_size=batch_size)
    return RealVectors(student_images, teacher_images, student_texts, teacher_texts, split.text_to_image)


def measure_real_index(index_dir: str | os.PathLike[str], queries: Sequence[str], *, batch: int,
                       repeats: int, candidates: int = 1000, threads: int | None = None) -> dict[str, Any]:
    """The full search (encode, ANN, teacher encode, rerank) on a real index, per student
    backend: ``measure_latency``, the Retriever's own timings."""
    return measure_latency(index_dir, list(queries), batch_sizes=(1, batch), candidates=candidates,
                           repeats=repeats, device="cpu", threads=threads)


# ---------------------------------------------------------------- the full search on a real index
# ``measure_latency(index_dir, queries)`` runs the full two-stage search with the index's student
# as torch fp32, ONNX fp32 and ONNX INT8 (one shared teacher), at batch sizes 1 and 32, and
# returns p50/p95 (and the rest of ``vkd.bench.timing.latency_summary``) of each stage and of
# the whole search, measured the same way for every backend.

LATENCY_VARIANTS = ("torch-fp32", "onnx-fp32", "onnx-int8")


def _student_variant(variant: str, name: str, *, device: Any, threads: int | None) -> Any:
    """The student as ``variant``, or a string saying why it cannot be had."""
    if variant == "torch-fp32":
        from vkd.models import load_encoder

        return load_encoder(name, prefer="torch", device=device, dtype="float32")
    from vkd.export.onnx_encoder import EXPORT_MANIFEST, OnnxEncoder

    export_dir = Path(name) if (Path(name) / EXPORT_MANIFEST).is_file() else Path(name) / "onnx"
    if not (export_dir / EXPORT_MANIFEST).is_file():
        return f"no ONNX export at {export_dir}; run `vkd export {name}`"
    precision = variant.split("-", 1)[1]
    try:
        return OnnxEncoder(export_dir, precision=precision, threads=threads)
    except ValueError as error:  # e.g. exported with --int8 none
        return str(error)


def _query_batches(queries: Sequence[Any], size: int, count: int) -> list[list[Any]]:
    """``count`` batches of ``size`` queries, cycling through ``queries``."""
    flat = [queries[i % len(queries)] for i in range(size * count)]
    return [flat[i : i + size] for i in range(0, len(flat), size)]


def measure_latency(
    index_dir: str | os.PathLike[str],
    queries: Sequence[Any],
    *,
    variants: Sequence[str] = LATENCY_VARIANTS,
    batch_sizes: Sequence[int] = (1, 32),
    k: int = 10,
    candidates: int = 1000,
    rerank: bool = True,
    repeats: int | None = None,
    warmup: int = 2,
    student: str | None = None,
    teacher: Any = None,
    device: Any = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Per-stage and end-to-end latency of ``Retriever.search_batch`` for each student variant.

    ``queries``: texts (``str``) and/or images (PIL or ``Path``), cycled to fill batches.
    ``repeats``: timed calls per batch size (default: one pass over the queries, at
    least 5 calls). ``student``: the model the variants are made from (default: the
    index's); ``teacher``: an ``Encoder`` or name shared by all variants (default: the
    index's, torch). Stage times are per call, i.e. per batch; ``per_query_ms`` divides
    the end-to-end p50 by the batch size. A variant that cannot run (no export) is
    reported with ``skipped`` and the reason.
    """
    from vkd.indexer import Index
    from vkd.retrieval.results import STAGES
    from vkd.retrieval.retriever import Retriever, open_encoder

    timed = (*STAGES, "total_ms")
    if not queries:
        raise ValueError("measure_latency needs at least one query")
    unknown = [variant for variant in variants if variant not in LATENCY_VARIANTS]
    if unknown:
        raise ValueError(f"variants {unknown}: choose from {', '.join(LATENCY_VARIANTS)}")
    index = Index.open(index_dir)
    student_name = str(student or index.student["name"])
    shared_teacher = None
    if rerank and index.teacher is not None:
        shared_teacher = teacher if teacher is not None and not isinstance(teacher, str | os.PathLike) else (
            open_encoder(str(teacher or index.teacher["name"]), prefer="torch", device=device))

    report: dict[str, Any] = {
        "index": str(index.path),
        "images": len(index),
        "shards": len(index.shards),
        "k": k,
        "candidates": candidates,
        "queries": len(queries),
        "student": student_name,
        "teacher": shared_teacher.describe() if shared_teacher is not None else None,
        "threads": threads,
        "variants": {},
    }
    for variant in variants:
        encoder = _student_variant(variant, student_name, device=device, threads=threads)
        if isinstance(encoder, str):
            report["variants"][variant] = {"skipped": encoder}
            continue
        retriever = Retriever(index.path, student=encoder, teacher=shared_teacher, candidates=candidates,
                              rerank=rerank, prefer="torch")
        by_batch: dict[str, Any] = {}
        for size in batch_sizes:
            count = repeats or max(5, -(-len(queries) // size))
            for batch in _query_batches(queries, size, warmup):
                retriever.search_batch(batch, k)
            samples: dict[str, list[float]] = {stage: [] for stage in timed}
            reranked = None
            for batch in _query_batches(queries, size, count):
                result = retriever.search_batch(batch, k)[0]
                reranked = result.reranked
                for stage in timed:
                    samples[stage].append(getattr(result.timings, stage) / 1000.0)
            stats = {stage: latency_summary(values) for stage, values in samples.items()}
            by_batch[str(size)] = {
                "batch_size": size,
                "calls": count,
                "reranked": reranked,
                **stats,
                "per_query_ms": stats["total_ms"]["p50_ms"] / size,
            }
        report["variants"][variant] = {"encoder": encoder.describe(), "batches": by_batch}
    return report


def _text_calls(encoder: Encoder, texts: list[str], batch: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Two calls for timing: encode the next text alone, and the next ``batch`` texts (cycling)."""
    cursor = [0]

    def take(count: int) -> list[str]:
        chunk = [texts[(cursor[0] + i) % len(texts)] for i in range(count)]
        cursor[0] += count
        return chunk

    return (lambda: encoder.encode_text(take(1), batch_size=1),
            lambda: encoder.encode_text(take(batch), batch_size=batch))


def measure_encoders(encoders: dict[str, Encoder], texts: Sequence[str], *, batch: int = 32,
                     repeats: int = 20, warmup: int = 3) -> list[dict[str, Any]]:
    """Query (text) encoding latency of the real models at batch 1 and ``batch``."""
    rows = []
    texts = list(texts)
    if not texts:
        return rows
    for role, encoder in encoders.items():
        single, batched = _text_calls(encoder, texts, batch)
        one = time_calls(single, repeats=repeats, warmup=warmup)
        many = time_calls(batched, repeats=max(3, repeats // 4), warmup=1)
        rows.append({
            "model": role,
            "name": getattr(encoder, "name", role),
            "dim": int(encoder.dim),
            "batch1": one.summary(),
            "batch1_qps": qps_from_batches(1, one.seconds),
            f"batch{batch}": many.summary(),
            f"batch{batch}_qps": qps_from_batches(batch, many.seconds),
        })
    return rows


def measure_size(n: int, settings: SearchSettings, real: RealVectors | None, workdir: Path,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    progress(f"{n:,}: generating corpus")
    start = time.perf_counter()
    n_queries = max(settings.quality_queries, settings.latency_queries, settings.batch * settings.batches)
    corpus = make_corpus(n, n_queries, real=real, seed=settings.seed)
    generate_s = time.perf_counter() - start
    methods, built = build_methods(corpus, settings, workdir, progress)
    reference_method = methods[0]
    n_quality = min(settings.quality_queries, corpus.n_queries)
    reference = run_queries(reference_method, corpus.query_student[:n_quality],
                            corpus.query_teacher[:n_quality], TOP_K)
    records = []
    for method in methods:
        progress(f"{n:,}: quality of {method.name}")
        records.append({"method": method.name, "family": method.family, "params": method.params,
                        "quality": measure_quality(method, corpus, reference, settings), "index": method.index})
    progress(f"{n:,}: latency, {settings.rounds} interleaved rounds over {len(methods)} methods")
    latency = measure_method_latency(methods, corpus, settings)
    for record in records:
        record.update(latency[record["method"]])
    progress(f"{n:,}: measuring a {FILTER_SELECTIVITY:.0%}-selective filter")
    filtered = measure_filtered(corpus, built["student_ann"], settings)
    for b in built.values():
        b.index = None
    return {
        "corpus_size": n,
        "generate_s": generate_s,
        "corpus": corpus.description,
        "student_vectors_bytes": int(corpus.student.nbytes),
        "teacher_vectors_bytes": int(corpus.teacher.nbytes),
        "methods": records,
        "filtered": filtered,
    }


FILTER_SELECTIVITY = 0.01


class _VectorShard:
    """The part of ``vkd.indexer.Shard`` that ``vkd.retrieval.query.search_allowed`` reads,
    over the benchmark's in-memory corpus: the filtered search measured is the Retriever's."""

    def __init__(self, built: BuiltIndex, vectors: np.ndarray) -> None:
        from vkd.indexer.faiss_index import FaissSearcher, IndexSpec

        self.spec = IndexSpec(built.kind, built.factory, dict(built.params))
        self.rows = len(vectors)
        self._vectors = vectors
        self.searcher = FaissSearcher(built.index, self.spec, vectors, np.zeros(0, dtype=np.int64))

    def student_vectors(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._vectors[rows], dtype=np.float32)


def measure_filtered(corpus: VectorCorpus, ann: BuiltIndex, settings: SearchSettings,
                     k1: int = max(TWO_STAGE_K1)) -> dict[str, Any]:
    """Two-stage search restricted by a filter that keeps ``FILTER_SELECTIVITY`` of the rows.

    The filter is a range over a synthetic int64 column (a permutation, as an mtime range
    would be) evaluated with pyarrow.compute, as ``Filters.allowed_rows`` does on a shard;
    stage 1 is ``search_allowed`` (at 1% it scans the allowed rows exactly), then the
    teacher rerank. Quality: overlap@10 with the teacher's exact top-10 among the allowed rows.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from vkd.retrieval import stages
    from vkd.retrieval.query import FLAT_FRACTION, search_allowed

    n = len(corpus.student)
    column = pa.array(np.random.default_rng(settings.seed + 1).permutation(n).astype(np.int64))
    bound = max(1, int(n * FILTER_SELECTIVITY))
    shard = _VectorShard(ann, corpus.student)

    def fetch_teacher(_shard: int, rows: np.ndarray) -> np.ndarray:
        return corpus.teacher[rows].astype(np.float32)

    def search(qs: np.ndarray, qt: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        allowed, filter_s = _timed(lambda: np.asarray(pc.indices_nonzero(pc.less(column, bound)).to_numpy(),
                                                      dtype=np.int64))
        width = min(k1, len(allowed))
        candidates, ann_s = _timed(lambda: stages.merge_candidates([search_allowed(shard, qs, width, allowed)],
                                                                   width, len(qs)))
        (top, _), rerank_s = _timed(lambda: stages.rerank(candidates, qt, fetch_teacher, TOP_K))
        return top.row, {"filter": filter_s, "ann": ann_s, "rerank": rerank_s}

    qs, qt = corpus.query_student, corpus.query_teacher
    allowed = np.flatnonzero(column.to_numpy() < bound)
    n_quality = min(settings.quality_queries, len(qs), 200)
    found = np.concatenate([search(qs[i:min(i + 32, n_quality)], qt[i:min(i + 32, n_quality)])[0]
                            for i in range(0, n_quality, 32)])
    teacher_allowed = corpus.teacher[allowed].astype(np.float32)
    reference = allowed[np.argsort(-(qt[:n_quality] @ teacher_allowed.T), axis=1, kind="stable")[:, :TOP_K]]
    n_lat = min(settings.latency_queries, len(qs))
    for i in range(min(settings.warmup, n_lat)):
        search(qs[i:i + 1], qt[i:i + 1])
    e2e, stage_times = [], {}
    for i in range(n_lat):
        start = time.perf_counter()
        _, stage = search(qs[i:i + 1], qt[i:i + 1])
        e2e.append(time.perf_counter() - start)
        for name, seconds in stage.items():
            stage_times.setdefault(name, []).append(seconds)
    return {
        "selectivity": FILTER_SELECTIVITY,
        "allowed_rows": int(len(allowed)),
        "k1": k1,
        "stage1": "flat scan of the allowed rows" if (ann.kind == "flat" or len(allowed) <= FLAT_FRACTION * n)
                  else "FAISS + IDSelectorBatch",
        "overlap@10": overlap_at_k(found, reference),
        "queries": int(n_quality),
        "batch1": {"end_to_end": latency_summary(e2e),
                   "stages": {name: latency_summary(values) for name, values in stage_times.items()}},
    }


# ---------------------------------------------------------------- report


def headline_rows(size_records: Sequence[dict[str, Any]], batch: int) -> list[list[Any]]:
    rows = []
    for size in size_records:
        for m in size["methods"]:
            if m["family"] in ("student ANN", "two-stage") and f"batch{batch}" not in m:
                continue  # curve-only points
            b1 = m["batch1"]
            stages = b1["stages"]
            rows.append([
                f"{size['corpus_size']:,}", m["method"], m["index"]["factory"],
                m["quality"]["recall@10"], m["quality"]["overlap@10"],
                format_spread(b1.get("p50_ms_rounds")) or b1["end_to_end"]["p50_ms"],
                format_ratio(b1.get("speedup_vs_teacher_exact")) if "speedup_vs_teacher_exact" in b1 else "1",
                b1["end_to_end"]["p95_ms"], b1["end_to_end"]["p99_ms"],
                stages["ann"]["p50_ms"] if "ann" in stages else None,
                stages["rerank"]["p50_ms"] if "rerank" in stages else None,
                b1["qps"], m[f"batch{batch}"]["qps"],
                m["index"]["bytes_on_disk"] / MIB, m["index"]["resident_mib"], m["index"]["build_s"],
            ])
    return rows


def markdown(results: dict[str, Any]) -> str:
    batch = results["settings"]["batch"]
    parts = [
        "Search over vectors (query encoding measured separately, below). Recall@10 against the ground "
        "truth; overlap@10 = share of the teacher-only exact top-10 found. Latency per query at batch 1 "
        f"(end to end, and its ANN / rerank stages, p50); QPS at batch 1 and {batch}. Latency is measured in "
        f"{results['settings'].get('rounds', 1)} interleaved rounds: p50 ms is the median of the rounds' p50 "
        "(min–max over rounds), × teacher exact the speed-up over teacher exact within each round (median, "
        "min–max; 'within spread' when the range includes 1); p95/p99 pool every round's queries.",
        "",
        markdown_table(
            ["corpus", "method", "index", "R@10 %", "overlap@10 %", "p50 ms", "× teacher exact", "p95 ms",
             "p99 ms", "ANN p50 ms", "rerank p50 ms", "QPS b1", f"QPS b{batch}", "disk MiB", "RAM MiB", "build s"],
            headline_rows(results["sizes"], batch), align=["l", "l", "l"] + ["r"] * 13,
        ),
    ]
    real_rows = [[f"{s['corpus_size']:,}", m["method"], m["quality"]["recall@10_real"],
                  m["quality"]["overlap@10_real"], m["quality"]["real_queries"]]
                 for s in results["sizes"] for m in s["methods"]
                 if "recall@10_real" in m["quality"] and f"batch{batch}" in m]
    if real_rows:
        parts += ["", "Real encoded demo captions only (a subset of the queries above):", "",
                  markdown_table(["corpus", "method", "R@10 %", "overlap@10 %", "queries"], real_rows)]
    filtered_rows = [[f"{size['corpus_size']:,}", f"{f['selectivity']:.0%} ({f['allowed_rows']:,} rows)",
                      f["stage1"], f["overlap@10"], f["batch1"]["end_to_end"]["p50_ms"],
                      f["batch1"]["end_to_end"]["p95_ms"], f["batch1"]["stages"]["filter"]["p50_ms"],
                      f["batch1"]["stages"]["ann"]["p50_ms"], f["batch1"]["stages"]["rerank"]["p50_ms"]]
                     for size in results["sizes"] if (f := size.get("filtered"))]
    if filtered_rows:
        parts += ["", "Filtered two-stage search (a range filter on an int64 column keeping the share of rows "
                      "shown; overlap@10 with the teacher's exact top-10 among those rows), batch 1:", "",
                  markdown_table(["corpus", "kept", "stage 1", "overlap@10 %", "p50 ms", "p95 ms",
                                  "filter p50 ms", "stage 1 p50 ms", "rerank p50 ms"], filtered_rows)]
    if results.get("real_index"):
        parts += ["", real_index_markdown(results["real_index"])]
    if results.get("encode"):
        enc_rows = [[e["model"], e["dim"], e["batch1"]["p50_ms"], e["batch1"]["p95_ms"],
                     e[f"batch{batch}"]["p50_ms"], e[f"batch{batch}_qps"]] for e in results["encode"]]
        parts += ["", "Query encoding on the real models (text → vector), measured in the same run:", "",
                  markdown_table(["model", "dim", "b1 p50 ms", "b1 p95 ms", f"b{batch} p50 ms/batch",
                                  f"texts/s at b{batch}"], enc_rows)]
    return "\n".join(parts)


def real_index_markdown(real: dict[str, Any]) -> str:
    rows = []
    for variant, data in real["variants"].items():
        if "skipped" in data:
            rows.append([variant, "-", None, None, None, None, None, None, None])
            continue
        for size, stats in data["batches"].items():
            rows.append([variant, size, stats["student_encode_ms"]["p50_ms"], stats["ann_ms"]["p50_ms"],
                         stats["teacher_encode_ms"]["p50_ms"], stats["rerank_ms"]["p50_ms"],
                         stats["total_ms"]["p50_ms"], stats["total_ms"]["p95_ms"], stats["per_query_ms"]])
    skipped = [f"{v}: {d['skipped']}" for v, d in real["variants"].items() if "skipped" in d]
    text = [
        f"Full two-stage search on the real index ({real['images']} images, {real['shards']} shard(s), "
        f"top-{real['candidates']} candidates, rerank to {real['k']}), queries = real captions, per student "
        "backend (the teacher is torch fp32). Per call (a batch), p50 ms of each stage:",
        "",
        markdown_table(["student", "batch", "encode", "ANN", "teacher encode", "rerank", "total p50",
                        "total p95", "per query"], rows, align=["l", "r"] + ["r"] * 7),
    ]
    if skipped:
        text += ["", "Not measured: " + "; ".join(skipped)]
    return "\n".join(text)


def curve_figure(results: dict[str, Any]) -> Figure:
    """Quality against p50 latency (batch 1), one panel per corpus size: Recall@10 on top,
    overlap@10 with the teacher below; a line per method, its points in parameter order."""
    sizes = results["sizes"]
    metrics = (("recall@10", "Recall@10 (%)"), ("overlap@10", "overlap@10 with teacher top-10 (%)"))

    def draw(fig: Any) -> None:
        axes = fig.subplots(len(metrics), len(sizes), squeeze=False)
        for column, size in enumerate(sizes):
            families: dict[str, list[tuple[float, float, float, str]]] = {}
            for m in size["methods"]:
                for row, (key, _label) in enumerate(metrics):
                    value = next(iter(m["params"].values()), 0)
                    families.setdefault(f"{row}:{m['family']}", []).append(
                        (float(value or 0), m["batch1"]["end_to_end"]["p50_ms"], m["quality"][key],
                         str(value) if m["params"] else ""))
            for row, (_key, label) in enumerate(metrics):
                ax = axes[row][column]
                for name, points in families.items():
                    if not name.startswith(f"{row}:"):
                        continue
                    points.sort()
                    ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=name.split(":", 1)[1])
                    for _, x, y, text in points:
                        if text:
                            ax.annotate(text, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
                ax.set_xscale("log")
                ax.set_xlabel("p50 latency per query, batch 1 (ms)")
                ax.set_ylabel(label)
                ax.set_title(f"{size['corpus_size']:,} vectors")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7, loc="best")

    return Figure("search_recall_latency.png", draw, size=(5.0 * len(sizes), 8.0))


def run_search_benchmark(
    settings: SearchSettings,
    *,
    real: RealVectors | None = None,
    encoders: dict[str, Encoder] | None = None,
    encode_texts: Sequence[str] = (),
    index_dir: str | os.PathLike[str] | None = None,
    index_repeats: int = 50,
    progress: Callable[[str], None] = lambda message: None,
    workdir: str | os.PathLike[str] | None = None,
) -> BenchResult:
    """Measure every method at every size in ``settings``.

    ``real`` vectors join each corpus; ``encoders`` (e.g. {"student": ..., "teacher": ...})
    are timed encoding ``encode_texts``; with ``index_dir`` (an index of real images with
    teacher vectors) the full search is also timed there, stage by stage, on ``encode_texts``.
    """
    from vkd.bench.report import ort_threads

    with tempfile.TemporaryDirectory(prefix="vkd-bench-search-", dir=workdir) as tmp:
        sizes = [measure_size(n, settings, real, Path(tmp), progress) for n in settings.sizes]
    encode = []
    if encoders:
        progress("measuring query encoding on the real models")
        encode = measure_encoders(encoders, encode_texts, batch=settings.batch)
    real_index = None
    if index_dir is not None and encode_texts:
        progress(f"measuring the full search on the real index {index_dir}")
        real_index = measure_real_index(index_dir, encode_texts, batch=settings.batch, repeats=index_repeats,
                                        threads=ort_threads())
    vectors = describe_model(real is not None)
    results = {
        "vectors": vectors,
        "synthetic": True,
        "real_vectors": real is not None,
        "settings": {
            "sizes": list(settings.sizes), "quality_queries": settings.quality_queries,
            "latency_queries": settings.latency_queries, "curve_latency_queries": settings.curve_latency_queries,
            "batch": settings.batch, "batches": settings.batches, "warmup": settings.warmup,
            "rounds": settings.rounds, "index_type": settings.index_type, "memory_budget": settings.memory_budget, "top_k": TOP_K,
            "two_stage_k1": list(TWO_STAGE_K1), "seed": settings.seed,
        },
        "sizes": sizes,
        "encode": encode,
        "real_index": real_index,
    }
    notes = [
        vectors,
        "Query vectors are given to the search; query encoding costs are measured separately on the "
        "real models in the same run (table 'Query encoding'). A full query costs the student encode, "
        "plus the teacher encode for two-stage, plus the search time.",
        "Vectors are held in RAM as numpy arrays (teacher vectors as float16, as the index stores them); "
        "an index's memory ('RAM MiB') is measured while reading its written FAISS file back (heap "
        "bytes allocated, or the resident-set increase where the C library cannot tell).",
    ]
    if not encoders:
        notes.append("No real models were given, so query encoding was not measured.")
    return BenchResult("search", results, markdown(results), notes=notes, figures=[curve_figure(results)])
