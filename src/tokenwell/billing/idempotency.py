"""Idempotency records: one per (API key, ``Idempotency-Key``), beside the ledger.

A request with a key first *claims* it: an insert that does nothing on a
conflict on the primary key ``(key_id, idempotency_key)``. With metering on,
the claim is written by the ledger with the request's open, and its result or
release with the closes (``billing.claims``); ``claim``, ``finish`` and
``release`` here are the transactions used without metering. Exactly one of any
number of concurrent first requests, on any replica, inserts the row and
generates; the others find the row and attach to its generation or replay its
result. The row keeps the request's ledger id and, once it finished, its
response (status, content type, body), until ``expires_at``.

A request refused before it started (a limit, a full queue) releases its
claim, so a retry can try again; a server that restarts after a crash releases
the claims it held while running (their ledger rows are closed as
``interrupted``), so their retries generate afresh.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from tokenwell.billing.claims import unpack
from tokenwell.billing.db import Database, idempotency_keys, requests

_t = idempotency_keys.c


@dataclass(slots=True)
class Record:
    key_id: str
    idempotency_key: str
    fingerprint: str
    request_id: str
    stream: bool
    state: str  # running | done
    instance: str
    status_code: int | None
    content_type: str | None
    body: bytes | None
    created_at: float
    expires_at: float

    @property
    def done(self) -> bool:
        return self.state == "done"


def _record(row: Any) -> Record:
    record = Record(**{name: getattr(row, name) for name in Record.__slots__})
    record.body = unpack(record.body)
    return record


_GET_SQLITE = (
    "SELECT " + ", ".join(Record.__slots__) + " FROM idempotency_keys "
    "WHERE key_id = ? AND idempotency_key = ?"
)


class IdempotencyStore:
    def __init__(self, db: Database, ttl: float) -> None:
        self.db = db
        self.ttl = ttl
        self._insert: Any = (postgresql if db.dialect == "postgresql" else sqlite).insert
        self._reader: Any = None  # SQLite: reads on the event loop (a DBAPI connection)

    async def claim(
        self,
        key_id: str,
        idempotency_key: str,
        fingerprint: str,
        request_id: str,
        stream: bool,
        instance: str,
    ) -> Record | None:
        """None when this request claimed the key (it generates); else the live record."""
        now = time.time()
        values = {
            "key_id": key_id,
            "idempotency_key": idempotency_key,
            "fingerprint": fingerprint,
            "request_id": request_id,
            "stream": stream,
            "state": "running",
            "instance": instance,
            "created_at": now,
            "expires_at": now + self.ttl,
        }
        # RETURNING says whether the row went in (rowcount is not reliable for
        # ON CONFLICT DO NOTHING through every driver).
        statement = (
            self._insert(idempotency_keys)
            .values(values)
            .on_conflict_do_nothing()
            .returning(_t.request_id)
        )
        for _ in range(5):
            async with self.db.engine.begin() as conn:
                if (await conn.execute(statement)).first() is not None:
                    return None
                row = (
                    await conn.execute(
                        self._where(select(idempotency_keys), key_id, idempotency_key)
                    )
                ).first()
                if row is None:  # released in between: claim again
                    continue
                if row.expires_at > now:
                    return _record(row)
                # Expired: forget it, and claim it afresh in the same transaction.
                await conn.execute(
                    self._where(delete(idempotency_keys), key_id, idempotency_key).where(
                        _t.expires_at <= now
                    )
                )
                if (await conn.execute(statement)).first() is not None:
                    return None
        raise RuntimeError(f"could not claim idempotency key for {key_id}")

    async def get(self, key_id: str, idempotency_key: str) -> Record | None:
        if self.db.sync_engine is not None:  # SQLite
            try:
                return self._get_sqlite(key_id, idempotency_key)
            except sqlite3.OperationalError:  # busy (recovering the WAL index): off the loop
                self.close()
        async with self.db.engine.connect() as conn:
            row = (
                await conn.execute(self._where(select(idempotency_keys), key_id, idempotency_key))
            ).first()
        return _record(row) if row is not None and row.expires_at > time.time() else None

    def _get_sqlite(self, key_id: str, idempotency_key: str) -> Record | None:
        """A read on the event loop (every keyed request makes one): a WAL reader
        never waits for the writer, and this connection never waits at all."""
        if self._reader is None:
            assert self.db.sync_engine is not None
            self._reader = self.db.sync_engine.raw_connection()
            self._reader.driver_connection.execute("PRAGMA busy_timeout=0")  # type: ignore[union-attr]
        # The driver's own connection: SQLAlchemy's layers cost ~10x the read.
        # Outside a transaction (sqlite3 begins none for a SELECT), and the cursor
        # closed at once: no snapshot is held between reads.
        cursor = self._reader.driver_connection.execute(  # type: ignore[union-attr]
            _GET_SQLITE, (key_id, idempotency_key)
        )
        try:
            row = cursor.fetchone()
        finally:
            cursor.close()
        if row is None:
            return None
        record = Record(*row)
        record.stream = bool(record.stream)
        record.body = unpack(record.body)
        return record if record.expires_at > time.time() else None

    def close(self) -> None:
        conn, self._reader = self._reader, None
        if conn is not None:
            conn.invalidate()  # not back to the pool: its busy_timeout is not the others'

    async def finish(
        self,
        key_id: str,
        idempotency_key: str,
        request_id: str,
        status_code: int,
        content_type: str,
        body: bytes | None,
    ) -> None:
        """The request ended: keep its response (None: too large to keep)."""
        async with self.db.engine.begin() as conn:
            await conn.execute(
                self._where(update(idempotency_keys), key_id, idempotency_key)
                .where(_t.request_id == request_id)
                .values(state="done", status_code=status_code, content_type=content_type, body=body)
            )

    async def release(self, key_id: str, idempotency_key: str, request_id: str) -> None:
        """Forget a claim whose request did not run (or failed before it answered)."""
        async with self.db.engine.begin() as conn:
            await conn.execute(
                self._where(delete(idempotency_keys), key_id, idempotency_key).where(
                    _t.request_id == request_id
                )
            )

    async def count(self, request_id: str, what: str) -> None:
        """One more replay (``replays``) or attachment (``attachments``) on the ledger row."""
        column = requests.c[what]
        async with self.db.engine.begin() as conn:
            await conn.execute(
                update(requests).where(requests.c.id == request_id).values({what: column + 1})
            )

    async def release_instance(self, instance: str) -> int:
        """After a crash: the claims this instance held while running were never answered."""
        async with self.db.engine.begin() as conn:
            done = await conn.execute(
                delete(idempotency_keys).where(_t.instance == instance, _t.state == "running")
            )
        return int(done.rowcount or 0)

    async def purge(self) -> int:
        """Forget expired records."""
        async with self.db.engine.begin() as conn:
            done = await conn.execute(delete(idempotency_keys).where(_t.expires_at <= time.time()))
        return int(done.rowcount or 0)

    @staticmethod
    def _where(statement: Any, key_id: str, idempotency_key: str) -> Any:
        return statement.where(_t.key_id == key_id, _t.idempotency_key == idempotency_key)
