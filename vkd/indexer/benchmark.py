"""Indexing throughput: the full indexer against the encoder alone, on the same images.

``measure_indexing`` answers "does decoding, writing and committing slow the encoder
down?": it times ``encode_images`` on images decoded beforehand (the encoder's ceiling),
then a full ``build_index`` into a fresh directory (scan, threaded decode, encode, Arrow +
FAISS writes, manifest commits), sampling the process's RSS, then a re-run on the unchanged
folder (the incremental no-op cost). Models are loaded once, outside every timing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vkd.bench.timing import PeakMemory
from vkd.indexer.build import build_index
from vkd.indexer.decode import Decoded, decode_file, pixel_guard
from vkd.indexer.encode import as_encoder
from vkd.indexer.scan import scan_images

if TYPE_CHECKING:
    from vkd.models.base import Encoder


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
