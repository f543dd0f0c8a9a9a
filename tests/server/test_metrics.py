"""/metrics of a real ``tokenwell serve``: requests, tokens, the ledger and the process."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

from tests.support import (
    ROOT,
    SCRIPTED_CONFIG,
    FakeUpstream,
    Server,
    gateway_config,
    ledger_row,
    sse_events,
)


def scrape(server: Server) -> dict[str, float]:
    """Every sample of /metrics, keyed by its name and labels as printed."""
    with server.http(key=None) as http:
        r = http.get("/metrics")
    assert r.status_code == 200  # no key needed
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_requests_tokens_and_ledger_writes_are_counted(scripted_server: Server) -> None:
    key = scripted_server.create_key(name="metrics")
    before = scrape(scripted_server)
    billed = 0
    with scripted_server.http(key=key["key"]) as http:
        for _ in range(3):
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": "scripted-64",
                    "messages": [{"role": "user", "content": "count me"}],
                    "stream": True,
                },
            )
            assert r.status_code == 200
            assert sse_events(r.content)[-1] == "[DONE]"
            billed += ledger_row(scripted_server, r.headers["x-request-id"])["completion_tokens"]
    after = scrape(scripted_server)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('tokenwell_requests_total{model="scripted-64",status="completed"}') == 3
    assert grew('tokenwell_tokens_total{kind="completion",model="scripted-64"}') == billed == 192
    # Three opens and three closes, however they were batched.
    assert grew("tokenwell_ledger_rows_total") >= 6
    assert grew("tokenwell_ledger_commits_total") >= 1


def test_the_served_process_reports_its_cpu_memory_and_garbage_collection(
    scripted_server: Server,
) -> None:
    samples = scrape(scripted_server)
    assert samples["process_cpu_seconds_total"] > 0
    assert samples["process_resident_memory_bytes"] > 10 * 2**20
    assert 'python_gc_collections_total{generation="0"}' in samples
    # `tokenwell serve` froze what start-up built out of later collections
    # (tokenwell.interpreter): modules, settings, engines, connections.
    assert samples["tokenwell_gc_frozen_objects"] > 10_000


def _families(text: str) -> set[str]:
    """Every metric family /metrics declares (its # TYPE lines), and each sample's name."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def test_latency_spend_in_flight_and_ledger_lag(tmp_path: Path) -> None:
    with Server(tmp_path, SCRIPTED_CONFIG) as server:
        key = server.create_key(name="metered")
        billed: list[Decimal] = []
        with server.http(key=key["key"]) as http:
            for _ in range(2):
                r = http.post(
                    "/v1/chat/completions",
                    json={
                        "model": "scripted-64",
                        "messages": [{"role": "user", "content": "count me"}],
                        "stream": True,
                    },
                )
                assert r.status_code == 200
                billed.append(Decimal(ledger_row(server, r.headers["x-request-id"])["cost_usd"]))
            # One stream held open: it is in flight until it ends.
            with http.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "scripted-slow",
                    "stream": True,
                    "messages": [{"role": "user", "content": "long"}],
                },
            ) as stream:
                chunks = stream.iter_bytes()  # held: a dropped iterator closes the stream
                next(chunks)
                during = scrape(server)
        after = scrape(server)
    assert during['tokenwell_requests_in_flight{model="scripted-slow"}'] == 1, {
        k: v for k, v in during.items() if "flight" in k or "started" in k
    }
    assert after['tokenwell_requests_in_flight{model="scripted-slow"}'] == 0
    assert after['tokenwell_requests_in_flight{model="scripted-64"}'] == 0
    assert after['tokenwell_time_to_first_token_seconds_count{model="scripted-64"}'] == 2
    # 64 tokens each: 63 gaps after the first, observed once per request.
    assert after['tokenwell_inter_token_latency_seconds_count{model="scripted-64"}'] == 2
    spent = after['tokenwell_spend_usd_total{model="scripted-64"}']
    assert abs(Decimal(str(spent)) - sum(billed)) < Decimal("1e-9")
    assert after["tokenwell_ledger_write_lag_seconds_count"] >= 2


def test_metrics_can_require_a_token(tmp_path: Path) -> None:
    token = "metrics-token-123"
    with Server(tmp_path, SCRIPTED_CONFIG, env={"TOKENWELL_METRICS_TOKEN": token}) as server:
        with server.http(key=None) as http:
            bare = http.get("/metrics")
            wrong = http.get("/metrics", headers={"Authorization": "Bearer nope-nope"})
            right = http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        # The master key is not the metrics token: a scraper holds no admin power.
        with server.http() as http:
            master = http.get("/metrics")
    for refused in (bare, wrong, master):
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200 and "tokenwell_requests_started_total" in right.text


def test_the_grafana_dashboard_asks_for_metrics_that_exist(tmp_path: Path) -> None:
    """Every metric a query of ops/grafana/tokenwell.json names is one /metrics exports."""
    dashboard = json.loads((ROOT / "ops" / "grafana" / "tokenwell.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 14
    # An upstream model, so that the upstream families have samples too.
    fake = FakeUpstream(tmp_path)
    try:
        config = gateway_config({"gw": f'["{fake.url}"]'})
        with Server(tmp_path / "gw", config) as gateway, gateway.http() as http:
            # Labelled histograms have samples once something was observed.
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": "gw",
                    "stream": True,
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
            assert r.status_code == 200 and sse_events(r.content)[-1] == "[DONE]"
            ledger_row(gateway, r.headers["x-request-id"])
            exported = _families(http.get("/metrics").text)
    finally:
        fake.stop()
    assert "tokenwell_upstream_healthy" in exported
    wanted = set()
    for expr in exprs:
        wanted |= {
            name
            for name in re.findall(r"[a-z_:][a-z0-9_:]*", re.sub(r"\{[^}]*\}|\[[^]]*\]", "", expr))
            if name.startswith(("tokenwell_", "process_", "python_"))
        }
    assert wanted, exprs
    missing = sorted(name for name in wanted if name not in exported)
    assert missing == [], f"the dashboard queries metrics /metrics does not export: {missing}"
