"""Prometheus metrics, in a registry of the app's own (no import-time globals)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenwell.protocol.events import Meter


class _EngineStats(Collector):
    def __init__(self, source: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._source = source

    def collect(self):  # type: ignore[no-untyped-def]
        stats = self._source()
        for name, help_text in (
            ("queued", "Requests waiting for a slot"),
            ("busy_slots", "Slots generating or prefilling"),
            ("slots", "Parallel slots"),
        ):
            family = GaugeMetricFamily(f"tokenwell_engine_{name}", help_text, labels=["model"])
            for model, values in stats.items():
                if name in values:
                    family.add_metric([model], float(values[name]))
            yield family


class _LedgerStats(Collector):
    def __init__(self, source: Callable[[], dict[str, float]]) -> None:
        self._source = source

    def collect(self):  # type: ignore[no-untyped-def]
        stats = self._source()
        yield CounterMetricFamily(
            "tokenwell_ledger_commits", "Ledger transactions committed", value=stats["batches"]
        )
        yield CounterMetricFamily(
            "tokenwell_ledger_rows",
            "Ledger writes (opens and closes) committed",
            value=stats["rows"],
        )
        yield GaugeMetricFamily(
            "tokenwell_ledger_queue", "Ledger writes waiting for a commit", value=stats["queued"]
        )
        yield CounterMetricFamily(
            "tokenwell_ledger_commit_cpu_seconds",
            "CPU time of SQLite ledger commits",
            value=stats["commit_cpu_seconds"],
        )
        yield CounterMetricFamily(
            "tokenwell_ledger_lock_waits",
            "SQLite ledger commits that found another writer holding the database",
            value=stats["lock_waits"],
        )


class _FrozenObjects(Collector):
    """Objects left out of garbage collection (``gc.freeze()``, see tokenwell.interpreter)."""

    def collect(self):  # type: ignore[no-untyped-def]
        yield GaugeMetricFamily(
            "tokenwell_gc_frozen_objects",
            "Objects frozen out of garbage collection after start-up",
            value=gc.get_freeze_count(),
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The process's CPU, memory and garbage collections, beside tokenwell's own.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_FrozenObjects())
        self.requests = Counter(
            "tokenwell_requests",
            "Chat completion requests by final status",
            ["model", "status"],
            registry=self.registry,
        )
        self.in_flight = Counter(
            "tokenwell_requests_started",
            "Chat completion requests started",
            ["model"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "tokenwell_tokens", "Tokens billed", ["model", "kind"], registry=self.registry
        )
        self.ttft = Histogram(
            "tokenwell_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

        self.disconnects = Counter(
            "tokenwell_client_disconnects",
            "Clients that went away before their response began, by what was being read",
            ["stage"],
            registry=self.registry,
        )

    def client_gone(self, stage: str) -> None:
        self.disconnects.labels(stage).inc()

    def watch_engines(self, source: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry.register(_EngineStats(source))

    def watch_ledger(self, source: Callable[[], dict[str, float]]) -> None:
        self.registry.register(_LedgerStats(source))

    def request_started(self, model: str) -> None:
        self.in_flight.labels(model).inc()

    def request_done(
        self, model: str, status: str, meter: Meter | None = None, ttft_ms: float | None = None
    ) -> None:
        self.requests.labels(model, status).inc()
        if meter is not None:
            self.tokens.labels(model, "prompt").inc(meter.prompt_tokens)
            self.tokens.labels(model, "cached").inc(meter.cached_tokens)
            self.tokens.labels(model, "completion").inc(meter.completion_tokens)
        if ttft_ms is not None:
            self.ttft.labels(model).observe(ttft_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
