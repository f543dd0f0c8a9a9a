"""API keys: created, listed, updated, revoked; stored only as a keyed hash.

A secret is ``tw-`` and 43 URL-safe characters. The database holds
HMAC-SHA256(server secret, key) and a short display prefix; the secret itself
is shown once, at creation, and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from sqlalchemy import insert, or_, select, update

from tokenwell.billing import audit, periods
from tokenwell.billing.db import Database, api_keys
from tokenwell.billing.keychanges import KeyChanges
from tokenwell.billing.money import nanos_to_usd, usd_to_nanos
from tokenwell.errors import InvalidRequest, NotFound
from tokenwell.protocol.validation import first_error

log = logging.getLogger(__name__)

KEY_PREFIX = "tw-"
# A known key is served from a cache entry up to this many cache periods old
# while it is re-read in the background.
_STALE_FACTOR = 5
MASTER_ID = "master"

# What a key's fields may hold: what the database columns and the money type can.
# rpm/tpm are INTEGER columns (32-bit in PostgreSQL); a budget is BIGINT nano-dollars
# (9.2e9 USD at most), capped lower so that spend and reservations added to it
# stay far inside 64 bits.
MAX_RATE = 2**31 - 1
MAX_BUDGET_USD = Decimal(1_000_000_000)
# Expiry dates, in UTC: from the epoch to the year before datetime's last.
MIN_YEAR, MAX_YEAR = 1970, 9998
_DECIMAL = re.compile(r"[0-9]{1,30}(\.[0-9]{1,30})?")


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyHasher:
    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def same(a: str, b: str) -> bool:
        return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    prefix: str
    budget_nanos: int | None = None
    spent_nanos: int = 0
    reserved_nanos: int = 0
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    created_at: float = 0.0
    key_hash: str = ""
    timezone: str | None = None
    # Per period ("day", "week", "month"): (limit or None, spent in the window, window start).
    periods: tuple[tuple[int | None, int, float], ...] = ((None, 0, 0.0),) * 3
    # What each end user of the key may spend per period, and request.
    end_user_budget_nanos: int | None = None
    end_user_period: str = "total"
    end_user_rpm: int | None = None
    end_user_tpm: int | None = None
    # The secret a rotation replaced (its hash), and when it stops working.
    previous_key_hash: str | None = None
    previous_expires_at: float | None = None
    # Found by that replaced secret: it works only until previous_expires_at.
    via_previous: bool = False

    @property
    def is_master(self) -> bool:
        return self.id == MASTER_ID

    def budgets(self, now: float | None = None) -> list[dict[str, Any]]:
        """Each limit of the key: its period, amount, spend in the current window,
        what is left (after reservations in flight) and when it resets."""
        now = time.time() if now is None else now
        out = []
        if self.budget_nanos is not None:
            out.append(_budget("total", self.budget_nanos, self.spent_nanos, self.reserved_nanos))
        for period, (limit, spent, start) in zip(periods.PERIODS, self.periods, strict=True):
            if limit is None:
                continue
            current = periods.window_start(period, now, self.timezone)
            spent = spent if start >= current else 0  # a new window has begun
            reset = periods.next_reset(period, now, self.timezone)
            out.append(_budget(period, limit, spent, self.reserved_nanos, reset))
        return out

    def state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.via_previous and (
            self.previous_expires_at is None or self.previous_expires_at <= now
        ):
            return "rotated"
        return "active"

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict[str, Any]:
        remaining = (
            None
            if self.budget_nanos is None
            else nanos_to_usd(max(self.budget_nanos - self.spent_nanos - self.reserved_nanos, 0))
        )
        return {
            "id": self.id,
            "object": "api_key",
            "name": self.name,
            "prefix": self.prefix,
            "budget_usd": None if self.budget_nanos is None else nanos_to_usd(self.budget_nanos),
            "spend_usd": nanos_to_usd(self.spent_nanos),
            "reserved_usd": nanos_to_usd(self.reserved_nanos),
            "remaining_usd": remaining,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "models": list(self.models) if self.models is not None else None,
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "created_at": _iso(self.created_at),
            "status": self.state(),
            "timezone": self.timezone,
            "budgets": self.budgets(),
            "end_user_budget": (
                None
                if self.end_user_budget_nanos is None
                else {
                    "usd": nanos_to_usd(self.end_user_budget_nanos),
                    "period": self.end_user_period,
                }
            ),
            "end_user_rpm": self.end_user_rpm,
            "end_user_tpm": self.end_user_tpm,
            "previous_key_expires_at": _iso(self.previous_expires_at),
        }

    def end_user_budget(
        self, spent: int, reserved: int, start: float, now: float
    ) -> dict[str, Any]:
        """An end user's view of the key's per-end-user budget (``end_user_budget_nanos`` set)."""
        assert self.end_user_budget_nanos is not None
        period = self.end_user_period
        if start < periods.window_start(period, now, self.timezone):
            spent = 0  # a new window has begun
        reset = periods.next_reset(period, now, self.timezone)
        return _budget(period, self.end_user_budget_nanos, spent, reserved, reset)


def _budget(
    period: str, limit: int, spent: int, reserved: int, resets_at: float | None = None
) -> dict[str, Any]:
    return {
        "period": period,
        "usd": nanos_to_usd(limit),
        "spent_usd": nanos_to_usd(spent),
        "remaining_usd": nanos_to_usd(max(limit - spent - reserved, 0)),
        "resets_at": periods.iso(resets_at),
    }


MASTER = KeyRecord(id=MASTER_ID, name="master", prefix="master")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat()
    except (ValueError, OverflowError, OSError):
        # A row stored before dates were range-checked: shown clamped, never a 500.
        return (datetime.min if ts < 0 else datetime.max).replace(tzinfo=UTC).isoformat()


def parse_when(value: str | datetime | date | None) -> float | None:
    """An ISO date or datetime (UTC when no zone is given) → UNIX seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"expected an ISO date or datetime, got {text!r}") from exc
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        value = value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(f"the date must be in the years {MIN_YEAR} to {MAX_YEAR} (UTC)") from exc
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValueError(f"the date must be in the years {MIN_YEAR} to {MAX_YEAR} (UTC)")
    return value.timestamp()


