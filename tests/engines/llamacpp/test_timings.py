"""The embedded engine's first-token timings on /metrics, from a real ``tokenwell serve``."""

from __future__ import annotations

import re

import pytest

from tests.server.test_metrics import scrape
from tests.support import Server, sse_events

pytestmark = pytest.mark.slow

MODEL = 'model="SmolLM2-135M-Instruct"'
STAGES = (
    "tokenwell_engine_queue_wait_seconds",
    "tokenwell_engine_prefill_seconds",
    "tokenwell_engine_handoff_seconds",
    "tokenwell_engine_first_token_seconds",
)


def test_each_request_adds_its_queue_wait_prefill_and_first_token_time(
    model_server: Server,
) -> None:
    before = scrape(model_server)
    with model_server.http() as http:
        for word in ("sea", "sky", "sand"):
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": f"One word about the {word}."}],
                    "max_tokens": 4,
                    "stream": True,
                },
            )
            assert r.status_code == 200
            assert sse_events(r.content)[-1] == "[DONE]"
    after = scrape(model_server)
    for stage in STAGES:
        count = f"{stage}_count{{{MODEL}}}"
        assert after[count] - before.get(count, 0) == 3, stage
        total = f"{stage}_sum{{{MODEL}}}"
        assert after[total] > before.get(total, 0), stage
        # Cumulative buckets that end at the count.
        bounds = sorted(
            (float(m.group(1)) if m.group(1) != "+Inf" else float("inf"), value)
            for name, value in after.items()
            if (m := re.fullmatch(rf'{stage}_bucket\{{le="([^"]+)",{MODEL}\}}', name))
        )
        assert len(bounds) > 5, stage
        values = [value for _, value in bounds]
        assert values == sorted(values) and values[-1] == after[count], stage
    # The parts fit inside the whole: queue wait + prefill + hand-off = first token.
    parts = sum(
        after[f"{s}_sum{{{MODEL}}}"] - before.get(f"{s}_sum{{{MODEL}}}", 0) for s in STAGES[:3]
    )
    whole = after[f"{STAGES[3]}_sum{{{MODEL}}}"] - before.get(f"{STAGES[3]}_sum{{{MODEL}}}", 0)
    assert parts == pytest.approx(whole, rel=1e-6, abs=1e-6)


def test_prompt_tokens_computed_and_cached_are_counted(model_server: Server) -> None:
    computed = f"tokenwell_engine_prompt_tokens_computed_total{{{MODEL}}}"
    cached = f"tokenwell_engine_prompt_tokens_cached_total{{{MODEL}}}"
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Name a colour of the rainbow."}],
        "max_tokens": 2,
    }
    with model_server.http() as http:
        before = scrape(model_server)
        first = http.post("/v1/chat/completions", json=body).json()["usage"]
        second = http.post("/v1/chat/completions", json=body).json()["usage"]
    after = scrape(model_server)
    # Every prompt token is either computed or found cached, exactly as billed.
    billed = first["prompt_tokens"] + second["prompt_tokens"]
    found = sum(u["prompt_tokens_details"]["cached_tokens"] for u in (first, second))
    assert after[cached] - before[cached] == found >= second["prompt_tokens"] - 1
    assert after[computed] - before[computed] == billed - found
    assert f"tokenwell_engine_prompt_cache_bytes{{{MODEL}}}" in after


def test_drafted_and_kept_tokens_are_counted(model_server: Server) -> None:
    drafted = f"tokenwell_engine_draft_tokens_total{{{MODEL}}}"
    kept = f"tokenwell_engine_draft_accepted_tokens_total{{{MODEL}}}"
    code = "def double(x):\n    return x * 2\n"
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": f"Repeat this code exactly:\n{code * 4}"}],
        "max_tokens": 48,
        "temperature": 0,
    }
    with model_server.http() as http:
        before = scrape(model_server)
        usage = http.post("/v1/chat/completions", json=body).json()["usage"]
    after = scrape(model_server)
    assert usage["completion_tokens"] <= 48
    assert 0 <= after[kept] - before.get(kept, 0) <= after[drafted] - before.get(drafted, 0)
