"""Measuring time and memory: repeated timed calls, percentiles, throughput, peak RSS.

Every figure a benchmark reports comes out of these functions, so warm-up, repetition
counts and units are the same everywhere: times are taken with ``time.perf_counter``,
reported in milliseconds, and every summary carries the number of timed repetitions.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 95, 99)
MIB = 1024.0 * 1024.0


def latency_summary(seconds: Sequence[float]) -> dict[str, float | int]:
    """p50/p95/p99/mean/min/max in milliseconds of per-call times given in seconds, plus ``n``.

    Percentiles use linear interpolation between order statistics (numpy's default), so
    p99 of fewer than 100 samples lies between the two largest, never beyond the maximum.
    """
    values = np.asarray(list(seconds), dtype=np.float64)
    if values.size == 0:
        raise ValueError("latency_summary needs at least one timed call, got none")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"times must be finite and non-negative seconds, got min {values.min()!r}")
    ms = values * 1000.0
    summary: dict[str, float | int] = {f"p{q}_ms": float(np.percentile(ms, q)) for q in PERCENTILES}
    summary.update(mean_ms=float(ms.mean()), min_ms=float(ms.min()), max_ms=float(ms.max()), n=int(values.size))
    return summary


def throughput(items: int, seconds: float) -> float:
    """Items per second; ``seconds`` must be positive (a zero would mean the clock failed)."""
    if items < 0:
        raise ValueError(f"items={items}: a count of processed items cannot be negative")
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds={seconds!r}: throughput needs a positive, finite elapsed time")
    return items / seconds


def qps_from_batches(batch_size: int, batch_seconds: Sequence[float]) -> float:
    """Queries per second over timed batches: all queries answered / all time spent."""
    total = float(np.sum(np.asarray(list(batch_seconds), dtype=np.float64)))
    return throughput(batch_size * len(batch_seconds), total)


@dataclass
class Timing:
    """Per-call wall times (seconds) of ``repeats`` calls after ``warmup`` untimed ones."""

    seconds: list[float]
    warmup: int
    result: Any = None

    @property
    def repeats(self) -> int:
        return len(self.seconds)

    @property
    def total_s(self) -> float:
        return float(sum(self.seconds))

    def summary(self) -> dict[str, Any]:
        return {**latency_summary(self.seconds), "warmup": self.warmup}


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
               min_seconds: float = 0.0, max_repeats: int | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then at least ``repeats`` times timed.

    With ``min_seconds`` the timed loop goes on past ``repeats`` until that much time has
    been spent (capped by ``max_repeats``), so very fast calls get enough samples for a p99.
    The last call's return value is kept in ``result``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time at least one call")
    if warmup < 0:
        raise ValueError(f"warmup={warmup}: cannot be negative")
    result = None
    for _ in range(warmup):
        result = fn()
    seconds: list[float] = []
    spent = 0.0
    limit = max_repeats if max_repeats is not None else repeats
    while len(seconds) < repeats or (spent < min_seconds and len(seconds) < limit):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        seconds.append(elapsed)
        spent += elapsed
    return Timing(seconds=seconds, warmup=warmup, result=result)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_mallinfo2: Any = None


def allocated_bytes() -> int | None:
    """Bytes the C heap has handed out and not taken back (glibc ``mallinfo2``), or None.

    Unlike RSS, this sees an allocation even when the allocator serves it from pages the
    process already holds, so the difference around loading an object is its size in memory
    (FAISS and numpy allocate through malloc). None where glibc's ``mallinfo2`` is missing.
    """
    global _mallinfo2
    if _mallinfo2 is None:
        try:
            function = ctypes.CDLL(None).mallinfo2
            function.restype = _MallInfo2
            _mallinfo2 = function
        except (OSError, AttributeError):
            _mallinfo2 = False
    if _mallinfo2 is False:
        return None
    info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


@dataclass
class PeakMemory:
    """Peak resident memory of this process while the ``with`` block runs.

    A background thread samples RSS every ``interval`` seconds (psutil); ``peak_bytes`` is
    the largest sample, ``start_bytes`` the RSS on entry, so ``delta_bytes`` is what the
    block added at its worst. Allocations shorter than the interval can be missed, which is
    why the interval is small.
    """

    interval: float = 0.005
    start_bytes: int = 0
    peak_bytes: int = 0
    end_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="vkd-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end_bytes = rss_bytes()
        self.peak_bytes = max(self.peak_bytes, self.end_bytes)

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes

    def summary(self) -> dict[str, float]:
        return {
            "peak_rss_mib": self.peak_bytes / MIB,
            "start_rss_mib": self.start_bytes / MIB,
            "peak_delta_mib": self.delta_bytes / MIB,
        }
