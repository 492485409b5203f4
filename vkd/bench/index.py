"""Index benchmark: how fast ``vkd index`` turns an image folder into an index.

One code path: ``measure_indexing`` answers "does decoding, writing and committing slow
the encoder down?". It times the encoder alone on images decoded beforehand (the ceiling),
then the full indexer on the same folder into a fresh directory (scan, threaded decode,
encode, Arrow + FAISS writes, manifest commits) while sampling the process's peak RSS, then
a re-run on the unchanged folder (the incremental no-op cost). Models are loaded once,
outside every timing. ``run_index_benchmark`` runs it and writes the table.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vkd.bench.report import BenchResult, markdown_table
from vkd.bench.timing import MIB, PeakMemory, format_ratio, format_spread, ratio_spread, spread

if TYPE_CHECKING:
    from vkd.models.base import Encoder


@dataclass
class IndexSettings:
    batch_size: int = 32
    workers: int | None = None
    encoder_sample: int = 512
    #: whole measurements (encoder alone, build, re-run); figures are medians over them
    repeats: int = 3

    @classmethod
    def quick(cls) -> IndexSettings:
        return cls(encoder_sample=128, repeats=2)


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
    from vkd.models import load_encoder

    settings = settings or IndexSettings()
    images_dir = Path(images_dir)
    progress(f"index: loading models, then indexing {images_dir}")
    # loaded here, outside every timing, on the CPU in float32 like the other benchmarks
    student_encoder = load_encoder(str(student), device="cpu", dtype="float32", batch_size=settings.batch_size)
    teacher_encoder = (load_encoder(str(teacher), device="cpu", dtype="float32", batch_size=settings.batch_size)
                       if teacher is not None else None)
    # each repetition times the encoder alone, then the full build, then the re-run: the
    # indexer / encoder ratio of a repetition compares measurements seconds apart
    runs = []
    for repetition in range(settings.repeats):
        progress(f"index: repetition {repetition + 1}/{settings.repeats}")
        runs.append(measure_indexing(
            images_dir, student_encoder, teacher=teacher_encoder, batch_size=settings.batch_size,
            workers=settings.workers, encoder_sample=settings.encoder_sample,
            out_dir=Path(workdir) / "index-bench.vkd",
        ))
    spreads = {key: spread([run[key] for run in runs]) for key in
               ("encoder_images_per_s", "indexer_images_per_s", "indexer_seconds", "incremental_rerun_seconds",
                "encoder_busy_fraction") if all(run[key] is not None for run in runs)}
    ratio = (ratio_spread([run["indexer_images_per_s"] for run in runs], [run["encoder_images_per_s"] for run in runs])
             if all(run["encoder_images_per_s"] for run in runs) else None)
    # the headline numbers are the medians over repetitions; the first run gives the rest
    results = {**runs[0], **{key: value["median"] for key, value in spreads.items()},
               "indexer_vs_encoder": ratio["median"] if ratio else None,
               "spread": {**spreads, "indexer_vs_encoder": ratio},
               "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
               "peak_rss_increase_bytes": max(run["peak_rss_increase_bytes"] for run in runs),
               "repetitions": {"runs": settings.repeats, "full_build": settings.repeats,
                               "incremental_rerun": settings.repeats, "encoder_alone": settings.repeats,
                               "encoder_warmup_batches": 1}}
    notes = []
    if teacher is None:
        notes.append("No teacher was given: the index stores student vectors only.")
    return BenchResult("index", results, markdown(results), notes=notes)


def markdown(results: dict[str, Any]) -> str:
    encoders = results["student"]["name"] + (f" + teacher {results['teacher']['name']}" if results["teacher"] else "")
    spreads = results.get("spread") or {}

    def figure(key: str) -> Any:
        # the median over repetitions with its min–max, where the run repeated it
        return format_spread(spreads.get(key)) or results[key]

    rows = [
        ["images indexed", results["indexed"]],
        ["encoder alone (images/s)", figure("encoder_images_per_s")],
        ["indexer end to end (images/s)", figure("indexer_images_per_s")],
        ["indexer / encoder", format_ratio(spreads.get("indexer_vs_encoder")) or results["indexer_vs_encoder"]],
        ["encoder busy share of the build", figure("encoder_busy_fraction")],
        ["full build (s)", figure("indexer_seconds")],
        ["peak RSS (MiB)", results["peak_rss_bytes"] / MIB],
        ["peak RSS increase during the build (MiB)", results["peak_rss_increase_bytes"] / MIB],
        ["re-run on the unchanged folder (s)", figure("incremental_rerun_seconds")],
        ["images re-encoded by the re-run", results["incremental_rerun_added"]],
        ["index on disk (MiB)", results["index_bytes"] / MIB],
    ]
    runs = (results.get("repetitions") or {}).get("runs", 1)
    return "\n".join([
        f"`vkd index` on {results['files']} files of {results['images_dir']} with {encoders} "
        f"(batch {results['batch_size']}, {results['workers']} decode threads, {results['shards']} shard(s)). "
        f"Encoder alone: the same models on {results['encoder_sample']} images decoded beforehand. {runs} "
        "repetitions (encoder alone, build, re-run each): median (min–max); indexer / encoder is the ratio within "
        "each repetition; peak RSS is the largest.",
        "",
        markdown_table(["measure", "value"], rows, align=["l", "r"]),
    ])


# ---------------------------------------------------------------- the measurement


def measure_indexing(
    images_dir: str | os.PathLike[str],
    model: str | Encoder,
    *,
    teacher: str | Encoder | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    shard_size: int = 50_000,
    index_type: str = "auto",
    device: Any = None,
    encoder_sample: int = 512,
    out_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Images/s of the full indexer vs the encoder alone, peak RSS, and the no-op re-run time.

    ``encoder_sample`` caps how many pre-decoded images the encoder-alone timing holds in
    memory. The index is written to ``out_dir`` (rebuilt) or to a temporary directory that
    is removed afterwards.
    """
    from vkd.indexer.build import build_index
    from vkd.indexer.decode import Decoded, decode_file, pixel_guard
    from vkd.indexer.encode import as_encoder
    from vkd.indexer.scan import scan_images

    student = as_encoder(model, device=device, batch_size=batch_size)
    teacher_encoder = as_encoder(teacher, device=device, batch_size=batch_size) if teacher is not None else None
    entries, _ = scan_images(images_dir)
    with pixel_guard():
        decoded = [d for e in entries[:encoder_sample] if isinstance(d := decode_file(e), Decoded)]
    images = [d.image for d in decoded]
    encoders = [student] + ([teacher_encoder] if teacher_encoder is not None else [])
    encoder_ips = 0.0
    if images:
        for encoder in encoders:  # warm-up: first calls pay for allocator and kernel set-up
            encoder.encode_images(images[:batch_size], batch_size=batch_size)
        tick = time.perf_counter()
        for encoder in encoders:
            encoder.encode_images(images, batch_size=batch_size)
        encoder_ips = len(images) / (time.perf_counter() - tick)
    del images, decoded

    target = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="vkd-bench-index-"))
    try:
        options = {"student": student, "teacher": teacher_encoder, "batch_size": batch_size, "workers": workers,
                   "shard_size": shard_size, "index_type": index_type}
        with PeakMemory(interval=0.02) as rss:
            full = build_index(images_dir, target, rebuild=True, **options)
        tick = time.perf_counter()
        rerun = build_index(images_dir, target, **options)
        rerun_s = time.perf_counter() - tick
        index_bytes = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    finally:
        if out_dir is None:
            shutil.rmtree(target, ignore_errors=True)
    return {
        "images_dir": str(Path(images_dir).resolve()),
        "files": full.scanned,
        "indexed": full.added,
        "skipped": full.skipped,
        "shards": full.shards_written,
        "student": student.describe(),
        "teacher": teacher_encoder.describe() if teacher_encoder is not None else None,
        "batch_size": batch_size,
        "workers": workers or min(8, os.cpu_count() or 1),
        "encoder_images_per_s": encoder_ips,
        "encoder_sample": min(encoder_sample, len(entries)),
        "indexer_images_per_s": full.images_per_s,
        "indexer_vs_encoder": full.images_per_s / encoder_ips if encoder_ips else None,
        "indexer_seconds": full.seconds,
        "encode_seconds": full.encode_seconds,
        "encoder_busy_fraction": full.encode_seconds / full.seconds if full.seconds else None,
        "encoder_starved_seconds": full.starved_seconds,
        "peak_rss_bytes": rss.peak_bytes,
        "peak_rss_increase_bytes": rss.delta_bytes,
        "incremental_rerun_seconds": rerun_s,
        "incremental_rerun_added": rerun.added,
        "index_bytes": index_bytes,
    }
