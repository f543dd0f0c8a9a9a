"""Key rotation with a grace period, and the audit trail of key changes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner

from tests.billing.inprocess import running
from tests.support import KEY_SECRET, MASTER
from tokenwell.cli import main

ADMIN = {"Authorization": f"Bearer {MASTER}"}


def test_rotation_keeps_the_key_and_the_old_secret_until_its_grace_ends(
    tmp_path: Path, db_url: str
) -> None:
    async def go() -> str:
        async with running(tmp_path, db_url, "2026-05-05T12:00:00+00:00") as app:
            key = await app.create_key(budgets=[{"usd": "5", "period": "day"}], rpm=1000)
            old = key["key"]
            assert (await app.chat(old, max_tokens=5)).status_code == 200
            rotated = await app.http.post(
                f"/admin/keys/{key['id']}/rotate", json={"grace_seconds": 3600}, headers=ADMIN
            )
            assert rotated.status_code == 200, rotated.text
            body = rotated.json()
            new = body["key"]
            assert new != old and new.startswith("tw-")
            assert body["id"] == key["id"] and body["prefix"] == new[:10]
            assert body["budgets"][0]["usd"] == "5.0" and body["rpm"] == 1000
            assert body["previous_key_expires_at"] is not None
            # Both secrets are the same key: same history, same limits.
            for secret in (old, new):
                assert (await app.chat(secret, max_tokens=5)).status_code == 200
            usage = await app.usage(new)
            assert usage["key_id"] == key["id"] and usage["requests"] == 3

            # A second rotation with no grace: the secret it replaces stops at once,
            # and the one replaced before it too (a key has at most two).
            again = await app.http.post(
                f"/admin/keys/{key['id']}/rotate", json={"grace_seconds": 0}, headers=ADMIN
            )
            newest = again.json()["key"]
            for gone, why in ((old, "Incorrect API key"), (new, "grace period has ended")):
                refused = await app.chat(gone, max_tokens=5)
                assert refused.status_code == 401
                assert why in refused.json()["error"]["message"]
            assert (await app.chat(newest, max_tokens=5)).status_code == 200

            deleted = await app.http.delete(f"/admin/keys/{key['id']}", headers=ADMIN)
            assert deleted.status_code == 200
            assert (await app.chat(newest, max_tokens=5)).status_code == 401
            late = await app.http.post(f"/admin/keys/{key['id']}/rotate", json={}, headers=ADMIN)
            assert late.status_code == 400 and late.json()["error"]["code"] == "key_revoked"
            for bad in ({"grace_seconds": -1}, {"grace_seconds": "1h"}, {"grace": 5}, [1]):
                r = await app.http.post(f"/admin/keys/{key['id']}/rotate", json=bad, headers=ADMIN)
                assert r.status_code == 400, (bad, r.text)
            missing = await app.http.post("/admin/keys/key_nope/rotate", json={}, headers=ADMIN)
            assert missing.status_code == 404

            trail = await app.http.get("/admin/audit", params={"key_id": key["id"]}, headers=ADMIN)
            entries = trail.json()["data"]
            assert [e["action"] for e in entries] == [
                "key.revoke",
                "key.rotate",
                "key.rotate",
                "key.create",
            ]
            assert all(e["actor"].startswith("admin-api master key from") for e in entries)
            assert entries[2]["detail"]["grace_seconds"] == 3600
            assert entries[2]["detail"]["previous_prefix"] == old[:10]
            assert entries[3]["detail"]["budgets"] == [{"usd": "5", "period": "day"}]
            assert old not in trail.text and new not in trail.text  # never a secret
            only = await app.http.get(
                "/admin/audit", params={"action": "key.rotate", "limit": "1"}, headers=ADMIN
            )
            assert [e["action"] for e in only.json()["data"]] == ["key.rotate"]
            bad = await app.http.get("/admin/audit", params={"action": "x"}, headers=ADMIN)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "action"
            return str(key["id"])

    asyncio.run(go())


def test_keys_rotate_on_the_command_line(tmp_path: Path, sqlite_url: str) -> None:
    env = {
        "TOKENWELL_DATABASE_URL": sqlite_url,
        "TOKENWELL_KEY_SECRET": KEY_SECRET,
        "TOKENWELL_DATA_DIR": str(tmp_path / "data"),
    }
    runner = CliRunner()
    made = runner.invoke(main, ["keys", "create", "--name", "cli", "--json"], env=env)
    assert made.exit_code == 0, made.output
    key = json.loads(made.output)
    done = runner.invoke(main, ["keys", "rotate", key["id"], "--grace", "24h", "--json"], env=env)
    assert done.exit_code == 0, done.output
    rotated = json.loads(done.output)
    assert rotated["id"] == key["id"] and rotated["key"] != key["key"]
    bad = runner.invoke(main, ["keys", "rotate", key["id"], "--grace", "soon"], env=env)
    assert bad.exit_code != 0 and "duration" in bad.output

    async def trail() -> list[dict]:  # type: ignore[type-arg]
        async with running(tmp_path, sqlite_url, "2026-05-05T12:00:00+00:00") as app:
            r = await app.http.get("/admin/audit", headers=ADMIN)
            return r.json()["data"]  # type: ignore[no-any-return]

    entries = asyncio.run(trail())
    assert [e["action"] for e in entries] == ["key.rotate", "key.create"]
    assert all(e["actor"].startswith("cli ") for e in entries)
    assert entries[0]["detail"]["grace_seconds"] == 86400
