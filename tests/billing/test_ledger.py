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


def test_an_open_whose_caller_is_cancelled_is_closed_unused(db_url: str) -> None:
    """A request cancelled while its row commits never starts: nothing stays reserved."""

    async def go() -> None:
        db, ledger, keys = await _setup(db_url)
        try:
            _, key = await keys.create(KeyFields(name="f", budget_usd=1), {"name", "budget_usd"})
            waiting = [
                asyncio.create_task(ledger.open(_open(f"c{i}", key.id, 100))) for i in range(5)
            ]
            await asyncio.sleep(0)  # queued, not yet committed
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            # Cancelled after its row committed, before its caller resumed.
            enqueue = ledger._enqueue
            late: asyncio.Task[object] | None = None

            def enqueue_then_cancel(row: object) -> asyncio.Future[object]:
                future = enqueue(row)  # type: ignore[arg-type]
                if isinstance(row, OpenRow):
                    future.add_done_callback(lambda _: late.cancel())  # type: ignore[union-attr]
                return future

            ledger._enqueue = enqueue_then_cancel  # type: ignore[method-assign]
            late = asyncio.create_task(ledger.open(_open("late", key.id, 100)))
            await asyncio.gather(late, return_exceptions=True)
            assert late.cancelled()
            ledger._enqueue = enqueue  # type: ignore[method-assign]
            await ledger.stop()  # commits everything queued
            assert await ledger.open_rows("inst") == []
            record = await keys.get(key.id)
            assert (record.reserved_nanos, record.spent_nanos) == (0, 0)
            from sqlalchemy import select

            from tokenwell.billing.db import requests

            async with db.engine.connect() as conn:
                rows = (await conn.execute(select(requests.c.id, requests.c.status))).all()
            statuses = {r.id: r.status for r in rows}
            assert set(statuses.values()) <= {"client_disconnected"}
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_an_open_cancelled_as_its_commit_fails_is_just_cancelled(sqlite_url: str) -> None:
    """The caller sees its cancellation, not the failed commit's error (the
    request was never admitted: there is nothing to close)."""

    async def go() -> None:
        db, ledger, _ = await _setup(sqlite_url)
        try:

            async def failing(batch: object) -> list[object]:
                raise RuntimeError("the database went away")

            ledger._commit = failing  # type: ignore[method-assign,assignment]
            enqueue = ledger._enqueue
            task: asyncio.Task[object] | None = None

            def enqueue_then_cancel(row: object) -> asyncio.Future[object]:
                future = enqueue(row)  # type: ignore[arg-type]
                future.add_done_callback(lambda _: task.cancel())  # type: ignore[union-attr]
                return future

            ledger._enqueue = enqueue_then_cancel  # type: ignore[method-assign]
            task = asyncio.create_task(ledger.open(_open("gone", "key_x", 100)))
            await asyncio.gather(task, return_exceptions=True)
            assert task.cancelled()
            ledger._enqueue = enqueue  # type: ignore[method-assign]
            del ledger._commit
            assert await ledger.open_rows("inst") == []
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_key_lookups_are_single_flight_and_refreshed_in_the_background(db_url: str) -> None:
    async def go() -> None:
        db, ledger, _ = await _setup(db_url)
        keys = KeyStore(db, KeyHasher("s"), cache_seconds=0.2)
        reads = 0
        load = keys._load

        async def counting(digest: str) -> object:
            nonlocal reads
            reads += 1
            return await load(digest)

        keys._load = counting  # type: ignore[method-assign]
        try:
            secret, key = await keys.create(KeyFields(name="g"), {"name"})
            found = await asyncio.gather(*[keys.lookup(secret) for _ in range(64)])
            assert {f.id for f in found if f is not None} == {key.id}
            assert reads == 1
            await asyncio.sleep(0.25)  # stale: answered at once, refreshed once behind
            found = await asyncio.gather(*[keys.lookup(secret) for _ in range(64)])
            assert all(f is not None for f in found)
            await asyncio.sleep(0.05)
            assert reads == 2
            # An update through this store is seen at once; unknown keys are not cached as known.
            await keys.update(key.id, KeyFields(rpm=7), {"rpm"})
            assert (await keys.lookup(secret)).rpm == 7  # type: ignore[union-attr]
            assert await keys.lookup(secret + "x") is None
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_opens_commit_without_waiting_closes(db_url: str) -> None:
    """An admission waits for a short commit of opens, not for queued closes."""

    async def go() -> None:
        db, ledger, keys = await _setup(db_url)
        batches: list[list[str]] = []
        commit = ledger._commit

        async def recording(batch: list) -> list:  # type: ignore[type-arg]
            batches.append([type(op.row).__name__ for op in batch])
            return await commit(batch)

        ledger._commit = recording  # type: ignore[method-assign]
        try:
            _, key = await keys.create(KeyFields(name="h", budget_usd=1), {"name", "budget_usd"})
            await asyncio.gather(*[ledger.open(_open(f"a{i}", key.id, 10)) for i in range(10)])
            batches.clear()
            closes = [ledger.enqueue_close(_close(f"a{i}", key.id, 5, 10)) for i in range(10)]
            opened = await asyncio.gather(
                *[ledger.open(_open(f"b{i}", key.id, 10)) for i in range(10)]
            )
            assert all(a.ok for a in opened)
            assert batches[0] == ["OpenRow"] * 10
            assert all(await asyncio.gather(*closes))  # and the closes follow
            assert sum(b.count("CloseRow") for b in batches) == 10
            record = await keys.get(key.id)
            assert (record.spent_nanos, record.reserved_nanos) == (50, 100)
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_request_ids_are_unique_and_ordered_by_time() -> None:
    import time

    from tokenwell.billing.accounting import new_request_id

    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 28 and i.startswith("req_") for i in ids)
    time.sleep(0.002)
    later = new_request_id()
    assert later[:16] > max(ids)[:16]  # the time part orders them


