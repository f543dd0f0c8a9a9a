"""End users: attributed on every wire API, their own budget and rates on a key, tags,
and the reports that group by them."""

from __future__ import annotations

import asyncio
import csv
import io
from decimal import Decimal
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from tests.billing.inprocess import App, running
from tests.support import KEY_SECRET, MASTER
from tokenwell.billing import periods
from tokenwell.cli import main

ADMIN = {"Authorization": f"Bearer {MASTER}"}


async def _cost(app: App) -> Decimal:
    usage = (await app.chat(MASTER, max_tokens=20)).json()["usage"]
    return Decimal(usage["prompt_tokens"]) / 10**6 + Decimal(2 * 20) / 10**6


async def _rows(app: App, key: dict[str, Any]) -> list[dict[str, Any]]:
    await app.usage(key["key"])  # every close committed
    r = await app.http.get("/admin/requests", params={"key_id": key["id"]}, headers=ADMIN)
    return r.json()["data"]  # type: ignore[no-any-return]


def test_each_end_user_has_the_budget_under_concurrency(tmp_path: Path, db_url: str) -> None:
    """20 concurrent requests for one end user whose daily budget covers 3, while
    another end user of the key goes on; then midnight frees them exactly."""

    async def go() -> None:
        async with running(tmp_path, db_url, "2026-05-05T23:00:00+00:00") as app:
            cost = await _cost(app)
            key = await app.create_key(
                budget_usd="1000", end_user_budget={"usd": str(cost * 3), "period": "day"}
            )
            assert key["end_user_budget"] == {"usd": str(cost * 3), "period": "day"}
            secret = key["key"]

            async def one(user: str) -> int:
                r = await app.chat(secret, max_tokens=20, user=user, metadata={"team": "a"})
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "insufficient_quota"
                    assert "'alice'" in r.json()["error"]["message"]
                    assert r.headers["x-tokenwell-budget-scope"] == "end_user"
                    assert r.headers["x-tokenwell-budget-period"] == "day"
                    midnight = periods.next_reset("day", app.clock.now)
                    assert midnight is not None
                    assert int(r.headers["retry-after"]) == midnight - app.clock.now
                return r.status_code

            alice = [one("alice") for _ in range(20)]
            bob = [one("bob") for _ in range(3)]
            statuses = await asyncio.gather(*alice, *bob)
            assert statuses[:20].count(200) == 3 and statuses[:20].count(429) == 17
            assert statuses[20:] == [200, 200, 200]

            mine = await app.usage(secret, user="alice")
            view = mine["end_user"]
            assert view["user"] == "alice" and view["requests"] == 3
            assert Decimal(view["spend_usd"]) == cost * 3
            assert view["budget"]["period"] == "day"
            assert Decimal(view["budget"]["spent_usd"]) == cost * 3
            assert view["budget"]["remaining_usd"] == "0.0"
            assert view["budget"]["resets_at"] == "2026-05-06T00:00:00+00:00"
            assert Decimal(mine["spend_usd"]) == cost * 6  # the key's own total: both
            assert mine["reserved_usd"] == "0.0"  # refusals gave the key's reservations back

            app.clock.set("2026-05-06T00:00:00+00:00")
            statuses = await asyncio.gather(*[one("alice") for _ in range(5)])
            assert sorted(statuses) == [200, 200, 200, 429, 429]

            rows = await _rows(app, key)
            billed = [r for r in rows if r["status"] == "length"]
            assert sorted(r["user"] for r in billed) == ["alice"] * 6 + ["bob"] * 3
            assert all(r["tags"] == {"team": "a"} for r in rows)
            refused = [r for r in rows if r["status"] == "rejected"]
            assert len(refused) == 19 and {r["error"] for r in refused} == {
                "refused: end_user_budget"
            }

    asyncio.run(go())


def test_end_user_rate_limits(tmp_path: Path, sqlite_url: str) -> None:
    async def go() -> None:
        async with running(tmp_path, sqlite_url, "2026-05-05T12:00:00+00:00") as app:
            key = await app.create_key(end_user_rpm=2, end_user_tpm=100_000)
            statuses = [(await app.chat(key["key"], user="carol")).status_code for _ in range(3)]
            assert statuses == [200, 200, 429]
            limited = await app.chat(key["key"], user="carol")
            error = limited.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and "each end user" in error["message"]
            assert int(limited.headers["retry-after"]) >= 1
            # Another end user, and requests that name none, are not held back.
            assert (await app.chat(key["key"], user="dan")).status_code == 200
            assert (await app.chat(key["key"])).status_code == 200
            view = (await app.usage(key["key"], user="carol"))["end_user"]
            assert (view["rpm"], view["tpm"], view["budget"]) == (2, 100_000, None)

    asyncio.run(go())


