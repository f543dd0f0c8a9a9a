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
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from sqlalchemy import Connection, delete, insert, select, update

from tokenwell.billing.db import Database, stored_responses

_t = stored_responses.c


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


class ResponseStore:
    """Puts are batched: every response finishing while a commit runs goes into the
    next one (one transaction, one multi-row INSERT), and each ``put`` returns once
    its row is committed. A transaction per response cost a stream about twice its
    own CPU (bench/responses.py). On SQLite every statement runs on the event loop
    (``Database.run``): through the async driver's thread a stored response's
    last bytes waited ~1 ms for its commit, a third of a short response's time;
    and a put commits at once, with no batch to wait for, unless another writer
    holds the database (then it is queued as on PostgreSQL).

    Read your writes: a row still queued is waited for by every read, update
    and delete of its id, so nothing this server handles after a put began
    misses its row, whether or not the put has committed yet. Where puts
    commit on the event loop (``commits_in_step``), a response's last bytes
    therefore need not wait for its put: the client, however fast, reaches a
    server on which the row is committed or being waited for."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._committing: dict[str, asyncio.Future[None]] = {}  # queued puts, by id
        self._flusher: asyncio.Task[None] | None = None

    @property
    def commits_in_step(self) -> bool:
        """A put starts in the step of the event loop it is called from, before the
        server handles anything else: it commits there (SQLite, on the loop), or its
        row is queued where every read of its id waits for it. This server then is
        the only one that could be asked for the row (PostgreSQL is shared by
        replicas: there a response goes out only once its row is committed)."""
        return self.db.sync_engine is not None

    async def _committed(self, response_id: str) -> None:
        """Until a queued put of this id has committed (or failed)."""
        done = self._committing.get(response_id)
        if done is not None:
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
        if not self._pending and self.db.try_on_loop(partial(_insert, [values]))[0]:
            return  # SQLite, committed at once on the loop (no task, no future)
        done = asyncio.get_running_loop().create_future()
        self._pending.append((values, done))
        self._committing[values["id"]] = done
        done.add_done_callback(lambda _: self._committing.pop(values["id"], None))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="stored-responses")
        await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.db.run(partial(_insert, [values for values, _ in batch]))
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

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
