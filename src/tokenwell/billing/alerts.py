"""Alerts: webhooks when spend crosses a share of a budget, or a key is about to expire.

Written to an outbox in the ledger's database in the transaction of what
caused them: a threshold crossing by the ledger's close that moved the spend
over the line (``AlertWriter``, called by the ledger), an expiring key by the
scan that marked the key announced. So an alert exists exactly when its
cause committed: none for spend that never committed, none lost in a crash.

``AlertDelivery`` (one per server) posts each outbox row to ``[alerts] url``
until an answer in 2xx, with exponential backoff, at least once: a row is
leased to one server at a time, and one whose server died mid-delivery is
sent again when its lease ends. The body (with its ``id``) is the same bytes
on every attempt, signed in ``X-Tokenwell-Signature: <hex>``
(HMAC-SHA256 of the body with ``[alerts] secret``); receivers deduplicate by
the id (also in ``X-Tokenwell-Delivery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import secrets
import time
from decimal import Decimal
from typing import Any

import httpx
import orjson
from sqlalchemy import Connection, and_, insert, or_, select, update

from tokenwell.billing import periods
from tokenwell.billing.db import Database, alert_outbox, api_keys, end_user_spend
from tokenwell.billing.money import nanos_to_usd
from tokenwell.billing.periods import Windows
from tokenwell.config import AlertsConfig

log = logging.getLogger(__name__)

_o = alert_outbox.c


def sign(secret: str, body: bytes) -> str:
    """``X-Tokenwell-Signature``: the HMAC-SHA256 of the body with the secret, in hex."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _row(event: str, key_id: str | None, fields: dict[str, Any], now: float) -> dict[str, Any]:
    alert_id = "alert_" + secrets.token_hex(12)
    body = {"id": alert_id, "type": event, "created_at": periods.iso(now), **fields}
    return {
        "id": alert_id,
        "event": event,
        "key_id": key_id,
        "body": orjson.dumps(body).decode(),
        "created_at": now,
        "attempts": 0,
        "next_attempt_at": now,
    }


def _crossed(thresholds: list[float], limit: int | None, after: int, added: int) -> list[float]:
    """The thresholds (shares of ``limit``) that spend crossed going from
    ``after - added`` to ``after``."""
    if limit is None or limit <= 0 or added <= 0:
        return []
    before = after - added
    return [t for t in thresholds if before < Decimal(str(t)) * limit <= after]


class AlertWriter:
    """Threshold crossings of a batch of closes, into the outbox (in the ledger's
    transaction, after the spend was added)."""

    def __init__(self, thresholds: list[float]) -> None:
        self.thresholds = sorted(set(thresholds))
        self.written = 0  # rows written by commits not yet told to the delivery

    def after_spend(
        self,
        conn: Connection,
        keys: dict[tuple[str, Windows], list[int]],
        users: dict[tuple[str, str, float], list[int]],
    ) -> None:
        """``keys``: (key, windows) → [cost, reserved] added; ``users`` likewise per
        (key, end user, window)."""
        now = time.time()
        ids = sorted({key for key, _ in keys} | {key for key, _, _ in users})
        if not ids:
            return
        records = {
            row.id: row for row in conn.execute(select(api_keys).where(api_keys.c.id.in_(ids)))
        }
        rows: list[dict[str, Any]] = []
        for key_id, record in records.items():
            added = [(w, cost) for (k, w), (cost, _) in keys.items() if k == key_id]
            total = sum(cost for _, cost in added)
            rows += self._alerts(
                record, "total", record.budget_nanos, record.spent_nanos, total, now
            )
            for i, period in enumerate(periods.PERIODS):
                start = getattr(record, f"{period}_start")
                cost = sum(c for w, c in added if w[i] == start)
                limit = getattr(record, f"{period}_budget_nanos")
                spent = getattr(record, f"{period}_spent_nanos")
                rows += self._alerts(record, period, limit, spent, cost, now)
        for (key_id, user, window), (cost, _) in sorted(users.items()):
            record = records.get(key_id)
            if record is None or record.end_user_budget_nanos is None:
                continue
            spent = conn.execute(
                select(end_user_spend.c.spent_nanos).where(
                    end_user_spend.c.key_id == key_id,
                    end_user_spend.c.end_user == user,
                    end_user_spend.c.window_start == window,
                )
            ).scalar()
            if spent is not None:
                period = record.end_user_period or "total"
                limit = record.end_user_budget_nanos
                rows += self._alerts(record, period, limit, spent, cost, now, user)
        if rows:
            conn.execute(insert(alert_outbox), rows)
            self.written += len(rows)

    def _alerts(
        self,
        record: Any,
        period: str,
        limit: int | None,
        spent: int,
        added: int,
        now: float,
        user: str | None = None,
    ) -> list[dict[str, Any]]:
        out = []
        for threshold in _crossed(self.thresholds, limit, spent, added):
            assert limit is not None
            fields = {
                "key_id": record.id,
                "key_name": record.name,
                "scope": "key" if user is None else "end_user",
                "end_user": user,
                "period": period,
                "threshold": threshold,
                "budget_usd": nanos_to_usd(limit),
                "spent_usd": nanos_to_usd(spent),
                "resets_at": periods.iso(periods.next_reset(period, now, record.timezone)),
            }
            out.append(_row("budget.threshold", record.id, fields, now))
        return out


