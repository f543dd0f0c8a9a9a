"""What a real server logs: a line per request and per refusal, as text or JSON,
with the request id on every line about a request, and never a secret."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support import KEY_SECRET, MASTER, FakeUpstream, Server, gateway_config, ledger_row

pytestmark = pytest.mark.timeout(180)

CONFIG = """
[[models]]
name = "scripted"
engine = "scripted"
price = { prompt = 1.0, completion = 2.0 }

[[models]]
name = "scripted-slow"
engine = "scripted"
delay = 0.02
reply_tokens = 400
"""

WRONG_KEY = "tw-" + "x" * 43


def _traffic(server: Server) -> dict[str, str]:
    """A completed request, a 401, a 429 and a client that leaves mid-stream."""
    created = server.create_key(name="logged", rpm=1)
    secret = created["key"]
    with server.http(key=secret) as http:
        ok = http.post(
            "/v1/chat/completions",
            json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert ok.status_code == 200
        limited = http.post(
            "/v1/chat/completions",
            json={"model": "scripted", "messages": [{"role": "user", "content": "again"}]},
        )
        assert limited.status_code == 429
    with server.http(key=WRONG_KEY) as http:
        unknown = http.get("/v1/models")
        assert unknown.status_code == 401
    with (
        server.http() as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "scripted-slow",
                "stream": True,
                "messages": [{"role": "user", "content": "long"}],
            },
        ) as stream,
    ):
        left = stream.headers["x-request-id"]
        next(stream.iter_bytes())  # one chunk, then hang up
    assert ledger_row(server, left)["status"] == "client_disconnected"
    ledger_row(server, ok.headers["x-request-id"])
    return {
        "key": secret,
        "key_id": created["id"],
        "ok": ok.headers["x-request-id"],
        "limited": limited.headers["x-request-id"],
        "unknown": unknown.headers["x-request-id"],
        "left": left,
    }


def _wait_for(server: Server, text: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log = server.log_path.read_text(errors="replace")
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never logged:\n{server.log()}")


def _no_secrets(log: str, *secrets: str) -> None:
    for secret in (MASTER, KEY_SECRET, WRONG_KEY, *secrets):
        assert secret not in log, f"a secret was logged: {secret[:6]}…"
    # Not even the masked form a 401's message quotes.
    assert WRONG_KEY[:6] + "******" not in log


def test_text_lines_per_request_and_refusal(tmp_path: Path) -> None:
    with Server(tmp_path, CONFIG) as server:
        ids = _traffic(server)
        log = _wait_for(server, f"[{ids['left']}]")
    # The banner says which models bill nothing (no price): a budget is never spent on them.
    assert "price: scripted-slow is free" in log
    assert "/dashboard" in log
    lines = log.splitlines()
    done = next(ln for ln in lines if f"[{ids['ok']}]" in ln and "request completed" in ln)
    assert "INFO tokenwell.requests" in done
    for part in (
        f"key_id={ids['key_id']}",
        "model=scripted",
        "status=completed",
        "prompt_tokens=",
        "completion_tokens=",
        "cost_usd=0.0000",
        "ttft_ms=",
        "total_ms=",
    ):
        assert part in done, done
    limited = next(ln for ln in lines if "refused 429" in ln)
    assert f"[{ids['limited']}]" in limited and "Rate limit reached" in limited
    refused = next(ln for ln in lines if "refused 401" in ln)
    # Refused before admission, yet with an id of its own: the response's.
    assert ids["unknown"].startswith("req_") and ids["unknown"] not in (ids["ok"], ids["limited"])
    assert f"[{ids['unknown']}]" in refused and "path=/v1/models" in refused
    left = next(ln for ln in lines if f"[{ids['left']}]" in ln and "client_disconnected" in ln)
    assert "completion_tokens=" in left
    _no_secrets(log, ids["key"])


def test_json_lines_at_debug_without_driver_chatter(tmp_path: Path) -> None:
    env = {"TOKENWELL_LOG_FORMAT": "json", "TOKENWELL_LOG_LEVEL": "debug"}
    with Server(tmp_path, CONFIG, env=env) as server:
        ids = _traffic(server)
        _wait_for(server, ids["left"])
        log = server.log_path.read_text()
    # Every line the server wrote is one JSON object, the start-up banner too.
    records = [orjson.loads(line) for line in log.splitlines()]
    assert len(records) >= 5
    (banner,) = [r for r in records if r["message"] == "tokenwell listening"]
    assert banner["url"] == server.base and "scripted" in banner["models"]
    done = next(
        r
        for r in records
        if r.get("request_id") == ids["ok"] and r["message"] == "request completed"
    )
    assert done["level"] == "info" and done["logger"] == "tokenwell.requests"
    assert done["key_id"] == ids["key_id"] and done["model"] == "scripted"
    assert done["completion_tokens"] > 0 and done["cost_usd"] != "0"
    assert isinstance(done["total_ms"], float)
    # Every line about the request that was cut carries its id.
    about = [r for r in records if ids["left"] in orjson.dumps(r).decode()]
    assert about and all(r.get("request_id") == ids["left"] for r in about)
    # Debug is tokenwell's, not the drivers': no SQL, no socket reads.
    noisy = [r for r in records if r["level"] == "debug" and r["logger"].split(".")[0] in (
        "aiosqlite", "sqlalchemy", "httpcore", "asyncio", "psycopg"
    )]  # fmt: skip
    assert noisy == []
    _no_secrets(log, ids["key"])


@pytest.mark.timeout(120)
def test_an_upstream_that_refuses_our_key_is_reported_and_logged(tmp_path: Path) -> None:
    fake = FakeUpstream(tmp_path, api_key="the-upstream-key")
    # The gateway was given no api_key for it: never ready, so not Server.start().
    server = Server(tmp_path, gateway_config({"gw": f'["{fake.url}"]'}))
    try:
        _spawn_no_wait(server)
        deadline = time.monotonic() + 60
        health: dict = {}
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{server.base}/health", timeout=2).json()
                if health.get("status") == "unavailable":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert health["status"] == "unavailable", health
        assert "401" in health["models"]["gw"]["error"]
        assert "api_key" in health["models"]["gw"]["error"]
        # A request is told why at once, instead of waiting for a model "loading".
        started = time.monotonic()
        with server.http() as http:
            r = http.post(
                "/v1/chat/completions",
                json={"model": "gw", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "upstream_unavailable"
        assert "401" in r.json()["error"]["message"]
        assert time.monotonic() - started < 30
        log = _wait_for(server, "is unhealthy")
        line = next(ln for ln in log.splitlines() if "is unhealthy" in ln)
        assert "WARNING" in line and "answered 401" in line and fake.url in line
        assert "the-upstream-key" not in log
    finally:
        server.stop()
        fake.stop()


def _spawn_no_wait(server: Server) -> None:
    import subprocess
    import sys

    log = server.log_path.open("ab")
    server.proc = subprocess.Popen(
        [
            sys.executable, "-m", "tokenwell", "serve",
            "--config", str(server.config_path),
            "--data-dir", str(server.data_dir),
            "--port", str(server.port),
        ],
        env=server.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
