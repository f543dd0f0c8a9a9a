"""Budgets per day, week and month: calendar windows, resets on a fake clock, the 429."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.billing.inprocess import App, running
from tests.support import MASTER
from tokenwell.billing import periods


def _ts(when: str) -> float:
    return datetime.fromisoformat(when).timestamp()


def test_windows_in_utc_and_in_a_time_zone() -> None:
    # Wednesday 2026-03-04, 10:00 UTC: the week began on Monday the 2nd.
    w = periods.windows(_ts("2026-03-04T10:00:00+00:00"))
    assert w.day == _ts("2026-03-04T00:00:00+00:00")
    assert w.week == _ts("2026-03-02T00:00:00+00:00")
    assert w.month == _ts("2026-03-01T00:00:00+00:00")
    # 23:30 UTC on the 31st is already April 1st in Tokyo.
    tokyo = periods.windows(_ts("2026-03-31T23:30:00+00:00"), "Asia/Tokyo")
    assert tokyo.day == tokyo.month == _ts("2026-04-01T00:00:00+09:00")
    assert periods.next_reset("month", _ts("2026-12-15T00:00:00+00:00")) == _ts(
        "2027-01-01T00:00:00+00:00"
    )
    assert periods.next_reset("week", _ts("2026-03-08T12:00:00+00:00")) == _ts(
        "2026-03-09T00:00:00+00:00"
    )
    assert periods.next_reset("total", 0.0) is None


def test_a_day_with_a_clock_change_is_23_hours() -> None:
    # New York springs forward on 2026-03-08.
    noon = _ts("2026-03-08T12:00:00-04:00")
    start = periods.windows(noon, "America/New_York").day
    end = periods.next_reset("day", noon, "America/New_York")
    assert start == _ts("2026-03-08T00:00:00-05:00")
    assert end is not None and end - start == 23 * 3600


async def _cost(app: App) -> Decimal:
    """What one request of the tests costs (scripted-64 cut at 20 tokens: its reservation)."""
    r = await app.chat(MASTER, max_tokens=20)
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 20
    return Decimal(usage["prompt_tokens"]) / 10**6 + Decimal(2 * 20) / 10**6


async def _spend(app: App, key: str, count: int) -> list[httpx.Response]:
    return [await app.chat(key, max_tokens=20) for _ in range(count)]


def test_a_daily_budget_resets_at_midnight_exactly(tmp_path: Path, db_url: str) -> None:
    async def go() -> None:
        async with running(tmp_path, db_url, "2026-03-01T23:59:00+00:00") as app:
            cost = await _cost(app)
            key = await app.create_key(
                budgets=[
                    {"usd": str(cost * 3), "period": "day"},
                    {"usd": str(cost * 7), "period": "month"},
                ]
            )
            secret = key["key"]
            assert [r.status_code for r in await _spend(app, secret, 4)] == [200, 200, 200, 429]
            refused = (await _spend(app, secret, 1))[0]
            error = refused.json()["error"]
            assert error["code"] == "insufficient_quota" and "daily budget" in error["message"]
            assert refused.headers["x-tokenwell-budget-period"] == "day"
            assert refused.headers["retry-after"] == "60"  # a minute to midnight
            usage = await app.usage(secret)
            day, month = usage["budgets"]
            assert (day["period"], month["period"]) == ("day", "month")
            assert Decimal(day["spent_usd"]) == cost * 3 and day["remaining_usd"] == "0.0"
            assert day["resets_at"] == "2026-03-02T00:00:00+00:00"
            assert month["resets_at"] == "2026-04-01T00:00:00+00:00"

            app.clock.set("2026-03-02T00:00:00+00:00")  # midnight: three more, not four
            day = (await app.usage(secret))["budgets"][0]
            assert day["spent_usd"] == "0.0" and Decimal(day["remaining_usd"]) == cost * 3
            assert [r.status_code for r in await _spend(app, secret, 4)] == [200, 200, 200, 429]

            app.clock.set("2026-03-03T08:00:00+00:00")  # the month's budget runs out first
            statuses = [r.status_code for r in await _spend(app, secret, 2)]
            assert statuses == [200, 429]
            refused = (await _spend(app, secret, 1))[0]
            assert refused.headers["x-tokenwell-budget-period"] == "month"
            retry = int(refused.headers["retry-after"])
            assert retry == _ts("2026-04-01T00:00:00+00:00") - app.clock.now

            app.clock.set("2026-04-01T00:00:00+00:00")
            assert (await _spend(app, secret, 1))[0].status_code == 200
            assert Decimal((await app.usage(secret))["spend_usd"]) == cost * 8
            record = (
                await app.http.get(
                    f"/admin/keys/{key['id']}", headers={"Authorization": f"Bearer {MASTER}"}
                )
            ).json()
            assert Decimal(record["spend_usd"]) == cost * 8  # a lifetime total, never reset
            assert record["reserved_usd"] == "0.0"

    asyncio.run(go())


def test_a_key_in_another_time_zone_resets_at_its_own_midnight(
    tmp_path: Path, sqlite_url: str
) -> None:
    async def go() -> None:
        # 14:59:30 UTC is 23:59:30 in Tokyo.
        async with running(tmp_path, sqlite_url, "2026-06-10T14:59:30+00:00") as app:
            cost = await _cost(app)
            key = await app.create_key(
                budgets=[{"usd": str(cost), "period": "day"}], timezone="Asia/Tokyo"
            )
            assert key["timezone"] == "Asia/Tokyo"
            first, second = await _spend(app, key["key"], 2)
            assert (first.status_code, second.status_code) == (200, 429)
            assert second.headers["retry-after"] == "30"
            (day,) = (await app.usage(key["key"]))["budgets"]
            assert day["resets_at"] == "2026-06-10T15:00:00+00:00"
            app.clock.set("2026-06-10T15:00:00+00:00")
            assert (await _spend(app, key["key"], 1))[0].status_code == 200

    asyncio.run(go())


def test_budgets_set_and_replaced_through_the_admin_api(tmp_path: Path, sqlite_url: str) -> None:
    async def go() -> None:
        async with running(tmp_path, sqlite_url, "2026-06-10T12:00:00+00:00") as app:
            auth = {"Authorization": f"Bearer {MASTER}"}
            key = await app.create_key(
                budget_usd="50",
                budgets=[{"usd": "5", "period": "day"}, {"usd": 20, "period": "week"}],
            )
            assert key["budget_usd"] == "50.0"
            assert [(b["period"], b["usd"]) for b in key["budgets"]] == [
                ("total", "50.0"),
                ("day", "5.0"),
                ("week", "20.0"),
            ]
            # The list is the whole set: what it leaves out has no limit any more.
            patched = await app.http.patch(
                f"/admin/keys/{key['id']}",
                json={"budgets": [{"usd": "9.5", "period": "month"}]},
                headers=auth,
            )
            assert patched.status_code == 200, patched.text
            body = patched.json()
            assert body["budget_usd"] is None
            assert [(b["period"], b["usd"]) for b in body["budgets"]] == [("month", "9.5")]
            for bad in (
                {"budgets": [{"usd": "1", "period": "day"}, {"usd": "2", "period": "day"}]},
                {"budgets": [{"usd": "1", "period": "year"}]},
                {"budgets": [{"usd": "-1", "period": "day"}]},
                {"budgets": [{"usd": "1", "period": "total"}], "budget_usd": "2"},
                {"timezone": "Mars/Olympus"},
            ):
                r = await app.http.patch(f"/admin/keys/{key['id']}", json=bad, headers=auth)
                assert r.status_code == 400, (bad, r.text)
                assert r.json()["error"]["type"] == "invalid_request_error"

    asyncio.run(go())


@pytest.mark.parametrize("period", ["week"])
def test_a_weekly_budget_resets_on_monday(tmp_path: Path, sqlite_url: str, period: str) -> None:
    async def go() -> None:
        async with running(tmp_path, sqlite_url, "2026-06-14T23:00:00+00:00") as app:  # Sunday
            cost = await _cost(app)
            key = await app.create_key(budgets=[{"usd": str(cost), "period": period}])
            assert [r.status_code for r in await _spend(app, key["key"], 2)] == [200, 429]
            await app.usage(key["key"])  # settled: a request in flight holds its reservation
            app.clock.set("2026-06-15T00:00:00+00:00")
            assert [r.status_code for r in await _spend(app, key["key"], 2)] == [200, 429]
            assert datetime.fromtimestamp(app.clock.now, UTC).weekday() == 0

    asyncio.run(go())
