"""Latency histograms an engine keeps of its own stages, for ``/metrics``.

An engine observes from whichever thread runs a stage (the llama.cpp decode
thread, the event loop); ``/metrics`` reads a consistent copy. Prometheus'
client keeps its histograms in a registry the engine does not own, so these
are plain counts that ``server.metrics`` exposes as histogram families.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

# Seconds: from a millisecond (an idle engine's queue) to a long prompt's prefill.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: tuple[int, ...]  # per bucket, not cumulative; one more for +Inf
    total: float


class LatencyHistogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            return HistogramSnapshot(
                self.name, self.help, self.buckets, tuple(self._counts), self._sum
            )

    @property
    def count(self) -> int:
        return sum(self._counts)