def _usd(value: Any) -> Any:
    """A budget: a number or a decimal string ("5.25"), as the API answers it."""
    if value is None or isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a number or a decimal string")
    if isinstance(value, str):
        if _DECIMAL.fullmatch(value.strip()) is None:
            raise ValueError(f"expected a decimal amount in USD, got {value[:40]!r}")
        return Decimal(value.strip())
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("expected a finite number")
    return Decimal(str(value))


USD = Annotated[Decimal, Field(ge=0, le=MAX_BUDGET_USD, max_digits=21, decimal_places=9)]


class Budget(BaseModel):
    """One limit: at most ``usd`` per ``period`` (calendar day, ISO week, month, or ever)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    usd: USD
    period: Literal["day", "week", "month", "total"]

    @field_validator("usd", mode="before")
    @classmethod
    def _amount(cls, value: Any) -> Any:
        return _usd(value)


class KeyFields(BaseModel):
    """What a client may set on a key (``POST``/``PATCH /admin/keys``, the CLI)."""

    # Strict: "60" is not a number of requests. A budget may be a number or a
    # decimal string ("5.25"), as the API answers it.
    model_config = ConfigDict(extra="forbid", strict=True)

    name: StrictStr | None = Field(default=None, min_length=1, max_length=200)
    budget_usd: Decimal | None = Field(
        default=None, ge=0, le=MAX_BUDGET_USD, max_digits=21, decimal_places=9
    )
    rpm: StrictInt | None = Field(default=None, ge=1, le=MAX_RATE)
    tpm: StrictInt | None = Field(default=None, ge=1, le=MAX_RATE)
    models: list[Annotated[StrictStr, Field(max_length=200)]] | None = Field(
        default=None, max_length=1000
    )
    expires_at: StrictStr | datetime | None = None
    # Several limits at once, one per period; ``budget_usd`` is the ``total`` one.
    budgets: list[Budget] | None = Field(default=None, max_length=4)
    # The IANA time zone whose midnights reset the key's budgets (UTC when unset).
    timezone: StrictStr | None = Field(default=None, max_length=64)
    # Every end user of the key (a request's ``user``) at most this, and these rates.
    end_user_budget: Budget | None = None
    end_user_rpm: StrictInt | None = Field(default=None, ge=1, le=MAX_RATE)
    end_user_tpm: StrictInt | None = Field(default=None, ge=1, le=MAX_RATE)

    @field_validator("budgets")
    @classmethod
    def _one_per_period(cls, value: list[Budget] | None) -> list[Budget] | None:
        if value is not None:
            seen = [b.period for b in value]
            if len(set(seen)) != len(seen):
                raise ValueError("at most one budget per period")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is not None:
            periods.zone(value)
        return value

    @field_validator("expires_at", mode="before")
    @classmethod
    def _expires_type(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("expected an ISO date or datetime string")
        return value

    @field_validator("budget_usd", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        return _usd(value)

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not m for m in value):
            raise ValueError("model names cannot be empty")
        return value

    @field_validator("expires_at")
    @classmethod
    def _expires(cls, value: str | datetime | None) -> str | datetime | None:
        parse_when(value)
        return value


# The longest grace a rotated secret may get: 90 days.
MAX_GRACE_SECONDS = 90 * 24 * 3600


class KeyRotation(BaseModel):
    """``POST /admin/keys/{id}/rotate``: how long the old secret keeps working."""

    model_config = ConfigDict(extra="forbid", strict=True)

    grace_seconds: StrictInt | float = Field(default=0, ge=0, le=MAX_GRACE_SECONDS)


def parse_rotation(data: Any) -> KeyRotation:
    if not isinstance(data, dict):
        raise InvalidRequest("Invalid request body: expected a JSON object.", code="invalid_type")
    try:
        return KeyRotation.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc) from exc


def parse_key_fields(data: Any, *, creating: bool) -> tuple[KeyFields, set[str]]:
    if not isinstance(data, dict):
        raise InvalidRequest("Invalid request body: expected a JSON object.", code="invalid_type")
    try:
        fields = KeyFields.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc) from exc
    if creating and not fields.name:
        raise InvalidRequest(
            "Missing required parameter: 'name'.", param="name", code="missing_required_parameter"
        )
    total = [b for b in fields.budgets or () if b.period == "total"]
    if total and "budget_usd" in data and fields.budget_usd != total[0].usd:
        raise InvalidRequest(
            "Invalid 'budgets': its total budget differs from 'budget_usd' (the same limit).",
            param="budgets",
            code="invalid_value",
        )
    return fields, set(data)


def _columns(fields: KeyFields, given: set[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "name" in given and fields.name is not None:
        values["name"] = fields.name
    if "budget_usd" in given:
        values["budget_nanos"] = (
            None if fields.budget_usd is None else usd_to_nanos(fields.budget_usd)
        )
    if "rpm" in given:
        values["rpm"] = fields.rpm
    if "tpm" in given:
        values["tpm"] = fields.tpm
    if "models" in given:
        values["models"] = fields.models
    if "expires_at" in given:
        values["expires_at"] = parse_when(fields.expires_at)
    if "budgets" in given:
        # The list is the key's whole set of limits: a period left out has none.
        limits = {b.period: usd_to_nanos(b.usd) for b in fields.budgets or ()}
        for period in periods.PERIODS:
            values[f"{period}_budget_nanos"] = limits.get(period)
        if "budget_usd" not in given:
            values["budget_nanos"] = limits.get("total")
    if "end_user_budget" in given:
        budget = fields.end_user_budget
        values["end_user_budget_nanos"] = None if budget is None else usd_to_nanos(budget.usd)
        values["end_user_period"] = None if budget is None else budget.period
    if "end_user_rpm" in given:
        values["end_user_rpm"] = fields.end_user_rpm
    if "end_user_tpm" in given:
        values["end_user_tpm"] = fields.end_user_tpm
    if "timezone" in given:
        values["timezone"] = fields.timezone
        # The windows begin again at the new zone's midnights, keeping their spend.
        now = time.time()
        for period in periods.PERIODS:
            values[f"{period}_start"] = periods.window_start(period, now, fields.timezone)
    return values


def record_of_row(row: Any, digest: str | None = None) -> KeyRecord:
    """The key of a row; ``digest``: the secret's hash it was looked up by."""
    models = row.models
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.key_prefix,
        budget_nanos=row.budget_nanos,
        spent_nanos=row.spent_nanos,
        reserved_nanos=row.reserved_nanos,
        rpm=row.rpm,
        tpm=row.tpm,
        models=tuple(models) if models is not None else None,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        created_at=row.created_at,
        key_hash=row.key_hash,
        timezone=row.timezone,
        periods=tuple(
            (
                getattr(row, f"{p}_budget_nanos"),
                getattr(row, f"{p}_spent_nanos"),
                getattr(row, f"{p}_start"),
            )
            for p in periods.PERIODS
        ),
        end_user_budget_nanos=row.end_user_budget_nanos,
        end_user_period=row.end_user_period or "total",
        end_user_rpm=row.end_user_rpm,
        end_user_tpm=row.end_user_tpm,
        previous_key_hash=row.previous_key_hash,
        previous_expires_at=row.previous_expires_at,
        via_previous=digest is not None and row.key_hash != digest,
    )


