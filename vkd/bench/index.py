"""Index benchmark: how fast ``vkd index`` turns an image folder into an index.

One code path: ``vkd.indexer.benchmark.measure_indexing`` times the encoder alone on
images decoded beforehand (the ceiling), the full indexer on the same folder into a fresh
directory (scan, threaded decode, encode, Arrow + FAISS writes, manifest commits) while
sampling the process's peak RSS, and a re-run on the unchanged folder. This module runs it
and writes the table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vkd.bench.report import BenchResult, markdown_table
from vkd.bench.timing import MIB


@dataclass
class IndexSettings:
    batch_size: int = 32
    workers: int | None = None
    encoder_sample: int = 512

    @classmethod
    def quick(cls) -> IndexSettings:
        return cls(encoder_sample=128)


def count_images(folder: Path) -> int:
    from vkd.indexer.scan import scan_images

    entries, _skipped = scan_images(folder)
    return len(entries)


def run_index_benchmark(
    images_dir: str | os.PathLike[str],
    student: str | os.PathLike[str],
    *,
    workdir: str | os.PathLike[str],
    teacher: str | os.PathLike[str] | None = None,
    settings: IndexSettings | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchResult:
    """Index ``images_dir`` with ``student`` (and ``teacher``, whose vectors are stored too)."""
    from vkd.indexer.benchmark import measure_indexing
    from vkd.models import load_encoder

    settings = settings or IndexSettings()
    images_dir = Path(images_dir)
    progress(f"index: loading models, then indexing {images_dir}")
    # loaded here, outside every timing, on the CPU in float32 like the other benchmarks
    student_encoder = load_encoder(str(student), device="cpu", dtype="float32", batch_size=settings.batch_size)
    teacher_encoder = (load_encoder(str(teacher), device="cpu", dtype="float32", batch_size=settings.batch_size)
                       if teacher is not None else None)
    measured = measure_indexing(
        images_dir, student_encoder, teacher=teacher_encoder, batch_size=settings.batch_size,
        workers=settings.workers, encoder_sample=settings.encoder_sample,
        out_dir=Path(workdir) / "index-bench.vkd",
    )
    results = {**measured, "repetitions": {"full_build": 1, "incremental_rerun": 1,
                                           "encoder_alone": 1, "encoder_warmup_batches": 1}}
    notes = []
    if teacher is None:
        notes.append("No teacher was given: the index stores student vectors only.")
    return BenchResult("index", results, markdown(results), notes=notes)


def markdown(results: dict[str, Any]) -> str:
    encoders = results["student"]["name"] + (f" + teacher {results['teacher']['name']}" if results["teacher"] else "")
    rows = [
        ["images indexed", results["indexed"]],
        ["encoder alone (images/s)", results["encoder_images_per_s"]],
        ["indexer end to end (images/s)", results["indexer_images_per_s"]],
        ["indexer / encoder", results["indexer_vs_encoder"]],
        ["encoder busy share of the build", results["encoder_busy_fraction"]],
        ["full build (s)", results["indexer_seconds"]],
        ["peak RSS (MiB)", results["peak_rss_bytes"] / MIB],
        ["peak RSS increase during the build (MiB)", results["peak_rss_increase_bytes"] / MIB],
        ["re-run on the unchanged folder (s)", results["incremental_rerun_seconds"]],
        ["images re-encoded by the re-run", results["incremental_rerun_added"]],
        ["index on disk (MiB)", results["index_bytes"] / MIB],
    ]
    return "\n".join([
        f"`vkd index` on {results['files']} files of {results['images_dir']} with {encoders} "
        f"(batch {results['batch_size']}, {results['workers']} decode threads, {results['shards']} shard(s)). "
        f"Encoder alone: the same models on {results['encoder_sample']} images decoded beforehand.",
        "",
        markdown_table(["measure", "value"], rows, align=["l", "r"]),
    ])
