"""/metrics of a real ``tokenwell serve``: requests, tokens, the ledger and the process."""

from __future__ import annotations

from tests.support import Server, ledger_row, sse_events


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
