"""An engine's latency histograms (engines/timings.py)."""

from __future__ import annotations

from tokenwell.engines.timings import LatencyHistogram


def test_each_value_lands_in_the_first_bucket_that_holds_it() -> None:
    h = LatencyHistogram("x_seconds", "x", buckets=(0.01, 0.1, 1.0))
    for seconds in (0.005, 0.01, 0.05, 0.5, 2.0, 7.0):
        h.observe(seconds)
    snap = h.snapshot()
    # Prometheus buckets are "less than or equal": 0.01 belongs to le="0.01".
    assert snap.counts == (2, 1, 1, 2)
    assert snap.total == 0.005 + 0.01 + 0.05 + 0.5 + 2.0 + 7.0
    assert h.count == 6
