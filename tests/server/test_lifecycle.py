"""A server's life: start-up self-test, loading, a dead decode thread, SIGTERM.

Each test runs ``tokenwell serve`` as a real process. Failures that cannot be
provoked from outside on a healthy machine (an illegal instruction, a bug in
the decode thread) are injected with ``TOKENWELL_FAULTS`` (tokenwell/faults.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support import MASTER, SCRIPTED_CONFIG, Server, model_config, sse_events

pytestmark = pytest.mark.timeout(240)


def _spawn(server: Server) -> None:
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


def _health(server: Server) -> dict | None:
    try:
        return httpx.get(f"{server.base}/health", timeout=2).json()  # type: ignore[no-any-return]
    except httpx.HTTPError:
        return None


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_serve_refuses_to_run_a_build_that_dies_on_this_cpu(tmp_path: Path) -> None:
    server = Server(tmp_path, model_config(), env={"TOKENWELL_FAULTS": "selftest"})
    _spawn(server)
    assert server.proc is not None
    rc = server.proc.wait(timeout=180)
    log = server.log()
    assert rc == 3, log
    # What the user sees: the cause (which instruction class), and the fix.
    assert "tokenwell cannot serve" in log
    assert "SIGILL (illegal instruction)" in log
    assert "./dev serve" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_model_that_cannot_run_is_failed_while_the_others_serve(tmp_path: Path) -> None:
    config = model_config() + '\n[[models]]\nname = "scripted"\nengine = "scripted"\n'
    server = Server(tmp_path, config, env={"TOKENWELL_FAULTS": "selftest"})
    _spawn(server)
    try:
        _wait_for(lambda: (_health(server) or {}).get("status") == "failed", 180, "/health: failed")
        health = _health(server)
        assert health is not None
        llama = health["models"]["SmolLM2-135M-Instruct"]
        assert llama["status"] == "failed"
        assert "SIGILL" in llama["error"]
        assert health["models"]["scripted"]["status"] == "ready"
        with server.http() as http:
            ok = http.post(
                "/v1/chat/completions",
                json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert ok.status_code == 200, ok.text
            refused = http.post(
                "/v1/chat/completions",
                json={
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "model_failed"
        assert "SIGILL" in refused.json()["error"]["message"]
        assert server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()


@pytest.mark.slow
def test_a_dead_decode_thread_ends_the_server_and_recovery_closes_its_rows(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    server = Server(
        tmp_path / "a", model_config(), data_dir=data, env={"TOKENWELL_FAULTS": "decode-loop"}
    )
    server.start(timeout=180)
    assert server.proc is not None
    with server.http() as http, pytest.raises(httpx.HTTPError):
        # The decode thread dies on this request's first step: the process exits.
        http.post(
            "/v1/chat/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 8,
            },
        )
    assert server.proc.wait(timeout=60) == 70
    assert "FATAL: the llama.cpp scheduler thread died" in server.log()
    # The next start closes the row the crash left open, as after kill -9.
    with Server(tmp_path / "b", SCRIPTED_CONFIG, data_dir=data) as again, again.http() as http:
        rows = http.get("/admin/requests", params={"limit": 10}).json()["data"]
    assert len(rows) == 1, rows
    assert rows[0]["status"] == "interrupted"


def test_sigterm_finishes_short_streams_and_ends_long_ones_cleanly(tmp_path: Path) -> None:
    config = "drain_seconds = 1.5\n" + SCRIPTED_CONFIG
    data = tmp_path / "data"
    server = Server(tmp_path / "a", config, data_dir=data).start()
    assert server.proc is not None
    body = {
        "model": "scripted-slow",
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    short = {**body, "max_tokens": 20}  # 20 x 20 ms: done within the drain time
    with (
        httpx.Client(base_url=server.base, timeout=30) as a,
        httpx.Client(base_url=server.base, timeout=30) as b,
    ):
        headers = {"Authorization": f"Bearer {MASTER}"}
        with (
            a.stream("POST", "/v1/chat/completions", json=body, headers=headers) as long_r,
            b.stream("POST", "/v1/chat/completions", json=short, headers=headers) as short_r,
        ):
            long_id = long_r.headers["x-request-id"]
            short_id = short_r.headers["x-request-id"]
            long_it = long_r.iter_bytes()
            first = next(long_it)
            assert b"data:" in first
            server.proc.send_signal(signal.SIGTERM)
            long_body = first + b"".join(long_it)
            short_body = short_r.read()
    # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly.
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    log = server.log()
    assert "Traceback" not in log, log
    assert "CancelledError" not in log, log

    short_events = sse_events(short_body)
    assert short_events[-1] == "[DONE]"
    assert orjson.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"

    long_events = sse_events(long_body)
    assert long_events[-1] == "[DONE]"
    error = orjson.loads(long_events[-2])["error"]
    assert error["code"] == "interrupted"

    with Server(tmp_path / "b", SCRIPTED_CONFIG, data_dir=data) as again, again.http() as http:
        long_row = http.get(f"/admin/requests/{long_id}").json()
        short_row = http.get(f"/admin/requests/{short_id}").json()
    assert short_row["status"] == "length"
    assert short_row["completion_tokens"] == 20
    assert long_row["status"] == "interrupted"
    # Billed for what was generated before the drain ran out: tokens streamed.
    streamed = sum(
        1
        for e in long_events[:-2]
        if orjson.loads(e)["choices"] and orjson.loads(e)["choices"][0]["delta"].get("content")
    )
    assert long_row["completion_tokens"] >= streamed > 0


def test_requests_wait_for_a_loading_model_instead_of_a_503(tmp_path: Path) -> None:
    config = """
keepalive_seconds = 0.2

[[models]]
name = "late"
engine = "scripted"
start_delay = 2.0
reply = "ready now"
"""
    server = Server(tmp_path, config)
    _spawn(server)
    try:
        _wait_for(lambda: _health(server) is not None, 60, "the server to listen")
        assert (_health(server) or {})["status"] == "loading"
        messages = [{"role": "user", "content": "hi"}]
        with server.http() as http, server.http() as http2, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                http2.post, "/v1/chat/completions", json={"model": "late", "messages": messages}
            )
            with http.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "late", "stream": True, "messages": messages},
            ) as r:
                assert r.status_code == 200
                raw = r.read()
            plain = waiting.result()
        # Comments while loading, then the stream itself.
        assert raw.startswith(b": keep-alive\n\n"), raw[:80]
        text = "".join(
            (orjson.loads(e)["choices"][0]["delta"].get("content") or "")
            for e in sse_events(raw)[:-1]
        )
        assert text == "ready now"
        assert plain.status_code == 200
        assert plain.json()["choices"][0]["message"]["content"] == "ready now"
    finally:
        server.stop()
