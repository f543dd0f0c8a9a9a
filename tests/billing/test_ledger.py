"""The ledger on SQLite and PostgreSQL: write-ahead, exactly-once, atomic budgets."""

from __future__ import annotations

import asyncio

from tokenwell.billing.db import Database
from tokenwell.billing.keys import KeyFields, KeyHasher, KeyStore
from tokenwell.billing.ledger import CloseRow, Ledger, OpenRow


async def _setup(url: str) -> tuple[Database, Ledger, KeyStore]:
    db = Database(url)
    await db.migrate()
    await db.migrate()  # idempotent
    ledger = Ledger(db)
    await ledger.start()
    return db, ledger, KeyStore(db, KeyHasher("s"), cache_seconds=0)


def _open(rid: str, key: str, reserve: int) -> OpenRow:
    return OpenRow(rid, key, "m", True, False, 1, 10, reserve, "inst")


def _close(rid: str, key: str, cost: int, reserve: int) -> CloseRow:
    return CloseRow(rid, key, "completed", 10, 0, 5, cost, reserve)


def test_open_close_exactly_once(db_url: str) -> None:
    async def go() -> None:
        db, ledger, keys = await _setup(db_url)
        try:
            _, key = await keys.create(KeyFields(name="a", budget_usd=1), {"name", "budget_usd"})
            assert (await ledger.open(_open("r1", key.id, 100))).ok
            assert (await keys.get(key.id)).reserved_nanos == 100
            first, second = await asyncio.gather(
                ledger.close(_close("r1", key.id, 40, 100)),
                ledger.close(_close("r1", key.id, 40, 100)),
            )
            assert sorted([first, second]) == [False, True]
            after = await keys.get(key.id)
            assert (after.spent_nanos, after.reserved_nanos) == (40, 0)
            assert len(await ledger.open_rows("inst")) == 0
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_concurrent_reservations_never_pass_the_budget(db_url: str) -> None:
    async def go() -> None:
        db, ledger, keys = await _setup(db_url)
        try:
            # A budget of 1000 nanos: ten reservations of 100 fit, the other 40 do not.
            _, key = await keys.create(KeyFields(name="b"), {"name"})
            from sqlalchemy import update

            from tokenwell.billing.db import api_keys

            async with db.engine.begin() as conn:
                await conn.execute(update(api_keys).values(budget_nanos=1000))
            results = await asyncio.gather(
                *[ledger.open(_open(f"r{i}", key.id, 100)) for i in range(50)]
            )
            assert sum(r.ok for r in results) == 10
            assert {r.reason for r in results if not r.ok} == {"budget"}
            record = await keys.get(key.id)
            assert record.reserved_nanos == 1000
            # Rejected requests are in the ledger too, closed as such.
            rows = await ledger.open_rows("inst")
            assert len(rows) == 10
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_revoked_and_expired_keys_are_refused_in_the_same_transaction(db_url: str) -> None:
    async def go() -> None:
        db, ledger, keys = await _setup(db_url)
        try:
            _, key = await keys.create(KeyFields(name="c"), {"name"})
            await keys.revoke(key.id)
            assert (await ledger.open(_open("x1", key.id, 0))).reason == "revoked"
            _, old = await keys.create(
                KeyFields(name="d", expires_at="2001-01-01"), {"name", "expires_at"}
            )
            assert (await ledger.open(_open("x2", old.id, 0))).reason == "expired"
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_keys_are_stored_only_as_hashes(db_url: str) -> None:
    async def go() -> None:
        db, ledger, keys = await _setup(db_url)
        try:
            secret, _ = await keys.create(KeyFields(name="e"), {"name"})
            from sqlalchemy import select

            from tokenwell.billing.db import api_keys

            async with db.engine.connect() as conn:
                stored = [tuple(r) for r in (await conn.execute(select(api_keys))).all()]
            assert secret not in repr(stored)
            assert (await keys.lookup(secret)) is not None
            assert (await keys.lookup(secret + "x")) is None
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())
