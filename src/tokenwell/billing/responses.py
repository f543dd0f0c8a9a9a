"""Stored responses of the Responses API, beside the ledger, scoped to an API key.

One row per stored response: the response object as last rendered (queued,
then in progress, then its ending), this request's input items (``GET
…/input_items``), and ``history``: every input item of the conversation up to
this response, so ``previous_response_id`` continues it from one row. A
response another key made is "not found", as one that never existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from sqlalchemy import Connection, delete, insert, select, update

from tokenwell.billing.db import Database, stored_responses

_t = stored_responses.c
log = logging.getLogger(__name__)


@dataclass(slots=True)
class StoredResponse:
    id: str
    key_id: str
    request_id: str | None
    model: str
    status: str
    background: bool
    previous_response_id: str | None
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    response: dict[str, Any]
    created_at: float
    updated_at: float


def _stored(row: Any) -> StoredResponse:
    return StoredResponse(
        id=row.id,
        key_id=row.key_id,
        request_id=row.request_id,
        model=row.model,
        status=row.status,
        background=bool(row.background),
        previous_response_id=row.previous_response_id,
        input_items=orjson.loads(row.input_items),
        history=orjson.loads(row.history),
        response=orjson.loads(row.response),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _retrieved(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()  # logged by the flush, not again as never retrieved


def _settle(
    batch: list[tuple[dict[str, Any], asyncio.Future[None]]], exc: Exception | None
) -> None:
    if exc is not None:
        log.error("storing %d response(s) failed: %s", len(batch), exc)
    for _, done in batch:
        if not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)


_COLUMNS = tuple(column.name for column in stored_responses.columns)
# SQLite's statement, for its driver directly: a third of a stored response's
# commit was SQLAlchemy's compiling and binding of the same statement.
_SQLITE_INSERT = (
    f"INSERT INTO stored_responses ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)


def _insert(rows: list[dict[str, Any]], conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(_SQLITE_INSERT, [tuple(row[c] for c in _COLUMNS) for row in rows])
    else:
        conn.execute(insert(stored_responses), rows)


# SQLite: rows put within this long of one another commit in one transaction.
GROUP_SECONDS = 0.02
GROUP_ROWS = 64  # ... or as soon as this many are waiting


class ResponseStore:
    """Puts are batched: one transaction, one multi-row INSERT, for every response
    that finishes while the previous commit is pending.

    On SQLite (``commits_in_step``) a put is queued on the event loop and returns
    at once; the rows put within ``GROUP_SECONDS`` of the first (or
    ``GROUP_ROWS`` of them) commit together, on the loop, unless another writer
    holds the database (then off the loop, as on PostgreSQL). One row per
    transaction cost a single stream ~5% of its throughput: a commit writes each
    B-tree page it touched to the WAL, and consecutive rows share their pages
    (bench/RESULTS.md, issue 13). What a commit window risks is the last
    ``GROUP_SECONDS`` of stored responses on a kill -9 of the server (never a
    ledger row: billing commits on its own); ``flush`` commits what is
    queued, before the database closes. On PostgreSQL, shared by replicas, a
    put returns once its row is committed, and a response goes out only after.

    Read your writes: a row still queued is waited for by every read, update
    and delete of its id, so nothing this server handles after a put began
    misses its row, whether or not the put has committed yet."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._committing: dict[str, asyncio.Future[None]] = {}  # queued puts, by id
        self._flusher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.commits = 0  # transactions that stored rows

    @property
    def commits_in_step(self) -> bool:
        """A put is queued in the step of the event loop it is called from, where
        every read of its id waits for it: this server then is the only one that
        could be asked for the row (PostgreSQL is shared by replicas: there a
        response goes out only once its row is committed)."""
        return self.db.sync_engine is not None

    async def _committed(self, response_id: str) -> None:
        """Until a queued put of this id has committed (or failed): a row someone
        asks for is committed now, with its group, not at the window's end."""
        done = self._committing.get(response_id)
        if done is not None:
            if self._timer is not None:
                self._timer.cancel()
                self._flush_on_loop()
            with contextlib.suppress(Exception):
                await asyncio.shield(done)

    async def put(
        self,
        key_id: str,
        response: dict[str, Any],
        *,
        request_id: str | None,
        input_items: list[dict[str, Any]],
        history: list[dict[str, Any]],
    ) -> None:
        now = time.time()
        values = {
            "id": response["id"],
            "key_id": key_id,
            "request_id": request_id,
            "model": response["model"],
            "status": response["status"],
            "background": bool(response.get("background")),
            "previous_response_id": response.get("previous_response_id"),
            "input_items": orjson.dumps(input_items),
            "history": orjson.dumps(history),
            "response": orjson.dumps(response),
            "created_at": now,
            "updated_at": now,
        }
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        rid = values["id"]
        self._pending.append((values, done))
        self._committing[rid] = done
        done.add_done_callback(lambda _: self._committing.pop(rid, None))
        if not self.commits_in_step:
            self._start_flusher()
            await done
            return
        done.add_done_callback(_retrieved)  # a failure is logged by the flush
        if self._flusher is not None and not self._flusher.done():
            return  # the flusher off the loop takes it with the rest
        if len(self._pending) >= GROUP_ROWS:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            self._flush_on_loop()
        elif self._timer is None:
            self._timer = loop.call_later(GROUP_SECONDS, self._flush_on_loop)

    def _flush_on_loop(self) -> None:
        """SQLite: every queued row in one transaction, now, on the event loop;
        off it where another writer holds the database."""
        self._timer = None
        if not self._pending or (self._flusher is not None and not self._flusher.done()):
            return
        batch, self._pending = self._pending, []
        try:
            done, _ = self.db.try_on_loop(partial(_insert, [values for values, _ in batch]))
        except Exception as exc:
            self._one_by_one(batch, exc)
            return
        if done:
            self.commits += 1
            _settle(batch, None)
        else:  # locked: wait for it off the loop
            self._pending = batch + self._pending
            self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="stored-responses")

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.db.run(partial(_insert, [values for values, _ in batch]))
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch, exc)
                else:
                    await self._each(batch)
            else:
                self.commits += 1
                _settle(batch, None)

    def _one_by_one(
        self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]], exc: Exception
    ) -> None:
        if len(batch) == 1:
            _settle(batch, exc)
        else:  # the flusher tries the group again, then a row at a time
            self._pending = batch + self._pending
            self._start_flusher()

    async def _each(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        """A batch that failed, again a row at a time: one bad row (or one that
        no longer fits) costs no other its place."""
        for one in batch:
            try:
                await self.db.run(partial(_insert, [one[0]]))
            except Exception as exc:
                _settle([one], exc)
            else:
                self.commits += 1
                _settle([one], None)

    async def flush(self) -> None:
        """Until every row put so far has committed (or failed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._flush_on_loop()
        while waiting := [done for done in self._committing.values() if not done.done()]:
            await asyncio.wait(waiting)

    async def update(self, response: dict[str, Any]) -> None:
        """The response's newest state (its status, output and usage)."""
        await self._committed(response["id"])
        statement = (
            update(stored_responses)
            .where(_t.id == response["id"])
            .values(
                status=response["status"],
                response=orjson.dumps(response),
                updated_at=time.time(),
            )
        )
        await self.db.run(lambda conn: conn.execute(statement))

    async def advance(self, response: dict[str, Any], from_status: str) -> bool:
        """Store the response's newest state only if it is still ``from_status`` (a
        later state stored first is never overwritten); whether it was stored."""
        await self._committed(response["id"])
        statement = (
            update(stored_responses)
            .where(_t.id == response["id"], _t.status == from_status)
            .values(
                status=response["status"],
                response=orjson.dumps(response),
                updated_at=time.time(),
            )
        )
        return await self.db.run(lambda conn: bool(conn.execute(statement).rowcount))

    async def get(self, key_id: str, response_id: str) -> StoredResponse | None:
        await self._committed(response_id)
        statement = select(stored_responses).where(_t.id == response_id, _t.key_id == key_id)
        row = await self.db.run(lambda conn: conn.execute(statement).first())
        return _stored(row) if row is not None else None

    async def delete(self, key_id: str, response_id: str) -> bool:
        await self._committed(response_id)
        statement = delete(stored_responses).where(_t.id == response_id, _t.key_id == key_id)
        return await self.db.run(lambda conn: bool(conn.execute(statement).rowcount))
