"""Search latency per stage for several student backends, measured the same way.

``measure_latency(index_dir, queries)`` runs the full two-stage search with the index's
student as torch fp32, ONNX fp32 and ONNX INT8 (one shared teacher), at batch sizes 1 and
32, and returns p50/p95 (and the rest of ``vkd.bench.timing.latency_summary``) of each
stage and of the whole search. The benchmark scripts turn the dict into tables and plots.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vkd.retrieval.results import STAGES

VARIANTS = ("torch-fp32", "onnx-fp32", "onnx-int8")
TIMED = (*STAGES, "total_ms")


def _student_for(variant: str, name: str, *, device: Any, threads: int | None) -> Any:
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


def _batches(queries: Sequence[Any], size: int, count: int) -> list[list[Any]]:
    """``count`` batches of ``size`` queries, cycling through ``queries``."""
    flat = [queries[i % len(queries)] for i in range(size * count)]
    return [flat[i : i + size] for i in range(0, len(flat), size)]


def measure_latency(
    index_dir: str | os.PathLike[str],
    queries: Sequence[Any],
    *,
    variants: Sequence[str] = VARIANTS,
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
    from vkd.bench.timing import latency_summary
    from vkd.indexer import Index
    from vkd.retrieval.retriever import Retriever, open_encoder

    if not queries:
        raise ValueError("measure_latency needs at least one query")
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown:
        raise ValueError(f"variants {unknown}: choose from {', '.join(VARIANTS)}")
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
        encoder = _student_for(variant, student_name, device=device, threads=threads)
        if isinstance(encoder, str):
            report["variants"][variant] = {"skipped": encoder}
            continue
        retriever = Retriever(index.path, student=encoder, teacher=shared_teacher, candidates=candidates,
                              rerank=rerank, prefer="torch")
        by_batch: dict[str, Any] = {}
        for size in batch_sizes:
            count = repeats or max(5, -(-len(queries) // size))
            for batch in _batches(queries, size, warmup):
                retriever.search_batch(batch, k)
            samples: dict[str, list[float]] = {stage: [] for stage in TIMED}
            reranked = None
            for batch in _batches(queries, size, count):
                result = retriever.search_batch(batch, k)[0]
                reranked = result.reranked
                for stage in TIMED:
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
