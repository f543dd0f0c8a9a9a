"""Stored responses (the Responses API's rows) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tokenwell.billing import responses
from tokenwell.billing.db import Database
from tokenwell.billing.responses import GROUP_ROWS, ResponseStore


def _response(rid: str, status: str = "completed") -> dict[str, Any]:
    return {"id": rid, "model": "m", "status": status, "output": [], "background": False}


@contextlib.asynccontextmanager
async def _store(url: str) -> AsyncIterator[ResponseStore]:
    """A store on a migrated database, closed after."""
    db = Database(url)
    await db.migrate()
    try:
        yield ResponseStore(db)
    finally:
        await db.close()


async def _put(store: ResponseStore, rid: str) -> None:
    await store.put("k", _response(rid), request_id=None, input_items=[], history=[])


def test_put_get_advance_update_delete(db_url: str) -> None:
    async def go() -> None:
        async with _store(db_url) as store:
            items = [{"type": "message", "role": "user", "content": "hi"}]
            await asyncio.gather(
                *(
                    store.put(
                        "k1",
                        _response(f"r{i}", "queued"),
                        request_id=None,
                        input_items=items,
                        history=items,
                    )
                    for i in range(5)
                )
            )
            got = await store.get("k1", "r3")
            assert got is not None and got.status == "queued" and got.input_items == items
            assert await store.get("k2", "r3") is None  # another key's: not found
            assert await store.advance(_response("r3", "in_progress"), "queued")
            assert not await store.advance(_response("r3", "in_progress"), "queued")
            await store.update(_response("r3", "completed"))
            got = await store.get("k1", "r3")
            assert got is not None and got.status == "completed"
            assert not await store.delete("k2", "r3")
            assert await store.delete("k1", "r3")
            assert await store.get("k1", "r3") is None

    asyncio.run(go())


def test_on_sqlite_a_locked_database_is_waited_for_off_the_event_loop(tmp_path: Path) -> None:
    """The store's statements run on the event loop (Database.run) and never wait
    there for a lock: while another writer holds the database, a put waits off
    the loop, the loop keeps serving, and it commits once the lock is released."""
    path = tmp_path / "ledger.db"

    async def go() -> None:
        async with _store(f"sqlite:///{path}") as store:
            await _put(store, "before")
            await store.flush()
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # holds the write lock
            held = time.monotonic()
            await _put(store, "locked")
            putting = asyncio.create_task(store.flush())
            ticks = 0
            while time.monotonic() - held < 0.5:
                await asyncio.sleep(0.01)
                ticks += 1
            assert not putting.done()  # still waiting for the lock...
            assert ticks >= 20  # ...but not on the event loop
            other.execute("COMMIT")
            other.close()
            await asyncio.wait_for(putting, timeout=10)
            assert await store.get("k", "locked") is not None

    asyncio.run(go())


def test_a_row_still_queued_is_waited_for_by_every_read_of_its_id(tmp_path: Path) -> None:
    """Read your writes: a response's last bytes may go out before its put has
    committed (ResponseStore.commits_in_step), so a read, update or delete of a
    row whose put is queued (here behind a lock) waits for that put; reads of
    other rows do not."""
    path = tmp_path / "ledger.db"

    async def go() -> None:
        async with _store(f"sqlite:///{path}") as store:
            assert store.commits_in_step
            await _put(store, "other")
            await store.flush()
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # holds the write lock
            await _put(store, "queued")
            putting = asyncio.create_task(store.flush())  # its row is queued
            await asyncio.sleep(0)
            reading = asyncio.create_task(store.get("k", "queued"))
            deleting = asyncio.create_task(store.delete("k", "queued"))
            assert await asyncio.wait_for(store.get("k", "other"), timeout=5) is not None
            await asyncio.sleep(0.3)
            assert not reading.done() and not deleting.done() and not putting.done()
            other.execute("COMMIT")
            other.close()
            await asyncio.wait_for(putting, timeout=10)
            got = await asyncio.wait_for(reading, timeout=10)
            assert got is not None and got.status == "completed"
            assert await asyncio.wait_for(deleting, timeout=10)  # deleted, not resurrected
            assert await store.get("k", "queued") is None

    asyncio.run(go())


def test_on_sqlite_rows_put_together_commit_together_and_flush_commits_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Puts within one commit window are one transaction; each row is readable
    as soon as its put returned (a read commits its group then, not at the
    window's end: here a window longer than the test's timeouts); a put that
    returned before the store was flushed is on disk after it, window or not."""
    monkeypatch.setattr(responses, "GROUP_SECONDS", 60.0)
    path = tmp_path / "ledger.db"

    async def go() -> None:
        async with _store(f"sqlite:///{path}") as store:
            for i in range(10):
                await _put(store, f"r{i}")
            assert store.commits == 0  # queued, in one window
            got = await asyncio.wait_for(store.get("k", "r7"), timeout=5)
            assert got is not None and got.status == "completed"
            assert store.commits == 1  # the whole group...
            assert await store.get("k", "r9") is not None  # ...when one was asked for
            for i in range(10, 10 + GROUP_ROWS):  # a full group commits at once
                await _put(store, f"r{i}")
            assert store.commits == 2
            await _put(store, "last")
            await store.flush()
        rows = sqlite3.connect(path).execute("SELECT count(*) FROM stored_responses").fetchone()
        assert rows == (11 + GROUP_ROWS,)

    asyncio.run(go())


def test_a_failed_commit_is_retried_row_by_row_and_the_bad_row_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.db"

    async def go() -> None:
        async with _store(f"sqlite:///{path}") as store:
            await _put(store, "dup")
            await store.flush()
            # The same id again: the primary key refuses the batch, whose other
            # row is then committed on its own.
            await _put(store, "dup")
            await _put(store, "other")
            assert await asyncio.wait_for(store.get("k", "other"), timeout=5) is not None
            assert await asyncio.wait_for(store.get("k", "dup"), timeout=5) is not None

    with caplog.at_level("ERROR", logger="tokenwell.billing.responses"):
        asyncio.run(go())
    assert "storing 1 response(s) failed" in caplog.text
