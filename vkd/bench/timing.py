"""Measuring time and memory: repeated timed calls, percentiles, throughput, peak RSS.

Every figure a benchmark reports comes out of these functions, so warm-up, repetition
counts and units are the same everywhere: times are taken with ``time.perf_counter``,
reported in milliseconds, and every summary carries the number of timed repetitions.

Figures a reader can trust: a benchmark repeats its measurement in rounds (repetitions)
and reports the median over rounds with the spread (``spread``: median, min, max,
quartiles, n). Two set-ups are compared by the ratio *within* each round — both measured
in the same round, back to back, so a slow minute of the machine hits both — and the
ratios' median and spread are reported (``ratio_spread``), never a ratio of two medians
taken minutes apart. ``repeat_rounds`` runs calls in such interleaved rounds;
``within_spread`` / ``ratio_within_spread`` say when a difference is no larger than the
run-to-run variation, so no one reads a conclusion into noise.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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


# ---------------------------------------------------------------- repetitions and spread

SPREAD_KEYS = ("median", "min", "max", "q1", "q3", "n")


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """A figure measured in ``n`` repetitions: its median, min, max and quartiles, and ``n``.

    Reported in the unit of ``values`` (callers convert first). With one repetition the
    spread is a single point, which the ``n`` says; nothing pretends to more.
    """
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise ValueError("spread needs at least one repetition, got none")
    if not np.isfinite(array).all():
        raise ValueError(f"repetitions must be finite numbers, got {array.tolist()!r}")
    q1, median, q3 = (float(v) for v in np.percentile(array, (25, 50, 75)))
    return {"median": median, "min": float(array.min()), "max": float(array.max()), "q1": q1, "q3": q3,
            "n": int(array.size)}


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """``numerators[i] / denominators[i]`` for each repetition ``i`` (both measured in it)."""
    top, bottom = list(numerators), list(denominators)
    if len(top) != len(bottom):
        raise ValueError(f"paired ratios need one denominator per numerator: {len(top)} vs {len(bottom)} "
                         "repetitions")
    if not top:
        raise ValueError("paired ratios need at least one repetition")
    for value in bottom:
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"denominator {value!r}: a ratio needs positive, finite measurements")
    return [float(a) / float(b) for a, b in zip(top, bottom, strict=True)]


def ratio_spread(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float | int]:
    """The ratio within each repetition, then its ``spread`` over repetitions.

    E.g. the speed-up of B over A: ``ratio_spread(a_seconds, b_seconds)`` where round ``i``
    measured both. A ratio of medians would mix rounds and hide how much it varies.
    """
    return spread(paired_ratios(numerators, denominators))


def within_spread(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """True when two ``spread`` figures' [min, max] ranges overlap: the difference between
    them is no larger than their run-to-run variation."""
    return bool(a["min"] <= b["max"] and b["min"] <= a["max"])


def ratio_within_spread(ratio: Mapping[str, float], value: float = 1.0) -> bool:
    """True when ``value`` (default 1: no difference) lies within a ratio's [min, max]."""
    return bool(ratio["min"] <= value <= ratio["max"])


def scale_spread(figure: Mapping[str, float | int], factor: float) -> dict[str, float | int]:
    """A ``spread`` in another unit (e.g. seconds → milliseconds, per batch → per item)."""
    if not factor > 0:
        raise ValueError(f"factor={factor!r}: scaling a spread needs a positive factor")
    return {key: (value * factor if key != "n" else value) for key, value in figure.items()}


def format_spread(figure: Mapping[str, float] | None, digits: int = 3, suffix: str = "") -> str | None:
    """``median (min–max)`` for a table cell, e.g. ``2.51 (2.40–2.63)``; None stays None."""
    if figure is None:
        return None
    from vkd.bench.report import format_cell

    def cell(value: float) -> str:
        return format_cell(float(value), digits)

    if figure.get("n", 1) == 1 or figure["min"] == figure["max"]:
        return cell(figure["median"]) + suffix
    return f"{cell(figure['median'])}{suffix} ({cell(figure['min'])}–{cell(figure['max'])})"


def format_ratio(figure: Mapping[str, float] | None, digits: int = 3) -> str | None:
    """A ratio's cell, ``6.52× (5.90–7.10)``; ``, within spread`` is added when 1 (no
    difference) lies within its min–max."""
    if figure is None:
        return None
    text = format_spread(figure, digits, suffix="×")
    return f"{text}, within spread" if ratio_within_spread(figure) else text


def repeat_rounds(calls: Mapping[str, Callable[[], Any]], *, rounds: int, per_round: int = 1,
                  warmup: int = 1) -> dict[str, list[list[float]]]:
    """Time every call of ``calls`` in ``rounds`` interleaved rounds; seconds per call.

    Each call is first run ``warmup`` times untimed. Then, in every round, each call runs
    ``per_round`` timed times, one call after the other, in an order that rotates from
    round to round, so a drift of the machine (a neighbour's job, clock changes) falls on
    every call alike and paired ratios within a round stay fair. Returns, per name, one
    list of per-call seconds per round.
    """
    if rounds < 1 or per_round < 1:
        raise ValueError(f"rounds={rounds}, per_round={per_round}: both must be at least 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup}: cannot be negative")
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    seconds: dict[str, list[list[float]]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            times = []
            for _ in range(per_round):
                start = time.perf_counter()
                calls[name]()
                times.append(time.perf_counter() - start)
            seconds[name].append(times)
    return seconds


def round_medians(per_round: Sequence[Sequence[float]]) -> list[float]:
    """Each round's median (the round's value of a figure timed several times per round)."""
    if not per_round or any(len(values) == 0 for values in per_round):
        raise ValueError("every round needs at least one timed call")
    return [float(np.median(np.asarray(values, dtype=np.float64))) for values in per_round]


def split_rounds(values: Sequence[float], rounds: int) -> list[list[float]]:
    """``values`` (timed in order) cut into ``rounds`` consecutive blocks of near-equal size."""
    items = list(values)
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: at least one")
    rounds = min(rounds, len(items)) or 1
    bounds = np.linspace(0, len(items), rounds + 1).round().astype(int)
    return [items[bounds[i]:bounds[i + 1]] for i in range(rounds)]


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

    def sample(self) -> None:
        """Record the RSS now: a caller that knows when its peak is (a buffer still held) need not
        rely on the background thread being scheduled at that moment."""
        self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample()
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