def _detail(fields: KeyFields, given: set[str]) -> dict[str, Any]:
    """What a create or update set, for the audit trail."""
    return fields.model_dump(mode="json", include=given)


class KeyStore:
    """Keys in the database, with a short-lived lookup cache.

    The cache only speeds up authentication; whether a key is revoked, expired
    or over budget is checked again, atomically, when the request's ledger row
    is written, so a revoked key is refused at once on every replica. Every
    other change (models, limits) reaches every replica's cache at once through
    ``changes`` (see ``billing.keychanges``): published after it commits.
    """

    def __init__(
        self,
        db: Database,
        hasher: KeyHasher,
        cache_seconds: float = 2.0,
        changes: KeyChanges | None = None,
        actor: str = "admin",
    ) -> None:
        self.db = db
        # Who the audit trail names for changes made through this store.
        self.actor = actor
        self.hasher = hasher
        self.cache_seconds = cache_seconds
        self.changes = changes
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._loading: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._forgotten: dict[str, float] = {}

    async def create(
        self, fields: KeyFields, given: set[str], actor: str | None = None
    ) -> tuple[str, KeyRecord]:
        secret = new_secret()
        values = _columns(fields, given)
        values.update(
            id="key_" + secrets.token_hex(8),
            key_hash=self.hasher.hash(secret),
            key_prefix=secret[:10],
            created_at=time.time(),
        )
        async with self.db.engine.begin() as conn:
            await conn.execute(insert(api_keys).values(**values))
            detail = _detail(fields, given)
            await audit.record(conn, actor or self.actor, "key.create", values["id"], detail)
        return secret, await self.get(values["id"])

    async def list(self, include_revoked: bool = True) -> list[KeyRecord]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [record_of_row(r) for r in rows]

    async def get(self, key_id: str) -> KeyRecord:
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None:
            raise NotFound(f"No API key with id {key_id!r}.", param="id", code="key_not_found")
        return record_of_row(row)

    async def timezones(self, key_ids: set[str]) -> dict[str, str | None]:
        """The time zone of each of these keys (those that exist)."""
        if not key_ids:
            return {}
        c = api_keys.c
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(select(c.id, c.timezone).where(c.id.in_(key_ids)))).all()
        return {row.id: row.timezone for row in rows}

    async def update(
        self, key_id: str, fields: KeyFields, given: set[str], actor: str | None = None
    ) -> KeyRecord:
        values = _columns(fields, given)
        if values:
            async with self.db.engine.begin() as conn:
                result = await conn.execute(
                    update(api_keys).where(api_keys.c.id == key_id).values(**values)
                )
                if result.rowcount == 0:
                    raise NotFound(
                        f"No API key with id {key_id!r}.", param="id", code="key_not_found"
                    )
                detail = _detail(fields, given)
                await audit.record(conn, actor or self.actor, "key.update", key_id, detail)
        record = await self.get(key_id)
        await self._changed_record(record)
        return record

    async def revoke(self, key_id: str, actor: str | None = None) -> KeyRecord:
        async with self.db.engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            if result.rowcount == 1:
                await audit.record(conn, actor or self.actor, "key.revoke", key_id, None)
        record = await self.get(key_id)  # NotFound for an unknown id
        if result.rowcount == 0 and record.revoked_at is None:  # pragma: no cover - raced
            raise NotFound(f"No API key with id {key_id!r}.", param="id", code="key_not_found")
        await self._changed_record(record)
        return record

    async def rotate(
        self, key_id: str, grace_seconds: float, actor: str | None = None
    ) -> tuple[str, KeyRecord]:
        """A new secret for the key: same id, budgets, limits and history. The old
        secret keeps working for ``grace_seconds``, then is refused (a secret
        replaced earlier stops at once: a key has at most two)."""
        secret = new_secret()
        now = time.time()
        async with self.db.engine.begin() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
            if row is None:
                raise NotFound(f"No API key with id {key_id!r}.", param="id", code="key_not_found")
            if row.revoked_at is not None:
                raise InvalidRequest(
                    f"The API key {key_id!r} is revoked: it cannot be rotated.",
                    param="id",
                    code="key_revoked",
                )
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.key_hash == row.key_hash)
                .values(
                    key_hash=self.hasher.hash(secret),
                    key_prefix=secret[:10],
                    previous_key_hash=row.key_hash,
                    previous_expires_at=now + grace_seconds,
                )
            )
            if result.rowcount != 1:  # pragma: no cover - rotated at the same moment
                raise InvalidRequest("The key was rotated meanwhile: try again.", param="id")
            detail = {"grace_seconds": grace_seconds, "previous_prefix": row.key_prefix}
            await audit.record(conn, actor or self.actor, "key.rotate", key_id, detail)
        for digest in (row.key_hash, row.previous_key_hash):
            if digest is not None:
                await self._changed(digest)
        return secret, await self.get(key_id)

    async def _changed_record(self, record: KeyRecord) -> None:
        await self._changed(record.key_hash)
        if record.previous_key_hash is not None:
            await self._changed(record.previous_key_hash)

    def listen(self) -> None:
        """Drop keys changed by other processes as they change (on the event loop)."""
        if self.changes is not None:
            self.changes.start(self._drop_changed)

    async def _changed(self, digest: str) -> None:
        self._drop(digest)
        if self.changes is not None:
            await self.changes.publish(digest)

    def _drop_changed(self, digest: str | None) -> None:
        if digest is None:
            now = time.monotonic()
            for known in list(self._cache):
                self._forgotten[known] = now
            self._cache.clear()
            # Loads that began before now must not cache what they read either.
            for loading in self._loading:
                self._forgotten[loading] = now
        else:
            self._drop(digest)

    async def lookup(self, secret: str) -> KeyRecord | None:
        return await self.lookup_hash(self.hasher.hash(secret))

    async def lookup_hash(self, digest: str) -> KeyRecord | None:
        """The key with this hash, from the cache when it is fresh enough.

        One database read per key at a time, however many requests ask
        (64 streams on one key used to read it 64 times each time the cache
        expired). A known key whose entry is a little stale is answered from
        the cache while one background read refreshes it: the cache only
        speeds up authentication, and revocation, expiry and budget are
        checked again when the ledger row is written.
        """
        changes = self.changes
        if changes is not None:
            changes.poll()
            if not changes.live:  # changes would not reach the cache: do not use it
                return await asyncio.shield(self._loading.get(digest) or self._refresh(digest))
        hit = self._cache.get(digest)
        if hit is not None:
            age = time.monotonic() - hit[0]
            if age < self.cache_seconds:
                return hit[1]
            if hit[1] is not None and age < self.cache_seconds * _STALE_FACTOR:
                if digest not in self._loading:
                    self._refresh(digest)
                return hit[1]
        return await asyncio.shield(self._loading.get(digest) or self._refresh(digest))

    def _refresh(self, digest: str) -> asyncio.Future[KeyRecord | None]:
        task = asyncio.ensure_future(self._load(digest))
        self._loading[digest] = task
        task.add_done_callback(lambda done: self._loaded(digest, done))
        return task

    def _loaded(self, digest: str, task: asyncio.Future[KeyRecord | None]) -> None:
        if self._loading.get(digest) is task:
            del self._loading[digest]
        if not task.cancelled() and task.exception() is not None:
            log.warning("looking up an API key failed: %s", task.exception())

    async def _load(self, digest: str) -> KeyRecord | None:
        loaded_at = time.monotonic()
        c = api_keys.c
        async with self.db.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(api_keys).where(or_(c.key_hash == digest, c.previous_key_hash == digest))
                )
            ).first()
        record = record_of_row(row, digest) if row is not None else None
        if record is not None and not (
            self.hasher.same(record.key_hash, digest)
            or self.hasher.same(record.previous_key_hash or "", digest)
        ):
            record = None  # pragma: no cover - the index matched, this cannot differ
        if len(self._cache) > 10_000:
            self._cache.clear()
        if self._forgotten.get(digest, 0.0) <= loaded_at:
            self._cache[digest] = (loaded_at, record)
        return record

    def forget(self, record: KeyRecord) -> None:
        self._drop(record.key_hash)
        if record.previous_key_hash is not None:
            self._drop(record.previous_key_hash)

    def _drop(self, digest: str) -> None:
        """Out of the cache, and no read that began before now may put it back."""
        self._cache.pop(digest, None)
        self._forgotten[digest] = time.monotonic()
        if len(self._forgotten) > 10_000:
            self._forgotten.clear()
