"""kill -9 mid-stream: after a restart every admitted request has a closed row."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from tests.support import SCRIPTED_CONFIG, Server, model_config


def _stream(server: Server, key: str, body: dict, out: dict, ready: threading.Event) -> None:  # type: ignore[type-arg]
    seen = 0
    try:
        with (
            server.http(key=key) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            out["id"] = r.headers["x-request-id"]
            for line in r.iter_lines():
                if '"content":"' in line and '"role"' not in line:
                    seen += 1
                    out["seen"] = seen
                    if seen == 10:
                        ready.set()
    except Exception:
        pass  # the server is killed under us
    finally:
        ready.set()


def crash_and_recover(tmp_path: Path, config: str, body: dict, env: dict | None = None) -> None:  # type: ignore[type-arg]
    server = Server(tmp_path, config, env=env).start()
    # Every budget a request reserves on: lifetime, a day's and its end user's.
    key = server.create_key(
        name="crash",
        budget_usd="10",
        budgets=[{"usd": "10", "period": "total"}, {"usd": "10", "period": "day"}],
        end_user_budget={"usd": "10", "period": "day"},
    )
    body = {**body, "user": "crash-user"}
    outs = [{} for _ in range(3)]
    readies = [threading.Event() for _ in range(3)]
    threads = [
        threading.Thread(target=_stream, args=(server, key["key"], body, o, r))
        for o, r in zip(outs, readies, strict=True)
    ]
    for t in threads:
        t.start()
    for r in readies:
        assert r.wait(60)
    server.kill9()
    for t in threads:
        t.join(10)
    assert all("id" in o for o in outs), outs

    restarted = Server(tmp_path, config, env=env, data_dir=server.data_dir).start()
    try:
        with restarted.http() as http:
            rows = [http.get(f"/admin/requests/{o['id']}").json() for o in outs]
            record = http.get(f"/admin/keys/{key['id']}").json()
        for row, out in zip(rows, outs, strict=True):
            assert row["status"] == "interrupted", row
            # Billed at least every token the client received, and no more than was asked.
            assert out["seen"] <= row["completion_tokens"] <= body.get("max_tokens", 400)
            assert row["error"]
        assert record["reserved_usd"] == "0.0"
        spend = Decimal(record["spend_usd"])
        assert spend == sum(Decimal(r["cost_usd"]) for r in rows) > 0
        with restarted.http(key=key["key"]) as http:
            usage = http.get("/v1/usage", params={"user": "crash-user"}).json()
        # Nothing stays reserved on any of them, and each holds the spend.
        for budget in (*usage["budgets"], usage["end_user"]["budget"]):
            assert Decimal(budget["spent_usd"]) == spend, budget
            assert Decimal(budget["remaining_usd"]) == 10 - spend, budget
        # Restarting again changes nothing: each row was closed exactly once.
        restarted.stop()
        again = Server(tmp_path, config, env=env, data_dir=server.data_dir).start()
        with again.http() as http:
            assert http.get(f"/admin/keys/{key['id']}").json()["spend_usd"] == record["spend_usd"]
        again.stop()
    finally:
        restarted.stop()


SLOW = {"model": "scripted-slow", "stream": True, "messages": [{"role": "user", "content": "go"}]}


def test_kill_9_on_sqlite(tmp_path: Path) -> None:
    crash_and_recover(tmp_path, SCRIPTED_CONFIG, SLOW)


def test_kill_9_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    crash_and_recover(tmp_path, SCRIPTED_CONFIG, SLOW, env={"TOKENWELL_DATABASE_URL": pg_url})


@pytest.mark.slow
def test_kill_9_on_the_real_model(tmp_path: Path) -> None:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "stream": True,
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Write a very long story about a city."}],
    }
    crash_and_recover(tmp_path, model_config(parallel=4), body)


def test_a_data_dir_serves_one_server_at_a_time(tmp_path: Path) -> None:
    first = Server(tmp_path / "a", SCRIPTED_CONFIG).start()
    try:
        second = Server(tmp_path / "b", SCRIPTED_CONFIG, data_dir=first.data_dir)
        with pytest.raises(RuntimeError, match="another tokenwell server"):
            second.start(timeout=30)
    finally:
        first.stop()
    time.sleep(0)
