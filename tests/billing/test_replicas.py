"""Two tokenwell replicas on one PostgreSQL and one Redis: one budget, one limit, one ledger."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL
from tests.support import SCRIPTED_CONFIG, Server


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[tuple[Server, Server]]:
    env = {"TOKENWELL_DATABASE_URL": pg_url, "TOKENWELL_REDIS_URL": REDIS_URL}
    a = Server(tmp_path / "a", SCRIPTED_CONFIG, env=env).start()
    b = Server(tmp_path / "b", SCRIPTED_CONFIG, env=env).start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


async def _fire(servers: tuple[Server, Server], key: str, count: int, body: dict) -> list[int]:  # type: ignore[type-arg]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count + 4)) as c:
        calls = [
            c.post(f"{servers[i % 2].base}/v1/chat/completions", json=body, headers=headers)
            for i in range(count)
        ]
        return [r.status_code for r in await asyncio.gather(*calls)]


def test_one_budget_across_replicas(replicas: tuple[Server, Server]) -> None:
    a, b = replicas
    per_request = Decimal(7) / 10**6 + Decimal(2 * 20) / 10**6  # 7 prompt + 20 completion tokens
    key = a.create_key(name="shared", budget_usd=str(per_request * 10))
    body = {
        "model": "scripted-slow",
        "max_tokens": 20,
        "stream": True,
        "messages": [{"role": "user", "content": "go"}],
    }
    statuses = asyncio.run(_fire(replicas, key["key"], 40, body))
    assert statuses.count(200) == 10 and statuses.count(429) == 30
    with b.http() as http:
        record = http.get(f"/admin/keys/{key['id']}").json()
        rows = http.get("/admin/requests", params={"key_id": key["id"], "limit": 100}).json()[
            "data"
        ]
    assert Decimal(record["spend_usd"]) == per_request * 10 == Decimal(record["budget_usd"])
    assert record["reserved_usd"] == "0.0"
    # One ledger, written by both replicas.
    assert len(rows) == 40 and len({r["instance"] for r in rows}) == 2
    assert sum(Decimal(r["cost_usd"]) for r in rows) == Decimal(record["spend_usd"])


def test_one_rate_limit_across_replicas(replicas: tuple[Server, Server]) -> None:
    a, _ = replicas
    key = a.create_key(name="limited-" + secrets.token_hex(3), rpm=8)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "x"}]}
    statuses = asyncio.run(_fire(replicas, key["key"], 20, body))
    # The shared bucket holds 8 (plus at most one more refilled in these seconds).
    assert 8 <= statuses.count(200) <= 9 and statuses.count(429) >= 11


def test_a_key_revoked_on_one_replica_is_refused_by_the_other(
    replicas: tuple[Server, Server],
) -> None:
    a, b = replicas
    key = a.create_key(name="revoked")
    body = {"model": "scripted", "messages": [{"role": "user", "content": "x"}]}
    with b.http(key=key["key"]) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
    with a.http() as http:
        assert http.delete(f"/admin/keys/{key['id']}").status_code == 200
    with b.http(key=key["key"]) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 401


def test_one_daily_budget_across_replicas(replicas: tuple[Server, Server]) -> None:
    """50 requests over both replicas against a daily budget that covers 10."""
    a, b = replicas
    per_request = Decimal(7) / 10**6 + Decimal(2 * 20) / 10**6
    key = a.create_key(name="daily", budgets=[{"usd": str(per_request * 10), "period": "day"}])
    body = {
        "model": "scripted-slow",
        "max_tokens": 20,
        "stream": True,
        "messages": [{"role": "user", "content": "go"}],
    }
    statuses = asyncio.run(_fire(replicas, key["key"], 50, body))
    assert statuses.count(200) == 10 and statuses.count(429) == 40
    with b.http(key=key["key"]) as http:
        for _ in range(100):  # the last closes commit just after their streams
            usage = http.get("/v1/usage").json()
            if usage["in_flight"] == 0:
                break
            time.sleep(0.05)
    (day,) = usage["budgets"]
    assert Decimal(day["spent_usd"]) == per_request * 10 == Decimal(usage["spend_usd"])
    assert day["remaining_usd"] == "0.0" and usage["reserved_usd"] == "0.0"


def test_one_end_user_budget_across_replicas(replicas: tuple[Server, Server]) -> None:
    """An end user's daily budget holds over both replicas; another end user goes on."""
    a, b = replicas
    per_request = Decimal(7) / 10**6 + Decimal(2 * 20) / 10**6
    key = a.create_key(
        name="end-users", end_user_budget={"usd": str(per_request * 4), "period": "day"}
    )
    body = {
        "model": "scripted-slow",
        "max_tokens": 20,
        "stream": True,
        "messages": [{"role": "user", "content": "go"}],
    }
    statuses = asyncio.run(_fire(replicas, key["key"], 30, {**body, "user": "ivy"}))
    assert statuses.count(200) == 4 and statuses.count(429) == 26
    others = asyncio.run(_fire(replicas, key["key"], 4, {**body, "user": "jo"}))
    assert others == [200] * 4
    with b.http(key=key["key"]) as http:
        for _ in range(100):  # the last closes commit just after their streams
            view = http.get("/v1/usage", params={"user": "ivy"}).json()
            if view["in_flight"] == 0:
                break
            time.sleep(0.05)
    assert Decimal(view["end_user"]["budget"]["spent_usd"]) == per_request * 4
    assert Decimal(view["spend_usd"]) == per_request * 8


def test_a_rotated_secret_is_refused_on_both_replicas_when_its_grace_ends(
    replicas: tuple[Server, Server],
) -> None:
    a, _ = replicas
    key = a.create_key(name="rotated")
    old = key["key"]
    body = {"model": "scripted", "messages": [{"role": "user", "content": "x"}]}
    for server in replicas:  # both replicas know (and cache) the old secret
        with server.http(key=old) as http:
            assert http.post("/v1/chat/completions", json=body).status_code == 200
    with a.http() as http:
        r = http.post(f"/admin/keys/{key['id']}/rotate", json={"grace_seconds": 3})
    assert r.status_code == 200, r.text
    new = r.json()["key"]
    deadline = datetime.fromisoformat(r.json()["previous_key_expires_at"]).timestamp()
    for server in replicas:
        for secret in (old, new):
            with server.http(key=secret) as http:
                response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200 or time.time() >= deadline, response.text
    time.sleep(max(deadline - time.time(), 0) + 0.05)
    for server in replicas:
        with server.http(key=old) as http:
            assert http.post("/v1/chat/completions", json=body).status_code == 401
        with server.http(key=new) as http:
            assert http.post("/v1/chat/completions", json=body).status_code == 200
