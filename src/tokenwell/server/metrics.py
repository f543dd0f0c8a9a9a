"""Prometheus metrics, in a registry of the app's own (no import-time globals)."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tokenwell.engines.timings import HistogramSnapshot
from tokenwell.protocol.events import Meter

# An engine's stats() values exported per model: gauges (now) and counters (since start).
_ENGINE_VALUES: tuple[tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str], ...] = (
    (GaugeMetricFamily, "queued", "Requests waiting for a slot"),
    (GaugeMetricFamily, "busy_slots", "Slots generating or prefilling"),
    (GaugeMetricFamily, "slots", "Parallel slots"),
    (GaugeMetricFamily, "prompt_cache_bytes", "Bytes of prompt KV state kept in host memory"),
    (GaugeMetricFamily, "prompt_cache_entries", "Prompt KV states kept in host memory"),
    (CounterMetricFamily, "prompt_tokens_computed", "Prompt tokens the engine computed"),
    (
        CounterMetricFamily,
        "prompt_tokens_cached",
        "Prompt tokens found computed already (a slot or the store)",
    ),
    (
        CounterMetricFamily,
        "prompt_cache_restores",
        "Prompt KV states written back from host memory",
    ),
    (
        CounterMetricFamily,
        "prompt_cache_restored_tokens",
        "Prompt tokens written back from host memory",
    ),
    (
        CounterMetricFamily,
        "prompt_slot_copies",
        "Prompt KV states copied from a busy slot into a free one",
    ),
    (CounterMetricFamily, "prompt_slot_copied_tokens", "Prompt tokens copied from a busy slot"),
    (
        CounterMetricFamily,
        "draft_tokens",
        "Tokens drafted by n-gram lookup and decoded for verification",
    ),
    (
        CounterMetricFamily,
        "draft_accepted_tokens",
        "Drafted tokens that were the ones sampled (kept)",
    ),
)


class _EngineStats(Collector):
    def __init__(self, source: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._source = source

    def collect(self):  # type: ignore[no-untyped-def]
        stats = self._source()
        for kind, name, help_text in _ENGINE_VALUES:
            family = kind(f"tokenwell_engine_{name}", help_text, labels=["model"])
            for model, values in stats.items():
                if name in values:
                    family.add_metric([model], float(values[name]))
            yield family
        # Upstream replicas (engines whose stats list ``upstreams``).
        healthy = GaugeMetricFamily(
            "tokenwell_upstream_healthy",
            "1 while an upstream replica passes its health checks, else 0",
            labels=["model", "url"],
        )
        outstanding = GaugeMetricFamily(
            "tokenwell_upstream_outstanding",
            "Requests an upstream replica is serving now",
            labels=["model", "url"],
        )
        latency = GaugeMetricFamily(
            "tokenwell_upstream_health_check_seconds",
            "How long an upstream replica's last health check took to answer",
            labels=["model", "url"],
        )
        for model, values in stats.items():
            for replica in values.get("upstreams") or ():
                url = str(replica.get("url", ""))
                healthy.add_metric([model, url], 1.0 if replica.get("healthy") else 0.0)
                outstanding.add_metric([model, url], float(replica.get("outstanding", 0)))
                if replica.get("health_ms") is not None:
                    latency.add_metric([model, url], float(replica["health_ms"]) / 1000)
        yield healthy
        yield outstanding
        yield latency


class _EngineTimings(Collector):
    """Engines' own latency histograms (engines.timings), one family per name."""

    def __init__(self, source: Callable[[], dict[str, list[HistogramSnapshot]]]) -> None:
        self._source = source

    def collect(self):  # type: ignore[no-untyped-def]
        families: dict[str, HistogramMetricFamily] = {}
        for model, histograms in self._source().items():
            for h in histograms:
                family = families.get(h.name)
                if family is None:
                    family = families[h.name] = HistogramMetricFamily(
                        h.name, h.help, labels=["model"]
                    )
                cumulative, buckets = 0, []
                for bound, count in zip((*h.buckets, math.inf), h.counts, strict=True):
                    cumulative += count
                    buckets.append((floatToGoString(bound), cumulative))
                family.add_metric([model], buckets, h.total)
        yield from families.values()


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

        # Per request, over its stream: (last token - first token) / (tokens - 1).
        self.itl = Histogram(
            "tokenwell_inter_token_latency_seconds",
            "Mean time between tokens of a request, after its first",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1),
            registry=self.registry,
        )
        self.spend = Counter("tokenwell_spend_usd", "USD billed", ["model"], registry=self.registry)
        self.running = Gauge(
            "tokenwell_requests_in_flight",
            "Requests admitted and not yet settled",
            ["model"],
            registry=self.registry,
        )
        # From a request's close being queued to its commit in the ledger.
        self.ledger_lag = Histogram(
            "tokenwell_ledger_write_lag_seconds",
            "Time from a request's settlement to its ledger row's commit",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
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

    def watch_engine_timings(
        self, source: Callable[[], dict[str, list[HistogramSnapshot]]]
    ) -> None:
        self.registry.register(_EngineTimings(source))

    def watch_ledger(self, source: Callable[[], dict[str, float]]) -> None:
        self.registry.register(_LedgerStats(source))

    def request_started(self, model: str) -> None:
        self.in_flight.labels(model).inc()
        self.running.labels(model).inc()

    def request_done(
        self,
        model: str,
        status: str,
        meter: Meter | None = None,
        ttft_ms: float | None = None,
        cost_nanos: int = 0,
        *,
        started: bool = True,
        itl_seconds: float | None = None,
    ) -> None:
        self.requests.labels(model, status).inc()
        if started:
            self.running.labels(model).dec()
        if meter is not None:
            self.tokens.labels(model, "prompt").inc(meter.prompt_tokens)
            self.tokens.labels(model, "cached").inc(meter.cached_tokens)
            self.tokens.labels(model, "completion").inc(meter.completion_tokens)
        if cost_nanos:
            self.spend.labels(model).inc(cost_nanos / 1e9)
        if ttft_ms is not None:
            self.ttft.labels(model).observe(ttft_ms / 1000)
        if itl_seconds is not None:
            self.itl.labels(model).observe(itl_seconds)

    def ledger_committed(self, lag_seconds: float) -> None:
        self.ledger_lag.observe(lag_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
