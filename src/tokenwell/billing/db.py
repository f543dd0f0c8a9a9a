"""The database: tables, the async engine, and migrations.

One code path for SQLite (the default, a file in the data directory, WAL)
and PostgreSQL (``postgresql://…``): SQLAlchemy Core over aiosqlite or
psycopg, with Alembic migrations applied at start-up. Times are UNIX seconds
(floats) and each ledger row carries its UTC day, so reports group the same
way on both databases.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    create_engine,
    event,
    false,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tokenwell.errors import ConfigError

log = logging.getLogger(__name__)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("key_prefix", String(24), nullable=False),
    Column("budget_nanos", BigInteger, nullable=True),
    Column("spent_nanos", BigInteger, nullable=False, server_default="0"),
    Column("reserved_nanos", BigInteger, nullable=False, server_default="0"),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("models", JSON, nullable=True),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    # Budgets per calendar period (migration 0006, see billing.periods): the
    # limit, the spend of the current window and when that window began, in
    # the key's time zone (UTC when none).
    Column("timezone", String(64), nullable=True),
    *[
        column
        for period in ("day", "week", "month")
        for column in (
            Column(f"{period}_budget_nanos", BigInteger, nullable=True),
            Column(f"{period}_spent_nanos", BigInteger, nullable=False, server_default="0"),
            Column(f"{period}_start", Float, nullable=False, server_default="0"),
        )
    ],
    # What each end user of the key may spend (one budget, any period) and
    # request (migration 0007); their spend is in end_user_spend.
    Column("end_user_budget_nanos", BigInteger, nullable=True),
    Column("end_user_period", String(8), nullable=True),
    Column("end_user_rpm", Integer, nullable=True),
    Column("end_user_tpm", Integer, nullable=True),
    # The secret a rotation replaced, accepted until its grace period ends
    # (migration 0008).
    Column("previous_key_hash", String(64), nullable=True),
    Column("previous_expires_at", Float, nullable=True),
    Index("ix_api_keys_previous_key_hash", "previous_key_hash"),
    # The expiry an "expiring" alert was written for (migration 0009).
    Column("expiry_alerted", Float, nullable=True),
)

# Alerts to deliver (billing.alerts): written in the transaction of the change
# that caused them (a close's spend, a key found expiring), then delivered at
# least once, retried with backoff; ``body`` is sent as it is on every attempt.
alert_outbox = Table(
    "alert_outbox",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("event", String(32), nullable=False),
    Column("key_id", String(40), nullable=True),
    Column("body", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_until", Float, nullable=True),
    Column("delivered_at", Float, nullable=True),
    Column("failed_at", Float, nullable=True),
    Column("last_error", Text, nullable=True),
    Index("ix_alert_outbox_due", "next_attempt_at"),
)

# Who changed which key, how and when: creation, changes, rotation, revocation.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(32), nullable=False),
    Column("key_id", String(40), nullable=True),
    Column("detail", Text, nullable=True),
    Index("ix_audit_log_key", "key_id", "id"),
)

# Per (key, end user): the spend of the current window of the key's end-user
# budget and what is reserved for their requests in flight, like a key's own.
end_user_spend = Table(
    "end_user_spend",
    metadata,
    Column("key_id", String(40), nullable=False),
    Column("end_user", String(256), nullable=False),
    Column("window_start", Float, nullable=False, server_default="0"),
    Column("spent_nanos", BigInteger, nullable=False, server_default="0"),
    Column("reserved_nanos", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("key_id", "end_user", name="pk_end_user_spend"),
)

requests = Table(
    "requests",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("key_id", String(40), nullable=False),
    Column("model", String(200), nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("include_usage", Boolean, nullable=False),
    Column("n", Integer, nullable=False, server_default="1"),
    Column("status", String(24), nullable=False),
    Column("prompt_tokens", Integer, nullable=False, server_default="0"),
    Column("cached_tokens", Integer, nullable=False, server_default="0"),
    Column("completion_tokens", Integer, nullable=False, server_default="0"),
    Column("reserved_nanos", BigInteger, nullable=False, server_default="0"),
    Column("cost_nanos", BigInteger, nullable=False, server_default="0"),
    Column("estimated", Boolean, nullable=False, server_default=false()),
    Column("queue_ms", Float, nullable=True),
    Column("ttft_ms", Float, nullable=True),
    Column("total_ms", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("closed_at", Float, nullable=True),
    Column("day", String(10), nullable=False),
    Column("instance", String(64), nullable=False),
    Column("user", String(256), nullable=True),
    Column("error", Text, nullable=True),
    # A request made with an Idempotency-Key: its one row, and how many other
    # connections were answered from it (finished: replays; running: attachments).
    Column("idempotency_key", String(255), nullable=True),
    Column("replays", Integer, nullable=False, server_default="0"),
    Column("attachments", Integer, nullable=False, server_default="0"),
    # The wire API the request came in by (migration 0005).
    Column("api", String(32), nullable=False, server_default="chat.completions"),
    # The request's metadata, as a JSON object of strings (migration 0007).
    Column("tags", Text, nullable=True),
    # The window of its end user's budget it reserved in, if it did (migration
    # 0010): what a recovery releases there.
    Column("end_user_window", Float, nullable=True),
    Index("ix_requests_key_day", "key_id", "day"),
    # Only the rows in flight (recovery's lookup), see migration 0002.
    Index(
        "ix_requests_open",
        "instance",
        sqlite_where=text("status = 'open'"),
        postgresql_where=text("status = 'open'"),
    ),
)

# One row per (API key, Idempotency-Key): claimed before the request is
# admitted (the primary key makes concurrent first requests, on any replica,
# generate once), finished with the response to replay. See billing.idempotency.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key_id", String(40), nullable=False),
    Column("idempotency_key", String(255), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("state", String(16), nullable=False),  # running | done
    Column("instance", String(64), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("content_type", String(100), nullable=True),
    Column("body", LargeBinary, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    PrimaryKeyConstraint("key_id", "idempotency_key", name="pk_idempotency_keys"),
    Index("ix_idempotency_keys_expires", "expires_at"),
)

# Stored Responses API responses (``store`` true, the default), scoped to the
# API key that made them: the response object as last rendered, this request's
# input items, and the whole conversation up to it (``previous_response_id``
# reads one row). See billing.responses.
stored_responses = Table(
    "stored_responses",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("key_id", String(40), nullable=False),
    Column("request_id", String(64), nullable=True),
    Column("model", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("background", Boolean, nullable=False),
    Column("previous_response_id", String(64), nullable=True),
    Column("input_items", LargeBinary, nullable=False),
    Column("history", LargeBinary, nullable=False),
    Column("response", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_stored_responses_key", "key_id", "created_at"),
)


# What a ledger row's open writes (``OpenRow.values()``); the other columns
# keep their defaults until the close.
OPEN_COLUMNS = (
    "id",
    "key_id",
    "model",
    "stream",
    "include_usage",
    "n",
    "status",
    "prompt_tokens",
    "reserved_nanos",
    "created_at",
    "day",
    "instance",
    "user",
    "closed_at",
    "error",
    "idempotency_key",
    "api",
    "tags",
    "end_user_window",
)
# What its close writes: (parameter of ``CloseRow.params()``, column). The
# parameters are prefixed: a bound parameter may not share its column's name
# in an UPDATE.
CLOSE_COLUMNS = (
    ("r_status", "status"),
    ("r_prompt", "prompt_tokens"),
    ("r_cached", "cached_tokens"),
    ("r_completion", "completion_tokens"),
    ("r_cost", "cost_nanos"),
    ("r_estimated", "estimated"),
    ("r_queue", "queue_ms"),
    ("r_ttft", "ttft_ms"),
    ("r_total", "total_ms"),
    ("r_closed", "closed_at"),
    ("r_error", "error"),
)


def async_url(url: str) -> str:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ConfigError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit survives a crash of the process (kill -9); only a
    # power loss can take the last commits back.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_ledger_pragmas(dbapi_conn: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_conn, record)
    # The ledger's commits never checkpoint the WAL themselves (a checkpoint
    # writes and fsyncs megabytes, and every admission waiting on that commit
    # would wait for it too): a Checkpointer thread does it in the background.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


class Checkpointer:
    """SQLite WAL checkpoints on a thread of their own, off the commit path."""

    def __init__(self, db: Database, interval: float = 1.0) -> None:
        self.db = db
        self.interval = interval
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        assert self.db.sync_engine is not None  # SQLite's
        with self.db.sync_engine.connect() as conn:
            while not self._stop.wait(self.interval):
                self._checkpoint(conn, "PASSIVE")
            self._checkpoint(conn, "TRUNCATE")  # leave a small WAL behind

    def _checkpoint(self, conn: Connection, mode: str) -> None:
        try:
            conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})").all()
            self.checkpoints += 1
        except Exception as exc:  # busy or I/O: the next round tries again
            log.warning("SQLite checkpoint failed: %s", exc)


T = TypeVar("T")


def is_busy(exc: OperationalError) -> bool:
    """SQLite said another connection holds the lock (SQLITE_BUSY)."""
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "postgres":
            self.dialect = "postgresql"
        self.sqlite_path: Path | None = None
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            if not parsed.database or parsed.database == ":memory:":
                raise ConfigError("the SQLite ledger needs a file, not :memory:")
            self.sqlite_path = Path(parsed.database).expanduser()
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(async_url(url), **kwargs)
        # SQLite's ledger writes go through a plain (sync) engine, on the
        # event loop or, while another writer holds the lock, the ledger's
        # thread, and its checkpoints on another (see Ledger._commit);
        # PostgreSQL's through the async engine.
        self.sync_engine: Engine | None = None
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            self.sync_engine = create_engine(str(make_url(url).set(drivername="sqlite")))
            event.listen(self.sync_engine, "connect", _sqlite_ledger_pragmas)
        self._on_loop: Connection | None = None

    async def run(self, work: Callable[[Connection], T]) -> T:
        """``work`` in one transaction, from the event loop.

        SQLite: on the loop itself, on a connection that never waits for a
        lock: a one-row statement takes ~0.1 ms there, against ~1 ms through
        the async driver's thread (a hop per statement, and the GIL back each
        time). While another writer holds the lock, the transaction rolls
        back and runs again through the async engine, which waits off the
        loop. PostgreSQL: through the async engine (each wait an await).
        ``work`` must not block on anything but the database."""
        done, result = self.try_on_loop(work)
        if done:
            return cast(T, result)
        async with self.engine.begin() as aconn:
            return await aconn.run_sync(work)

    def try_on_loop(self, work: Callable[[Connection], T]) -> tuple[bool, T | None]:
        """``work`` in one transaction, now, on the event loop, where the database
        is SQLite and no other writer holds its lock: (True, its result). Else
        (False, None), and nothing of it was written."""
        if self.sync_engine is None:
            return False, None
        try:
            conn = self._loop_connection()
            with conn.begin():
                return True, work(conn)
        except OperationalError as exc:
            self._drop_loop_connection()
            if not is_busy(exc):
                raise
            return False, None

    def _loop_connection(self) -> Connection:
        if self._on_loop is None or self._on_loop.closed:
            assert self.sync_engine is not None
            conn = self.sync_engine.connect()
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            conn.commit()
            self._on_loop = conn
        return self._on_loop

    def _drop_loop_connection(self) -> None:
        conn, self._on_loop = self._on_loop, None
        if conn is not None:
            conn.invalidate()  # not back to the pool: its busy_timeout is not the others'
            conn.close()

    async def close(self) -> None:
        self._drop_loop_connection()
        await self.engine.dispose()
        if self.sync_engine is not None:
            self.sync_engine.dispose()

    async def migrate(self) -> None:
        """Bring the schema to the newest revision (safe with several processes)."""
        with self._migration_lock_file():
            async with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    # One replica migrates; the others wait, then find it done.
                    await conn.execute(text("SELECT pg_advisory_xact_lock(7318004)"))
                await conn.run_sync(_upgrade)

    @contextlib.contextmanager
    def _migration_lock_file(self) -> Iterator[None]:
        if self.sqlite_path is None:
            yield
            return
        lock = self.sqlite_path.with_name(self.sqlite_path.name + ".migrate-lock")
        with lock.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "tokenwell.billing:migrations")
    return cfg


def _upgrade(connection: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")
