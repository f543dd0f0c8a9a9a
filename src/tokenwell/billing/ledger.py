"""The spend ledger: one row per request, opened before generation, closed once.

Writes are group-committed by one writer task: each transaction takes every
operation that queued while the previous one ran, so a lone request waits for
one commit and a busy server pays one commit for many requests. A request
starts generating only after its row is committed (write-ahead), and a close
is retried until it commits, so neither batching nor a database hiccup loses
a row or bills one twice:

- ``open``: insert the row and, in the same transaction, reserve the
  request's worst-case cost on its key *if* the key is active and the budget
  covers it (one conditional UPDATE: atomic on SQLite and PostgreSQL alike).
- ``close``: ``UPDATE … WHERE status = 'open'`` — only the first close of a
  row matches — then move the reservation to spend on the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, insert, or_, select, update

from tokenwell.billing.db import Database, api_keys, requests
from tokenwell.billing.keys import MASTER_ID

log = logging.getLogger(__name__)

FINAL_STATUSES = (
    "completed",
    "length",
    "tool_calls",
    "content_filter",
    "client_disconnected",
    "upstream_error",
    "engine_error",
    "rejected",
    "interrupted",
)


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


@dataclass(slots=True)
class OpenRow:
    id: str
    key_id: str
    model: str
    stream: bool
    include_usage: bool
    n: int
    prompt_tokens: int
    reserved_nanos: int
    instance: str
    user: str | None = None
    created_at: float = field(default_factory=time.time)
    # Checked atomically with the insert: the key is active and can afford it.
    check_key: bool = True
    # Write the row already closed with this status (a rejected request).
    status: str = "open"
    error: str | None = None

    def values(self) -> dict[str, Any]:
        closed = self.status != "open"
        return {
            "id": self.id,
            "key_id": self.key_id,
            "model": self.model,
            "stream": self.stream,
            "include_usage": self.include_usage,
            "n": self.n,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": 0,
            "completion_tokens": 0,
            "reserved_nanos": 0 if closed else self.reserved_nanos,
            "cost_nanos": 0,
            "estimated": False,
            "created_at": self.created_at,
            "closed_at": self.created_at if closed else None,
            "day": utc_day(self.created_at),
            "instance": self.instance,
            "user": self.user,
            "error": self.error,
        }


@dataclass(slots=True)
class CloseRow:
    id: str
    key_id: str
    status: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_nanos: int
    reserved_nanos: int
    estimated: bool = False
    queue_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    error: str | None = None
    closed_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class Admission:
    ok: bool
    # Why not: "revoked", "expired", "budget" or "missing".
    reason: str | None = None
    budget_nanos: int | None = None
    available_nanos: int | None = None


class LedgerUnavailable(Exception):
    """The database did not take the write."""


@dataclass(slots=True)
class _Op:
    row: OpenRow | CloseRow
    future: asyncio.Future[Any]


class Ledger:
    def __init__(self, db: Database, max_batch: int = 256) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.rows = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def stop(self) -> None:
        """Commit everything queued, then stop."""
        if self._task is None:
            return
        # A marker behind everything queued resolves once all of it committed.
        done = asyncio.get_running_loop().create_future()
        await self._queue.put(_Op(None, done))  # type: ignore[arg-type]
        await done
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def open(self, row: OpenRow) -> Admission:
        """Write the row (write-ahead) and reserve on its key; waits for the commit."""
        return await self._submit(row)  # type: ignore[no-any-return]

    async def close(self, row: CloseRow) -> bool:
        """Close the row exactly once; True if this call closed it. Waits for the commit."""
        return await self._submit(row)  # type: ignore[no-any-return]

    async def _submit(self, row: OpenRow | CloseRow) -> Any:
        if self._task is None:
            raise LedgerUnavailable("the ledger is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(row, future))
        return await asyncio.shield(future)

    # -------------------------------------------------------------- the writer

    async def _run(self) -> None:
        pending: list[_Op] = []
        delay = 0.05
        while True:
            if not pending:
                pending.append(await self._queue.get())
            while len(pending) < self.max_batch and not self._queue.empty():
                pending.append(self._queue.get_nowait())
            batch = [op for op in pending if op.row is not None]
            try:
                results = await self._commit(batch)
            except Exception as exc:
                log.exception("ledger commit of %d rows failed", len(batch))
                # Opens fail (their requests get a 503 and generate nothing);
                # closes (and flush markers behind them) wait and are retried.
                retry = []
                for op in pending:
                    if isinstance(op.row, OpenRow):
                        if not op.future.done():
                            op.future.set_exception(LedgerUnavailable(str(exc)))
                    else:
                        retry.append(op)
                pending = retry
                if any(op.row is not None for op in retry):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
            else:
                delay = 0.05
                for op, result in zip(batch, results, strict=True):
                    if not op.future.done():
                        op.future.set_result(result)
            for op in pending:
                if op.row is None and not op.future.done():
                    op.future.set_result(True)
            pending = []

    async def _commit(self, batch: list[_Op]) -> list[Any]:
        if not batch:
            return []
        opens = [op.row for op in batch if isinstance(op.row, OpenRow)]
        closes = [op.row for op in batch if isinstance(op.row, CloseRow)]
        results: dict[int, Any] = {}
        async with self.db.engine.begin() as conn:
            keys = sorted({r.key_id for r in (*opens, *closes) if r.key_id != MASTER_ID})
            if keys and self.db.dialect == "postgresql":
                # Lock the keys in one order, so concurrent replicas never deadlock.
                await conn.execute(
                    select(api_keys.c.id)
                    .where(api_keys.c.id.in_(keys))
                    .order_by(api_keys.c.id)
                    .with_for_update()
                )
            now = time.time()
            rows = []
            for row in opens:
                admission = Admission(True)
                if row.status == "open" and row.check_key and row.key_id != MASTER_ID:
                    admission = await self._reserve(conn, row, now)
                    if not admission.ok:
                        row.status = "rejected"
                        row.error = f"refused: {admission.reason}"
                results[id(row)] = admission
                rows.append(row.values())
            if rows:
                await conn.execute(insert(requests), rows)
            spend: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for row in closes:
                closed = await self._close(conn, row)
                results[id(row)] = closed
                if closed and row.key_id != MASTER_ID:
                    spend[row.key_id][0] += row.cost_nanos
                    spend[row.key_id][1] += row.reserved_nanos
            for key_id in sorted(spend):
                cost, reserved = spend[key_id]
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == key_id)
                    .values(
                        spent_nanos=api_keys.c.spent_nanos + cost,
                        reserved_nanos=api_keys.c.reserved_nanos - reserved,
                    )
                )
        self.batches += 1
        self.rows += len(batch)
        return [results[id(op.row)] for op in batch]

    async def _reserve(self, conn: Any, row: OpenRow, now: float) -> Admission:
        c = api_keys.c
        result = await conn.execute(
            update(api_keys)
            .where(
                c.id == row.key_id,
                c.revoked_at.is_(None),
                or_(c.expires_at.is_(None), c.expires_at > now),
                or_(
                    c.budget_nanos.is_(None),
                    c.spent_nanos + c.reserved_nanos + row.reserved_nanos <= c.budget_nanos,
                ),
            )
            .values(reserved_nanos=c.reserved_nanos + row.reserved_nanos)
        )
        if result.rowcount == 1:
            return Admission(True)
        key = (
            await conn.execute(
                select(
                    c.revoked_at, c.expires_at, c.budget_nanos, c.spent_nanos, c.reserved_nanos
                ).where(c.id == row.key_id)
            )
        ).first()
        if key is None:
            return Admission(False, "missing")
        if key.revoked_at is not None:
            return Admission(False, "revoked")
        if key.expires_at is not None and key.expires_at <= now:
            return Admission(False, "expired")
        available = max((key.budget_nanos or 0) - key.spent_nanos - key.reserved_nanos, 0)
        return Admission(False, "budget", key.budget_nanos, available)

    async def _close(self, conn: Any, row: CloseRow) -> bool:
        result = await conn.execute(
            update(requests)
            .where(and_(requests.c.id == row.id, requests.c.status == "open"))
            .values(
                status=row.status,
                prompt_tokens=row.prompt_tokens,
                cached_tokens=row.cached_tokens,
                completion_tokens=row.completion_tokens,
                cost_nanos=row.cost_nanos,
                estimated=row.estimated,
                queue_ms=row.queue_ms,
                ttft_ms=row.ttft_ms,
                total_ms=row.total_ms,
                closed_at=row.closed_at,
                error=row.error,
            )
        )
        return bool(result.rowcount == 1)

    async def open_rows(self, instance: str) -> list[Any]:
        async with self.db.engine.connect() as conn:
            result = await conn.execute(
                select(requests).where(requests.c.instance == instance, requests.c.status == "open")
            )
            return list(result.all())
