"""Request counts and latency percentiles of recent requests, for ``/stats``."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

WINDOW = 1000  # requests per route kind the percentiles are computed over


class RequestStats:
    """Counts per route kind (search, images, thumbs, ...) and the wall times of the last
    ``WINDOW`` requests of each, in milliseconds. Thread-safe and cheap to record."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._times: dict[str, deque[float]] = {}

    def record(self, kind: str, ms: float, status: int) -> None:
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            if status >= 400:
                self._errors[kind] = self._errors.get(kind, 0) + 1
            times = self._times.get(kind)
            if times is None:
                times = self._times[kind] = deque(maxlen=self.window)
            times.append(ms)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def summary(self) -> dict[str, Any]:
        with self._lock:
            snapshot = {kind: (self._counts[kind], self._errors.get(kind, 0), list(self._times[kind]))
                        for kind in self._counts}
        return {kind: {"count": count, "errors_4xx_5xx": errors, "latency_ms": percentiles(times)}
                for kind, (count, errors, times) in sorted(snapshot.items())}


def percentiles(times_ms: list[float]) -> dict[str, float | int | None]:
    """p50/p95/p99 (numpy's linear interpolation) of ``times_ms`` and how many they cover."""
    if not times_ms:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    values = np.asarray(times_ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "n": int(values.size)}