def test_every_wire_api_names_its_end_user_and_tags(tmp_path: Path, sqlite_url: str) -> None:
    async def go() -> None:
        async with running(tmp_path, sqlite_url, "2026-05-05T12:00:00+00:00") as app:
            key = await app.create_key()
            auth = {"Authorization": f"Bearer {key['key']}"}
            calls = [
                (
                    "/v1/responses",
                    {
                        "model": "scripted-64",
                        "input": "go",
                        "safety_identifier": "erin",
                        "user": "ignored-when-safety_identifier-is-set",
                        "metadata": {"team": "search"},
                    },
                ),
                (
                    "/v1/responses",
                    {"model": "scripted-64", "input": "go", "user": "frank"},
                ),
                (
                    "/v1/messages",
                    {
                        "model": "scripted-64",
                        "max_tokens": 20,
                        "messages": [{"role": "user", "content": "go"}],
                        "metadata": {"user_id": "grace"},
                    },
                ),
                (
                    "/v1/completions",
                    {"model": "scripted-64", "prompt": "go", "user": "heidi"},
                ),
            ]
            for path, body in calls:
                r = await app.http.post(path, json=body, headers=auth)
                assert r.status_code == 200, r.text
            rows = {r["api"]: r for r in await _rows(app, key)}
            users = sorted(r["user"] for r in await _rows(app, key))
            assert users == ["erin", "frank", "grace", "heidi"]
            assert rows["messages"]["user"] == "grace"

    asyncio.run(go())


def test_reports_group_by_end_user_and_tag_and_export_csv(tmp_path: Path, db_url: str) -> None:
    async def go() -> str:
        async with running(tmp_path, db_url, "2026-05-05T12:00:00+00:00") as app:
            key = await app.create_key()
            for user, team in (("ann", "red"), ("ann", "blue"), ("ben", "red"), (None, None)):
                body: dict[str, Any] = {"max_tokens": 20}
                if user:
                    body["user"] = user
                if team:
                    body["metadata"] = {"team": team, "env": "prod"}
                assert (await app.chat(key["key"], **body)).status_code == 200
            await app.usage(key["key"])
            q = {"key_id": key["id"]}
            by_user = await app.http.get(
                "/admin/usage", params={**q, "group_by": "end_user"}, headers=ADMIN
            )
            assert [(r["end_user"], r["requests"]) for r in by_user.json()["data"]] == [
                (None, 1),
                ("ann", 2),
                ("ben", 1),
            ] or [(r["end_user"], r["requests"]) for r in by_user.json()["data"]] == [
                ("ann", 2),
                ("ben", 1),
                (None, 1),
            ]
            by_tag = await app.http.get(
                "/admin/usage", params={**q, "group_by": "tag:team,end_user"}, headers=ADMIN
            )
            got = {(r["tag:team"], r["end_user"]): r["requests"] for r in by_tag.json()["data"]}
            assert got == {
                ("red", "ann"): 1,
                ("blue", "ann"): 1,
                ("red", "ben"): 1,
                (None, None): 1,
            }
            one = await app.http.get(
                "/admin/usage", params={**q, "group_by": "tag:team", "user": "ann"}, headers=ADMIN
            )
            assert {r["tag:team"] for r in one.json()["data"]} == {"red", "blue"}
            exported = await app.http.get(
                "/admin/usage",
                params={**q, "group_by": "end_user,tag:team", "format": "csv"},
                headers=ADMIN,
            )
            assert exported.status_code == 200
            assert exported.headers["content-type"].startswith("text/csv")
            lines = list(csv.DictReader(io.StringIO(exported.text)))
            assert {(r["end_user"], r["tag:team"]) for r in lines} == {
                ("ann", "red"),
                ("ann", "blue"),
                ("ben", "red"),
                ("", ""),
            }
            assert sum(Decimal(r["spend_usd"]) for r in lines) == sum(
                Decimal(r["spend_usd"]) for r in by_user.json()["data"]
            )
            for bad in ({"group_by": "tag:"}, {"group_by": "user"}, {"format": "xml"}):
                r = await app.http.get("/admin/usage", params=bad, headers=ADMIN)
                assert r.status_code == 400 and r.json()["error"]["param"] in (
                    "group_by",
                    "format",
                )
            return key["id"]

    key_id = asyncio.run(go())
    # The CLI reads the same ledger: tokenwell usage --by end_user --csv.
    result = CliRunner().invoke(
        main,
        ["usage", "--by", "end_user,tag:env", "--key", key_id, "--csv"],
        env={
            "TOKENWELL_DATABASE_URL": db_url,
            "TOKENWELL_KEY_SECRET": KEY_SECRET,
            "TOKENWELL_DATA_DIR": str(tmp_path / "data"),
        },
    )
    assert result.exit_code == 0, result.output
    lines = list(csv.DictReader(io.StringIO(result.output)))
    assert {(r["end_user"], r["tag:env"], r["requests"]) for r in lines} == {
        ("ann", "prod", "2"),
        ("ben", "prod", "1"),
        ("", "", "1"),
    }