def test_batches_of_one_key_and_of_several_bill_each_key(db_url: str) -> None:
    """Batches of one key (one statement on PostgreSQL) and mixed ones add up alike."""

    async def go() -> None:
        from tokenwell.billing.keys import MASTER_ID

        db, ledger, keys = await _setup(db_url)
        try:
            _, a = await keys.create(KeyFields(name="a", budget_usd=1), {"name", "budget_usd"})
            _, b = await keys.create(KeyFields(name="b", budget_usd=1), {"name", "budget_usd"})
            owners = [a.id] * 6 + [b.id] * 3 + [MASTER_ID] * 2
            # One key per batch, then all mixed together.
            for batch in ([o for o in owners if o == a.id], owners):
                tag = len(batch)
                opened = await asyncio.gather(
                    *[ledger.open(_open(f"m{tag}_{i}", o, 100)) for i, o in enumerate(batch)]
                )
                assert all(x.ok for x in opened)
                closed = await asyncio.gather(
                    *[
                        ledger.close(_close(f"m{tag}_{i}", o, 10 + i, 100))
                        for i, o in enumerate(batch)
                    ]
                )
                assert all(closed)
            spent_a = sum(10 + i for i in range(6)) * 2
            spent_b = sum(10 + i for i in range(6, 9))
            assert ((await keys.get(a.id)).spent_nanos, (await keys.get(a.id)).reserved_nanos) == (
                spent_a,
                0,
            )
            assert ((await keys.get(b.id)).spent_nanos, (await keys.get(b.id)).reserved_nanos) == (
                spent_b,
                0,
            )
            # Closing again changes nothing.
            again = await ledger.close(_close("m6_0", a.id, 10, 100))
            assert again is False
            assert (await keys.get(a.id)).spent_nanos == spent_a
            assert await ledger.open_rows("inst") == []
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_sqlite_wal_is_checkpointed_off_the_commit_path(tmp_path: object) -> None:
    from pathlib import Path

    async def go() -> None:
        path = Path(str(tmp_path)) / "ledger.db"
        db, ledger, keys = await _setup(f"sqlite:///{path}")
        checkpointer = ledger._checkpointer
        assert checkpointer is not None
        checkpointer.interval = 0.05
        try:
            with db.sync_engine.connect() as conn:  # the ledger's commits never checkpoint
                assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
            _, key = await keys.create(KeyFields(name="w", budget_usd=1), {"name", "budget_usd"})
            for round_ in range(20):
                ids = [f"w{round_}_{i}" for i in range(50)]
                await asyncio.gather(*[ledger.open(_open(i, key.id, 1)) for i in ids])
                await asyncio.gather(*[ledger.close(_close(i, key.id, 1, 1)) for i in ids])
            # Its first round waits the interval it started with (1 s).
            for _ in range(100):
                if checkpointer.checkpoints:
                    break
                await asyncio.sleep(0.05)
            assert checkpointer.checkpoints > 0
            await ledger.stop()
            assert path.with_name("ledger.db-wal").stat().st_size == 0  # truncated at stop
        finally:
            await ledger.stop()
            await db.close()
        check = Database(f"sqlite:///{path}")
        try:
            record = await KeyStore(check, KeyHasher("s"), cache_seconds=0).get(key.id)
            assert (record.spent_nanos, record.reserved_nanos) == (1000, 0)
        finally:
            await check.close()

    asyncio.run(go())


