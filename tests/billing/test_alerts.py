"""Alerts: budget thresholds and expiring keys, through the outbox, to a real receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from tests.billing.inprocess import App, running
from tests.billing.receiver import Receiver
from tests.support import MASTER, SCRIPTED_CONFIG, Server
from tokenwell.billing.alerts import sign

ADMIN = {"Authorization": f"Bearer {MASTER}"}
SECRET = "alert-secret-for-tests"


def _alerts(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": url,
        "secret": SECRET,
        "retry_base_seconds": 0.05,
        "poll_seconds": 0.05,
        **extra,
    }


async def _outbox(app: App) -> list[dict[str, Any]]:
    r = await app.http.get("/admin/alerts", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


async def _until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_thresholds_of_a_key_and_an_end_user_are_delivered_signed_and_retried(
    tmp_path: Path, db_url: str
) -> None:
    receiver = Receiver(statuses=[500, 503]).start()  # the first two attempts fail

    async def go() -> None:
        now = datetime.now(UTC).isoformat()
        async with running(tmp_path, db_url, now, alerts=_alerts(receiver.url)) as app:
            usage = (await app.chat(MASTER, max_tokens=20)).json()["usage"]
            cost = Decimal(usage["prompt_tokens"]) / 10**6 + Decimal(2 * 20) / 10**6
            key = await app.create_key(
                budgets=[{"usd": str(cost * 10), "period": "day"}],
                end_user_budget={"usd": str(cost * 2), "period": "total"},
            )
            for i in range(10):
                body: dict[str, Any] = {"max_tokens": 20}
                if i < 2:
                    body["user"] = "kim"
                assert (await app.chat(key["key"], **body)).status_code == 200

            async def all_delivered() -> bool:
                rows = await _outbox(app)
                return len(rows) == 6 and all(r["status"] == "delivered" for r in rows)

            await _until(all_delivered)
            rows = await _outbox(app)
            assert sum(r["attempts"] for r in rows) == 8  # two retries
            got = sorted(
                (r["body"]["scope"], r["body"]["period"], r["body"]["threshold"]) for r in rows
            )
            assert got == [
                ("end_user", "total", 0.5),
                ("end_user", "total", 0.8),
                ("end_user", "total", 1.0),
                ("key", "day", 0.5),
                ("key", "day", 0.8),
                ("key", "day", 1.0),
            ]
            kim = [r["body"] for r in rows if r["body"]["scope"] == "end_user"]
            assert {b["end_user"] for b in kim} == {"kim"}
            day = {r["body"]["threshold"]: r["body"] for r in rows if r["body"]["scope"] == "key"}
            # Each by the commit that crossed it (closes commit in batches: the
            # spend it shows may include a close or two after the line).
            assert cost * 5 <= Decimal(day[0.5]["spent_usd"]) <= cost * 10
            assert cost * 8 <= Decimal(day[0.8]["spent_usd"]) <= cost * 10
            assert Decimal(day[1.0]["spent_usd"]) == cost * 10

    try:
        asyncio.run(go())
    finally:
        receiver.stop()
    by_id: dict[str, list[bytes]] = defaultdict(list)
    for headers, body in receiver.posts:
        assert headers["content-type"] == "application/json"
        assert headers["x-tokenwell-signature"] == sign(SECRET, body)
        # What a receiver computes: HMAC-SHA256 of the body with the secret, in hex.
        mac = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-tokenwell-signature"], mac)
        assert headers["x-tokenwell-event"] == "budget.threshold"
        by_id[headers["x-tokenwell-delivery"]].append(body)
    assert len(receiver.posts) == 8 and len(by_id) == 6
    for alert_id, bodies in by_id.items():
        assert len(set(bodies)) == 1  # the same bytes on every attempt
        assert f'"id":"{alert_id}"'.encode() in bodies[0]
    assert sorted(len(b) for b in by_id.values()) == [1, 1, 1, 1, 2, 2]


def test_a_key_about_to_expire_is_announced_once(tmp_path: Path, sqlite_url: str) -> None:
    receiver = Receiver().start()

    async def go() -> None:
        now = datetime.now(UTC)
        config = _alerts(receiver.url, expiry_warning_seconds=7200, expiry_scan_seconds=0.05)
        async with running(tmp_path, sqlite_url, now.isoformat(), alerts=config) as app:
            soon = (now + timedelta(hours=1)).isoformat()
            later = (now + timedelta(days=30)).isoformat()
            key = await app.create_key(name="soon", expires_at=soon)
            await app.create_key(name="later", expires_at=later)

            async def announced() -> bool:
                return len(receiver.posts) >= 1

            await _until(announced)
            await asyncio.sleep(0.5)  # ten more scans: no second alert
            (alert,) = receiver.bodies()
            assert alert["type"] == "key.expiring" and alert["key_id"] == key["id"]
            assert alert["expires_at"] == datetime.fromisoformat(soon).isoformat()

    try:
        asyncio.run(go())
    finally:
        receiver.stop()


def test_an_alert_committed_before_a_kill_9_is_delivered_once_after_restart(
    tmp_path: Path,
) -> None:
    receiver = Receiver()  # not listening yet: every delivery before the kill fails
    config = SCRIPTED_CONFIG + (
        f'\n[alerts]\nurl = "{receiver.url}"\nsecret = "{SECRET}"\n'
        "thresholds = [1.0]\nretry_base_seconds = 0.2\npoll_seconds = 0.05\n"
    )
    server = Server(tmp_path, config).start()
    try:
        key = server.create_key(name="alerted", budget_usd="0.000047")
        with server.http(key=key["key"]) as http:
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": "scripted-64",
                    "max_tokens": 20,
                    "messages": [{"role": "user", "content": "go"}],
                },
            )
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 7
        deadline = time.monotonic() + 30
        with server.http() as http:
            while True:  # committed, and at least one delivery failed
                rows = http.get("/admin/alerts").json()["data"]
                if rows and rows[0]["attempts"] >= 1:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.05)
        (pending,) = rows
        assert pending["status"] == "pending" and "ConnectError" in pending["last_error"]
        server.kill9()
        receiver.start()
        server.start()
        deadline = time.monotonic() + 30
        while not receiver.posts:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        time.sleep(1.0)  # a second delivery would come within this
        with server.http() as http:
            (row,) = http.get("/admin/alerts").json()["data"]
    finally:
        server.stop()
        receiver.stop()
    assert len(receiver.posts) == 1
    headers, body = receiver.posts[0]
    assert headers["x-tokenwell-signature"] == sign(SECRET, body)
    assert headers["x-tokenwell-delivery"] == pending["id"] == row["id"]
    assert row["status"] == "delivered"
    sent = receiver.bodies()[0]
    assert sent["id"] == pending["id"] and sent["threshold"] == 1.0
    assert sent["key_id"] == key["id"] and sent["period"] == "total"
    assert httpx.codes.is_success(200)