async def scan_expiring(db: Database, warning_seconds: float) -> int:
    """Announce each key that expires within ``warning_seconds`` once per expiry
    date (the key is marked in the same transaction: one alert across replicas)."""
    now = time.time()
    c = api_keys.c
    due = and_(
        c.revoked_at.is_(None),
        c.expires_at.is_not(None),
        c.expires_at > now,
        c.expires_at <= now + warning_seconds,
        or_(c.expiry_alerted.is_(None), c.expiry_alerted != c.expires_at),
    )
    written = 0
    async with db.engine.begin() as conn:
        for key in (await conn.execute(select(api_keys).where(due))).all():
            marked = await conn.execute(
                update(api_keys).where(c.id == key.id, due).values(expiry_alerted=c.expires_at)
            )
            if marked.rowcount != 1:
                continue
            fields = {
                "key_id": key.id,
                "key_name": key.name,
                "expires_at": periods.iso(key.expires_at),
            }
            await conn.execute(
                insert(alert_outbox).values(_row("key.expiring", key.id, fields, now))
            )
            written += 1
    return written


class AlertDelivery:
    """Posts the outbox's due rows to the configured URL; one per server."""

    def __init__(self, db: Database, config: AlertsConfig) -> None:
        self.db = db
        self.config = config
        self.delivered = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.config.timeout_seconds)
        self._task = asyncio.create_task(self._run(), name="alert-delivery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def wake(self) -> None:
        """New rows were committed: look now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        next_scan = 0.0
        while True:
            try:
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + self.config.expiry_scan_seconds
                    await scan_expiring(self.db, self.config.expiry_warning_seconds)
                while await self._deliver_one():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: the rows wait, try again
                log.warning("alert delivery: %s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_seconds)

    async def _deliver_one(self) -> bool:
        """Lease one due row and post it; False when none is due."""
        now = time.time()
        open_ = and_(
            _o.delivered_at.is_(None),
            _o.failed_at.is_(None),
            _o.next_attempt_at <= now,
            or_(_o.lease_until.is_(None), _o.lease_until < now),
        )
        lease = now + self.config.timeout_seconds + 5
        async with self.db.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(alert_outbox).where(open_).order_by(_o.created_at).limit(1)
                )
            ).first()
            if row is None:
                return False
            taken = await conn.execute(
                update(alert_outbox).where(_o.id == row.id, open_).values(lease_until=lease)
            )
            if taken.rowcount != 1:
                return True  # another server took it: look for the next
        error = await self._post(row)
        attempts = row.attempts + 1
        done = time.time()
        if error is None:
            values: dict[str, Any] = {"delivered_at": done, "lease_until": None}
            self.delivered += 1
        else:
            delay = min(self.config.retry_base_seconds * 2 ** (attempts - 1), 300.0)
            values = {
                "next_attempt_at": done + delay * random.uniform(1.0, 1.2),
                "lease_until": None,
                "last_error": error[:1000],
            }
            if attempts >= self.config.max_attempts:
                values["failed_at"] = done
                log.error("alert %s given up after %d attempts: %s", row.id, attempts, error)
        async with self.db.engine.begin() as conn:
            await conn.execute(
                update(alert_outbox).where(_o.id == row.id).values(attempts=attempts, **values)
            )
        return True

    async def _post(self, row: Any) -> str | None:
        """None when the receiver took it (2xx), else why not."""
        assert self._client is not None
        body = row.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "tokenwell-alerts",
            "X-Tokenwell-Signature": sign(self.config.secret, body),
            "X-Tokenwell-Delivery": row.id,
            "X-Tokenwell-Event": row.event,
        }
        try:
            response = await self._client.post(self.config.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"


async def outbox(db: Database, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest alerts and where their delivery stands (``GET /admin/alerts``)."""
    async with db.engine.connect() as conn:
        rows = (
            await conn.execute(select(alert_outbox).order_by(_o.created_at.desc()).limit(limit))
        ).all()
    return [_public(row) for row in rows]


def _public(row: Any) -> dict[str, Any]:
    if row.delivered_at is not None:
        status = "delivered"
    elif row.failed_at is not None:
        status = "failed"
    else:
        status = "pending"
    return {
        "id": row.id,
        "object": "alert",
        "event": row.event,
        "key_id": row.key_id,
        "status": status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "created_at": periods.iso(row.created_at),
        "delivered_at": periods.iso(row.delivered_at),
        "body": orjson.loads(row.body),
    }