def test_batched_rows_keep_their_values_and_types(db_url: str) -> None:
    """Rows written through the one-statement batches read back exactly."""

    async def go() -> None:
        from sqlalchemy import select

        from tokenwell.billing.db import requests

        db, ledger, keys = await _setup(db_url)
        try:
            _, key = await keys.create(KeyFields(name="t", budget_usd=1), {"name", "budget_usd"})
            opened = OpenRow("t1", key.id, "m/x", False, True, 2, 7, 12345, "inst", user=None)
            other = OpenRow("t2", key.id, "m", True, False, 1, 3, 5, "inst", user="ü-1")
            await asyncio.gather(ledger.open(opened), ledger.open(other))
            close = CloseRow(
                "t1", key.id, "length", 7, 2, 9, 4321, 12345, estimated=True,
                queue_ms=1.25, ttft_ms=None, total_ms=10.5, error=None,
            )  # fmt: skip
            assert await ledger.close(close)
            async with db.engine.connect() as conn:
                rows = {r.id: r for r in (await conn.execute(select(requests))).all()}
            t1, t2 = rows["t1"], rows["t2"]
            assert (t1.stream, t1.include_usage, t1.n, t1.model, t1.user) == (
                False, True, 2, "m/x", None,
            )  # fmt: skip
            assert (t1.status, t1.prompt_tokens, t1.cached_tokens, t1.completion_tokens) == (
                "length", 7, 2, 9,
            )  # fmt: skip
            assert (t1.cost_nanos, t1.reserved_nanos, t1.estimated) == (4321, 12345, True)
            assert (t1.queue_ms, t1.ttft_ms, t1.total_ms, t1.error) == (1.25, None, 10.5, None)
            assert t1.created_at == opened.created_at and t1.closed_at == close.closed_at
            assert (t2.status, t2.user, t2.stream, t2.estimated) == ("open", "ü-1", True, False)
            record = await keys.get(key.id)
            assert (record.spent_nanos, record.reserved_nanos) == (4321, 5)
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_a_lost_postgresql_connection_loses_no_close_and_admits_again(pg_url: str) -> None:
    """The server ends the ledger's connections between commits (a restart, a
    failover): an open then fails cleanly (its request gets a 503, nothing is
    written), a close is retried until it commits, once, and the ledger
    reconnects for what comes next."""
    import psycopg
    import pytest

    from tokenwell.billing.ledger import LedgerUnavailable

    def terminate_ledger_connections() -> int:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        return len(rows)

    async def go() -> None:
        db, ledger, keys = await _setup(pg_url)
        try:
            _, key = await keys.create(KeyFields(name="a", budget_usd=1), {"name", "budget_usd"})
            opened = await asyncio.gather(
                *[ledger.open(_open(f"p{i}", key.id, 100)) for i in range(3)]
            )
            assert all(x.ok for x in opened)
            assert terminate_ledger_connections() >= 1
            with pytest.raises(LedgerUnavailable):
                await ledger.open(_open("refused", key.id, 100))
            # Reconnected: the closes commit, each once.
            closed = await asyncio.wait_for(
                asyncio.gather(*[ledger.close(_close(f"p{i}", key.id, 40, 100)) for i in range(2)]),
                timeout=30,
            )
            assert closed == [True, True]
            # Lost again, now under a close: retried until it commits.
            assert terminate_ledger_connections() >= 1
            assert await asyncio.wait_for(ledger.close(_close("p2", key.id, 40, 100)), timeout=30)
            assert (await ledger.open(_open("after", key.id, 100))).ok
            assert await ledger.close(_close("after", key.id, 40, 100))
            after = await keys.get(key.id)
            assert (after.spent_nanos, after.reserved_nanos) == (160, 0)
            assert await ledger.open_rows("inst") == []
            async with db.engine.connect() as conn:
                from sqlalchemy import text

                ids = (await conn.execute(text("SELECT id FROM requests ORDER BY id"))).scalars()
                assert sorted(ids) == ["after", "p0", "p1", "p2"]  # nothing of the refused open
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())


def test_sqlite_commits_locked_by_another_writer_wait_off_the_event_loop(tmp_path: object) -> None:
    """SQLite batches commit on the event loop, and never wait there for a lock:
    while another process's writer (the CLI, say) holds the database, the batch
    waits on the ledger's thread, the loop keeps serving, and it commits once
    the lock is released."""
    import sqlite3
    import time
    from pathlib import Path

    path = Path(str(tmp_path)) / "ledger.db"

    async def go() -> None:
        db, ledger, keys = await _setup(f"sqlite:///{path}")
        try:
            _, key = await keys.create(KeyFields(name="w", budget_usd=1), {"name", "budget_usd"})
            assert (await ledger.open(_open("free", key.id, 100))).ok
            assert ledger.lock_waits == 0  # committed on the loop
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # holds the write lock
            held = time.monotonic()
            opening = asyncio.create_task(ledger.open(_open("locked", key.id, 100)))
            ticks = 0
            while time.monotonic() - held < 0.5:
                await asyncio.sleep(0.01)
                ticks += 1
            assert not opening.done()  # still waiting for the lock...
            assert ticks >= 20  # ...but not on the event loop
            other.execute("COMMIT")
            other.close()
            assert (await asyncio.wait_for(opening, timeout=10)).ok
            assert ledger.lock_waits == 1
            assert await ledger.close(_close("locked", key.id, 40, 100))
            assert await ledger.close(_close("free", key.id, 40, 100))
            after = await keys.get(key.id)
            assert (after.spent_nanos, after.reserved_nanos) == (80, 0)
        finally:
            await ledger.stop()
            await db.close()

    asyncio.run(go())
