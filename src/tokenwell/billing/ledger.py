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
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from tokenwell.billing import claims, endusers, periods, pgbatch
from tokenwell.billing.alerts import AlertWriter
from tokenwell.billing.budgets import RESERVE as _RESERVE
from tokenwell.billing.budgets import SPEND as _SPEND
from tokenwell.billing.budgets import refusal, window_params
from tokenwell.billing.claims import Claim, ClaimEnd
from tokenwell.billing.db import (
    CLOSE_COLUMNS,
    OPEN_COLUMNS,
    Checkpointer,
    Database,
    api_keys,
    is_busy,
    requests,
)
from tokenwell.billing.endusers import EndUserBudget
from tokenwell.billing.keys import MASTER_ID
from tokenwell.billing.periods import Windows

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
    "slow_client",
    "cancelled",  # a background response cancelled (Responses API): billed as generated
)


@lru_cache(maxsize=8)
def _day(days: int) -> str:
    return datetime.fromtimestamp(days * 86400, UTC).strftime("%Y-%m-%d")


def utc_day(ts: float) -> str:
    return _day(int(ts // 86400))


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
    idempotency_key: str | None = None
    # Claim its Idempotency-Key in the same transaction (billing.claims).
    claim: Claim | None = None
    api: str = "chat.completions"
    # The key's budget windows at ``created_at`` (in its time zone): reserved
    # against, and rolled forward when a new one has begun (billing.periods).
    windows: Windows = periods.EPOCH
    # The request's metadata (a JSON object of strings), recorded as it came.
    tags: str | None = None
    # The key's budget for each end user, when it has one and the request names
    # one (``user``): reserved on the end user's row in the same transaction.
    end_user: EndUserBudget | None = None

    def values(self) -> dict[str, Any]:
        """The columns known at open; the rest keep their defaults until the close."""
        closed = self.status != "open"  # written closed: a rejected request
        return {
            "id": self.id,
            "key_id": self.key_id,
            "model": self.model,
            "stream": self.stream,
            "include_usage": self.include_usage,
            "n": self.n,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "reserved_nanos": 0 if closed else self.reserved_nanos,
            "created_at": self.created_at,
            "day": utc_day(self.created_at),
            "instance": self.instance,
            "user": self.user,
            "closed_at": self.created_at if closed else None,
            "error": self.error if closed else None,
            "idempotency_key": self.idempotency_key,
            "api": self.api,
            "tags": self.tags,
            "end_user_window": (
                self.end_user.window if self.end_user is not None and not closed else None
            ),
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
    # Called on the event loop once the close has committed (won or not).
    on_commit: Callable[[], None] | None = None
    # The windows its open was admitted in: its cost counts toward them.
    windows: Windows = periods.EPOCH
    # The end user its open reserved for, and in which window of theirs.
    end_user: str | None = None
    end_user_window: float = 0.0

    def params(self) -> dict[str, Any]:
        return {
            "r_id": self.id,
            "r_status": self.status,
            "r_prompt": self.prompt_tokens,
            "r_cached": self.cached_tokens,
            "r_completion": self.completion_tokens,
            "r_cost": self.cost_nanos,
            "r_estimated": self.estimated,
            "r_queue": self.queue_ms,
            "r_ttft": self.ttft_ms,
            "r_total": self.total_ms,
            "r_closed": self.closed_at,
            "r_error": self.error,
            "r_reserved": self.reserved_nanos,
            "r_open": "open",
            "r_day": self.windows.day,
            "r_week": self.windows.week,
            "r_month": self.windows.month,
            "r_user": self.end_user,
            "r_uw": self.end_user_window,
        }


@dataclass(slots=True)
class Admission:
    ok: bool
    # Why not: "revoked", "expired", "budget" or "missing".
    reason: str | None = None
    budget_nanos: int | None = None
    available_nanos: int | None = None
    # The budget that refused it: "total", "day", "week" or "month" (the key's
    # own, or with reason "end_user_budget" the one each end user has).
    period: str | None = None


_k = api_keys.c
_LOCK_KEYS = (
    select(_k.id)
    .where(_k.id.in_(bindparam("k_ids", expanding=True)))
    .order_by(_k.id)
    .with_for_update()
)
_OPEN = insert(requests).values({name: bindparam(name) for name in OPEN_COLUMNS})
_CLOSE = (
    update(requests)
    .where(requests.c.id == bindparam("r_id"), requests.c.status == bindparam("r_open"))
    .values({column: bindparam(param) for param, column in CLOSE_COLUMNS})
)


def _first_closes(closes: list[CloseRow], results: dict[int, Any]) -> list[CloseRow]:
    """The closes to run: the same request twice in a batch closes once, the first time.

    Marks each in ``results`` as the one that closes its row (True) or not.
    """
    todo: list[CloseRow] = []
    seen: set[str] = set()
    for row in closes:
        results[id(row)] = row.id not in seen
        if row.id not in seen:
            seen.add(row.id)
            todo.append(row)
    return todo


_MIXED: tuple[list[dict[str, Any]], int] = ([], -1)


def _end_users(rows: list[OpenRow]) -> tuple[list[dict[str, Any]], int] | None:
    """The end users' reservations of one key's opens: ([{u, w, amt}], their
    limit), or None when none has one to make."""
    amounts: dict[tuple[str, float], int] = defaultdict(int)
    limits = set()
    for row in rows:
        if row.end_user is not None and row.user is not None:
            amounts[row.user, row.end_user.window] += row.reserved_nanos
            limits.add(row.end_user.limit_nanos)
    if not amounts:
        return None
    if len(limits) > 1 or len({u for u, _ in amounts}) < len(amounts):
        # The limit changed, or one end user across two windows, within the batch:
        # the statement cannot take it (the transaction path does).
        return _MIXED
    users = [{"u": u, "w": w, "amt": amt} for (u, w), amt in sorted(amounts.items())]
    return users, limits.pop()


def _admitted(row: OpenRow, admission: Admission) -> bool:
    return admission.ok and row.status == "open"


def _unused(row: OpenRow) -> CloseRow:
    """The close of an admitted row whose request never started."""
    return CloseRow(
        id=row.id,
        key_id=row.key_id,
        status="client_disconnected",
        prompt_tokens=0,
        cached_tokens=0,
        completion_tokens=0,
        cost_nanos=0,
        reserved_nanos=row.reserved_nanos,
        error="the request was cancelled before it started",
    )


_SQLITE_STILL_OPEN = (
    "SELECT id FROM requests WHERE status = 'open' AND id IN (SELECT value FROM json_each(?))"
)


class LedgerUnavailable(Exception):
    """The database did not take the write."""


@dataclass(slots=True)
class _Op:
    row: OpenRow | CloseRow | ClaimEnd
    future: asyncio.Future[Any]
    queued_at: float = 0.0  # closes: when the writer took it off the queue


_Getter = Callable[[dict[str, Any]], tuple[Any, ...]]


def _row_getter(names: tuple[str, ...]) -> _Getter:
    """A row dict → its values in bind order, as a tuple (at C speed)."""
    if len(names) == 1:
        name = names[0]
        return lambda row: (row[name],)
    return itemgetter(*names)


class _Inbox:
    """The writer's queue: a deque, and one future to wake the writer while it sleeps."""

    def __init__(self) -> None:
        self._items: deque[_Op] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, op: _Op) -> None:
        self._items.append(op)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def drain(self) -> list[_Op]:
        items = list(self._items)
        self._items.clear()
        return items

    async def wait(self, timeout: float | None = None) -> None:
        """Until something is queued, or ``timeout`` seconds."""
        if self._items:
            return
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        handle = loop.call_later(timeout, _wake, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Ledger:
    def __init__(
        self,
        db: Database,
        max_batch: int = 256,
        close_linger: float = 0.005,
        close_max_wait: float = 0.02,
    ) -> None:
        self.db = db
        self.max_batch = max_batch
        self.close_linger = close_linger
        self.close_max_wait = close_max_wait
        self._inbox = _Inbox()
        self._task: asyncio.Task[None] | None = None
        # SQLite commits that find the database locked wait on a thread of the
        # ledger's own (see _commit).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self.batches = 0
        self.rows = 0
        self.commit_cpu_seconds = 0.0  # CPU time of SQLite commits
        self.lock_waits = 0  # SQLite commits that waited for another writer
        self._compiled: dict[
            tuple[int, str], tuple[str, Callable[[Any], tuple[Any, ...]] | None]
        ] = {}
        # SQLite, by whether it waits for another writer's lock: one on the
        # event loop that never does (False), the ledger thread's (True).
        # PostgreSQL: a transactional connection and an autocommit one
        # (single-statement batches), both on the event loop.
        self._sqlite: dict[bool, Connection] = {}
        self._pg: tuple[AsyncConnection, AsyncConnection] | None = None
        self._checkpointer = Checkpointer(db) if db.dialect == "sqlite" else None
        # Budget alerts written by closes (billing.alerts), and who to tell
        # once a commit wrote some.
        self.alerts: AlertWriter | None = None
        self.on_alerts: Callable[[], None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")
        if self._checkpointer is not None:
            self._checkpointer.start()

    async def stop(self) -> None:
        """Commit everything queued, then stop."""
        if self._task is None:
            return
        # A marker behind everything queued resolves once all of it committed.
        done = asyncio.get_running_loop().create_future()
        self._inbox.put(_Op(None, done))  # type: ignore[arg-type]
        await done
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close_sqlite, True)
        self._thread.shutdown(wait=True)
        self._close_sqlite(False)
        await self._close_postgresql()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)

    def stats(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "queued": len(self._inbox),
            "commit_cpu_seconds": self.commit_cpu_seconds,
            "lock_waits": self.lock_waits,
        }

    async def open(self, row: OpenRow) -> Admission:
        """Write the row (write-ahead) and reserve on its key; waits for the commit.

        A caller cancelled while it waits gets no request, so its row, if it
        was admitted, is closed at once, unused: nothing stays reserved. Its
        future is cancelled with it (the writer then closes the row once it
        commits), unless it already held the admission (then this does).
        """
        future = self._enqueue(row)
        try:
            return await future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            held = not future.cancel() and not future.cancelled()
            if held and future.exception() is None and _admitted(row, future.result()):
                self._enqueue(_unused(row))
            raise

    async def close(self, row: CloseRow) -> bool:
        """Close the row exactly once; True if this call closed it. Waits for the commit."""
        return await asyncio.shield(self.enqueue_close(row))

    def enqueue_close(self, row: CloseRow) -> asyncio.Future[bool]:
        """Queue the close now; the future resolves when it has committed.

        The close commits whether or not anyone awaits the future (cancelling
        it only stops the wait).
        """
        return self._enqueue(row)

    def end_claim(self, end: ClaimEnd) -> asyncio.Future[bool]:
        """Store a claimed request's result, or release its claim, with the closes;
        the future resolves once that committed (cancelling it only stops the wait)."""
        return self._enqueue(end)

    def _enqueue(self, row: OpenRow | CloseRow | ClaimEnd) -> asyncio.Future[Any]:
        if self._task is None:
            raise LedgerUnavailable("the ledger is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inbox.put(_Op(row, future))
        return future

    # -------------------------------------------------------------- the writer

    async def _run(self) -> None:
        """Commit what is queued, opens first.

        A request waits for its open to commit before it generates, while a
        close only has to be durable eventually (the journal holds its usage
        meanwhile). So waiting opens are committed on their own, in a short
        transaction, and closes go in transactions of their own while no open
        waits. Closes still never wait long: once the oldest has waited
        ``close_max_wait`` (or ``max_batch`` of them queue up) they ride
        along with the opens.

        Committing opens and closes together made each admission wait for a
        transaction twice as long, and when many streams ended at once every
        next request waited for the same big commit while the server had
        nothing else to do: the metering benchmark's requests marched in
        waves of 64, losing ~5% of requests/s to that idle time alone.
        """
        opens: list[_Op] = []
        closes: list[_Op] = []
        markers: list[_Op] = []
        delay = 0.05
        while True:
            if not (opens or closes or markers):
                await self._inbox.wait()
            for op in self._inbox.drain():
                self._file(op, opens, closes, markers)
            if closes and not opens and not markers and len(closes) < self.max_batch:
                # Closes may wait a moment: more of them share the commit, and an
                # open arriving meanwhile finds the writer free instead of queueing
                # behind them.
                await self._inbox.wait(self.close_linger)
                for op in self._inbox.drain():
                    self._file(op, opens, closes, markers)
            take = opens[: self.max_batch]
            if (
                not take
                or len(closes) >= self.max_batch
                or (closes and time.monotonic() - closes[0].queued_at >= self.close_max_wait)
            ):
                batch = take + closes[: self.max_batch - len(take)]
            else:
                batch = take
            if batch:
                try:
                    results = await self._commit(batch)
                except Exception as exc:
                    log.exception("ledger commit of %d rows failed", len(batch))
                    # Opens fail (their requests get a 503 and generate nothing);
                    # closes stay queued and are retried until they commit.
                    for op in take:
                        if not op.future.done():
                            op.future.set_exception(LedgerUnavailable(str(exc)))
                    del opens[: len(take)]
                    if closes:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
                    continue
                delay = 0.05
                for op, result in zip(batch, results, strict=True):
                    if type(op.row) is CloseRow and op.row.on_commit is not None:
                        op.row.on_commit()
                    if not op.future.done():
                        op.future.set_result(result)
                    elif (
                        type(op.row) is OpenRow
                        and op.future.cancelled()
                        and _admitted(op.row, result)
                    ):
                        # Its caller was cancelled while it waited (see open).
                        self._enqueue(_unused(op.row))
                del opens[: len(take)]
                del closes[: len(batch) - len(take)]
            if markers and not opens and not closes:
                for op in markers:
                    if not op.future.done():
                        op.future.set_result(True)
                markers.clear()

    @staticmethod
    def _file(op: _Op, opens: list[_Op], closes: list[_Op], markers: list[_Op]) -> None:
        if op.row is None:
            markers.append(op)
        elif isinstance(op.row, OpenRow):
            opens.append(op)
        else:
            op.queued_at = time.monotonic()
            closes.append(op)

    async def _commit(self, batch: list[_Op]) -> list[Any]:
        """Run one batch, whole: atomically, or (PostgreSQL, one key) as two
        atomic statements (see ``_commit_one_key``).

        Both run on the event loop. A thread of their own kept the loop free
        of SQL, but after every call that released the GIL (each row of an
        ``executemany``, each wait on PostgreSQL) it needed the GIL and a core
        back while the loop streamed tokens: measured at 64 streams, an open
        batch took ~8 ms from queue to result on the thread (PostgreSQL;
        0.5 ms with the loop idle) and a SQLite close batch ~45 ms, and
        admissions queued behind them (bench/RESULTS.md). On the loop:

        - PostgreSQL through the async driver: the same code, each wait on
          the server an await (``run_sync``).
        - SQLite directly: a batch is ~0.4-0.7 ms of work in the library
          (the WAL is not synced per commit, and checkpoints run on their
          own thread). Its connection never waits for a lock: when another
          writer (the CLI, another process) holds the database, the batch is
          rolled back and waits on the ledger's thread instead.
        """
        if not batch:
            return []
        if self.db.dialect == "postgresql":
            results = await self._commit_postgresql(batch)
        else:
            results = self._commit_sqlite(batch, False)
            if results is None:  # locked by another writer: wait off the loop
                self.lock_waits += 1
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(self._thread, self._commit_sqlite, batch, True)
        self.batches += 1
        self.rows += len(batch)
        if self.alerts is not None and self.alerts.written:
            self.alerts.written = 0
            if self.on_alerts is not None:
                self.on_alerts()
        return results

    def _commit_sqlite(self, batch: list[_Op], wait: bool) -> list[Any] | None:
        """One SQLite transaction for the batch. ``wait``: on the ledger's
        thread, waiting for another writer's lock; else on the event loop, on a
        connection that never waits (None when the database is locked: the
        transaction rolled back, nothing of it was written)."""
        started = time.thread_time()
        try:
            conn = self._sqlite.get(wait)
            if conn is None or conn.closed:
                assert self.db.sync_engine is not None  # SQLite's
                conn = self._sqlite[wait] = self.db.sync_engine.connect()
                if not wait:
                    conn.exec_driver_sql("PRAGMA busy_timeout=0")
                    conn.commit()
            with conn.begin():
                return self._commit_sync(conn, batch)
        except Exception as exc:
            if not wait and isinstance(exc, OperationalError) and is_busy(exc):
                return None
            self._close_sqlite(wait)
            raise
        finally:
            self.commit_cpu_seconds += time.thread_time() - started

    def _close_sqlite(self, wait: bool) -> None:
        conn = self._sqlite.pop(wait, None)
        if conn is not None:
            if not wait:
                conn.invalidate()  # not back to the pool: its busy_timeout is not the others'
            conn.close()

    async def _commit_postgresql(self, batch: list[_Op]) -> list[Any]:
        try:
            if self._pg is None:
                self._pg = await self._connect_postgresql()
            conn, auto = self._pg
            # run_sync: SQLAlchemy runs the code in a greenlet, and every wait
            # on the server is an await on this loop.
            return await auto.run_sync(self._commit_postgresql_sync, conn.sync_connection, batch)
        except Exception:
            await self._close_postgresql()
            raise

    def _commit_postgresql_sync(
        self, auto: Connection, conn: Connection | None, batch: list[_Op]
    ) -> list[Any]:
        assert conn is not None
        done = self._commit_one_key(auto, conn, batch)
        if done is None:
            with conn.begin():
                done = self._commit_sync(conn, batch)
        return done

    async def _connect_postgresql(self) -> tuple[AsyncConnection, AsyncConnection]:
        """Two connections, kept for the ledger's life (or until one fails)."""
        conn = await self.db.engine.connect()
        try:
            auto = await self.db.engine.connect()
            await auto.execution_options(isolation_level="AUTOCOMMIT")
        except BaseException:
            await conn.close()
            raise
        return conn, auto

    async def _close_postgresql(self) -> None:
        pg, self._pg = self._pg, None
        for conn in pg or ():
            with contextlib.suppress(Exception):  # it may be the broken one
                await conn.close()

    def _commit_one_key(
        self, auto: Connection, conn: Connection, batch: list[_Op]
    ) -> list[Any] | None:
        """PostgreSQL, a batch whose rows all belong to one key: one statement each
        for its closes and its opens, in autocommit (see ``pgbatch``).

        None when the batch spans several keys (then one transaction takes it,
        keys locked in order). Each statement is atomic; if the opens' fails
        after the closes' committed, the whole batch is retried and the closes
        find their rows closed already, so nothing is billed twice.
        """
        opens = [op.row for op in batch if type(op.row) is OpenRow]
        closes = [op.row for op in batch if type(op.row) is CloseRow]
        if len(opens) + len(closes) < len(batch) or any(r.claim is not None for r in opens):
            return None  # claims, and their ends: the transaction takes them
        if closes and self.alerts is not None:
            return None  # alerts are written in the closes' transaction
        keys = {r.key_id for r in (*opens, *closes) if r.key_id != MASTER_ID}
        if len(keys) > 1:
            return None
        key = next(iter(keys), None)
        results: dict[int, Any] = {}
        if closes:
            todo = _first_closes(closes, results)
            params = pgbatch.rows_param([row.params() for row in todo], k_id=key)
            statement = pgbatch.CLOSE_AND_SPEND if key is not None else pgbatch.CLOSE
            closed = set(auto.exec_driver_sql(statement, params).scalars())
            for row in todo:
                if row.id not in closed:
                    results[id(row)] = False
        if opens:
            values = [row.values() for row in opens]
            checked = [r for r in opens if r.status == "open" and r.check_key and r.key_id == key]
            users = _end_users(checked)
            if len({r.windows for r in checked}) > 1 or users is _MIXED:  # row by row
                with conn.begin():
                    self._open_rows(conn, opens, results)
                return [results[id(op.row)] for op in batch]
            if not checked:
                auto.exec_driver_sql(pgbatch.OPEN, pgbatch.rows_param(values))
                inserted = len(opens)
            else:
                params = pgbatch.rows_param(
                    values,
                    k_id=key,
                    k_now=time.time(),
                    k_amount=sum(r.reserved_nanos for r in checked),
                    **window_params(checked[0].windows),
                )
                if users is None:  # no end user's budget to reserve on: one statement
                    inserted = auto.exec_driver_sql(pgbatch.RESERVE_AND_OPEN, params).rowcount
                else:
                    inserted = self._reserve_users_and_open(conn, params, len(opens), *users)
            if inserted == len(opens):
                for row in opens:
                    results[id(row)] = Admission(True)
            else:  # the budget does not cover them all (or the key is gone): row by row
                with conn.begin():
                    self._open_rows(conn, opens, results)
        return [results[id(op.row)] for op in batch]

    @staticmethod
    def _reserve_users_and_open(
        conn: Connection,
        params: dict[str, Any],
        rows: int,
        users: list[dict[str, Any]],
        limit: int,
    ) -> int:
        """Reserve on the key and its end users and insert the rows, in one
        statement in a transaction that commits only if all of them fit."""
        params.update(users=orjson.dumps(users).decode(), n_users=len(users), lim=limit)
        with conn.begin() as transaction:
            result = conn.exec_driver_sql(pgbatch.RESERVE_USERS_AND_OPEN, params)
            inserted = int(result.scalar_one())
            if inserted != rows:
                transaction.rollback()
        return inserted

    def _commit_sync(self, conn: Connection, batch: list[_Op]) -> list[Any]:
        """One transaction for the whole batch, with a handful of statements.

        Its cost grows with the number of keys in the batch, not of rows:
        reservations are taken per key in one conditional UPDATE (per row only
        when that fails, to find which rows the budget still covers), rows are
        inserted with one executemany, and closes update every still-open row
        with one executemany.
        """
        opens = [op.row for op in batch if isinstance(op.row, OpenRow)]
        closes = [op.row for op in batch if isinstance(op.row, CloseRow)]
        ends = [op.row for op in batch if isinstance(op.row, ClaimEnd)]
        results: dict[int, Any] = {}
        keys = sorted({r.key_id for r in (*opens, *closes) if r.key_id != MASTER_ID})
        if len(keys) > 1 and self.db.dialect == "postgresql":
            # Lock the keys in one order, so concurrent replicas never deadlock
            # (a transaction that touches one key cannot be part of a cycle).
            conn.execute(_LOCK_KEYS, {"k_ids": keys})
        claimed = [r for r in opens if r.claim is not None]
        if claimed:
            opens = self._claim(conn, opens, claimed, results)
        self._open_rows(conn, opens, results)
        if claimed:
            # Claimed but refused (budget, key gone): the claim goes back with it.
            refused = [r for r in claimed if id(r) in results and not results[id(r)].ok]
            claims.give_back(
                conn,
                self.db.dialect,
                [ClaimEnd(r.key_id, r.claim.idempotency_key, r.id) for r in refused if r.claim],
            )
        self._close_rows(conn, closes, results)
        if ends:
            claims.give_back(conn, self.db.dialect, ends)
            for end in ends:
                results[id(end)] = True
        return [results[id(op.row)] for op in batch]

    def _claim(
        self,
        conn: Connection,
        opens: list[OpenRow],
        claimed: list[OpenRow],
        results: dict[int, Any],
    ) -> list[OpenRow]:
        """Claim the keys of ``claimed`` (billing.claims); the opens to write: those
        without a claim and those that got theirs. The others get
        ``Admission(False, "claimed")`` and write nothing."""
        rows: list[list[Any]] = []
        seen: set[tuple[str, str]] = set()
        for row in claimed:
            assert row.claim is not None
            scope = (row.key_id, row.claim.idempotency_key)
            if scope not in seen:  # the same key twice in a batch: the first claims it
                seen.add(scope)
                rows.append(claims.claim_values(row.key_id, row.id, row.instance, row.claim))
        won = claims.take(conn, self.db.dialect, rows)
        kept = []
        for row in opens:
            if row.claim is None or row.id in won:
                kept.append(row)
            else:
                results[id(row)] = Admission(False, "claimed")
        return kept

    def _open_rows(self, conn: Connection, opens: list[OpenRow], results: dict[int, Any]) -> None:
        now = time.time()
        by_key: dict[tuple[str, Windows], list[OpenRow]] = defaultdict(list)
        for row in opens:
            if row.status == "open" and row.check_key and row.key_id != MASTER_ID:
                by_key[row.key_id, row.windows].append(row)
            else:
                results[id(row)] = Admission(True)
        for key_id, windows in sorted(by_key):
            rows = by_key[key_id, windows]
            total = sum(r.reserved_nanos for r in rows)
            taken = self._executemany(
                conn,
                _RESERVE,
                [{"k_id": key_id, "k_now": now, "k_amount": total, **window_params(windows)}],
            )
            if taken.rowcount == 1:
                for row in rows:
                    results[id(row)] = Admission(True)
                continue
            for row in rows:  # not all fit (or the key is gone): row by row
                admission = self._reserve(conn, row, now)
                if not admission.ok:
                    row.status = "rejected"
                    row.error = f"refused: {admission.reason}"
                results[id(row)] = admission
        self._reserve_end_users(conn, [r for rows in by_key.values() for r in rows], results)
        if not opens:
            return
        if self.db.dialect == "postgresql":
            conn.exec_driver_sql(pgbatch.OPEN, pgbatch.rows_param([r.values() for r in opens]))
        else:
            self._executemany(conn, _OPEN, [row.values() for row in opens])

    def _reserve_end_users(
        self, conn: Connection, rows: list[OpenRow], results: dict[int, Any]
    ) -> None:
        """Reserve on the end users' budgets for the rows their key admitted (after
        the key's own row: one lock order everywhere); a row the end user's budget
        does not cover is refused and gives its key reservation back."""
        groups: dict[tuple[str, str, EndUserBudget], list[OpenRow]] = defaultdict(list)
        for row in rows:
            if row.end_user is not None and row.user is not None and results[id(row)].ok:
                groups[row.key_id, row.user, row.end_user].append(row)
        for (key_id, user, budget), members in sorted(groups.items(), key=lambda item: item[0][:2]):
            total = sum(r.reserved_nanos for r in members)
            if endusers.reserve(conn, key_id, user, budget, total):
                continue
            for row in members:  # not all fit: row by row
                if endusers.reserve(conn, key_id, user, budget, row.reserved_nanos):
                    continue
                endusers.unreserve_key(conn, key_id, row.reserved_nanos)
                left = endusers.available(conn, key_id, user, budget)
                results[id(row)] = Admission(
                    False, "end_user_budget", budget.limit_nanos, left, budget.period
                )
                row.status = "rejected"
                row.error = "refused: end_user_budget"

    def _close_rows(
        self, conn: Connection, closes: list[CloseRow], results: dict[int, Any]
    ) -> None:
        if not closes:
            return
        todo = _first_closes(closes, results)
        closed = self._close_open(conn, todo)
        if len(closed) != len(todo):  # some were closed already (by another close)
            for row in todo:
                if row.id not in closed:
                    results[id(row)] = False
            todo = [row for row in todo if row.id in closed]
        spend: dict[tuple[str, Windows], list[int]] = defaultdict(lambda: [0, 0])
        for row in todo:
            if row.key_id != MASTER_ID:
                totals = spend[row.key_id, row.windows]
                totals[0] += row.cost_nanos
                totals[1] += row.reserved_nanos
        if spend:
            self._executemany(
                conn,
                _SPEND,
                [
                    {"k_id": key, "k_cost": cost, "k_reserved": reserved, **window_params(windows)}
                    for (key, windows), (cost, reserved) in sorted(spend.items())
                ],
            )
        users: dict[tuple[str, str, float], list[int]] = defaultdict(lambda: [0, 0])
        for row in todo:
            if row.end_user is not None:
                totals = users[row.key_id, row.end_user, row.end_user_window]
                totals[0] += row.cost_nanos
                totals[1] += row.reserved_nanos
        endusers.spend(conn, [(*group, cost, res) for group, (cost, res) in sorted(users.items())])
        if self.alerts is not None and (spend or users):
            self.alerts.after_spend(conn, spend, users)

    def _close_open(self, conn: Connection, rows: list[CloseRow]) -> set[str]:
        """Close those of ``rows`` still open; the ids this closed."""
        params = [row.params() for row in rows]
        if self.db.dialect == "postgresql":
            return set(conn.exec_driver_sql(pgbatch.CLOSE, pgbatch.rows_param(params)).scalars())
        # SQLite: one writer at a time, so what this transaction reads as open
        # stays open until it commits.
        # One constant statement (the ids as one JSON array): no SQL to build
        # per batch, which through SQLAlchemy cost ~200 µs a batch.
        found = conn.exec_driver_sql(_SQLITE_STILL_OPEN, (orjson.dumps([row.id for row in rows]),))
        still_open = {r[0] for r in found}
        todo = [p for p in params if p["r_id"] in still_open]
        if todo:
            done = self._executemany(conn, _CLOSE, todo)
            if done.rowcount not in (-1, len(todo)):  # pragma: no cover - raced
                raise RuntimeError("ledger rows changed under the batch; retrying")
        return still_open

    def _executemany(self, conn: Connection, statement: Any, rows: list[dict[str, Any]]) -> Any:
        """Run a statement (for one row or many) straight through the driver.

        SQLAlchemy writes the SQL (once per dialect); the driver's own
        executemany binds the rows, without SQLAlchemy's per-row processing,
        which was half the ledger's cost per request here.
        """
        key = (id(statement), conn.dialect.name)
        compiled = self._compiled.get(key)
        if compiled is None:
            done = statement.compile(dialect=conn.dialect)
            # Positional styles (sqlite's "?") take tuples in bind order; named
            # ones (psycopg's "%(name)s") take the rows as they are.
            names = tuple(done.positiontup) if done.positional and done.positiontup else None
            getter = _row_getter(names) if names else None
            compiled = self._compiled[key] = (done.string, getter)
        sql, getter = compiled
        if getter is None:
            return conn.exec_driver_sql(sql, rows)
        return conn.exec_driver_sql(sql, list(map(getter, rows)))

    def _reserve(self, conn: Connection, row: OpenRow, now: float) -> Admission:
        params = {"k_id": row.key_id, "k_now": now, "k_amount": row.reserved_nanos}
        taken = self._executemany(conn, _RESERVE, [{**params, **window_params(row.windows)}])
        if taken.rowcount == 1:
            return Admission(True)
        key = conn.execute(select(api_keys).where(api_keys.c.id == row.key_id)).first()
        if key is None:
            return Admission(False, "missing")
        if key.revoked_at is not None:
            return Admission(False, "revoked")
        if key.expires_at is not None and key.expires_at <= now:
            return Admission(False, "expired")
        period, limit, available = refusal(key, row.reserved_nanos, row.windows)
        return Admission(False, "budget", limit, available, period)

    async def open_rows(self, instance: str) -> list[Any]:
        async with self.db.engine.connect() as conn:
            result = await conn.execute(
                select(requests).where(requests.c.instance == instance, requests.c.status == "open")
            )
            return list(result.all())
