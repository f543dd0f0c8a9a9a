"""Admission and settlement: who asked, may they, and what they owe.

authenticate(bearer)        → KeyRecord                 401
authorize(key, model)                                   403
admit(key, prepared)        → Ticket                    429 rate / budget
    rate limit: one request and the token estimate, atomically
    ledger: the row is committed, and the worst case reserved, before any
            token is generated (write-ahead)
ticket.meter                the engine counts into the crash journal
ticket.settle(meter, how)   exactly once: cost from the meter, row closed,
                            reservation → spend, rate limit trued up
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import orjson

from tokenwell.billing import periods
from tokenwell.billing.claims import Claim, KeyClaimed
from tokenwell.billing.endusers import EndUserBudget
from tokenwell.billing.journal import Journal
from tokenwell.billing.keys import MASTER, KeyHasher, KeyRecord, KeyStore
from tokenwell.billing.ledger import Admission, CloseRow, Ledger, LedgerUnavailable, OpenRow
from tokenwell.billing.money import cost_nanos, nanos_to_usd, worst_case_nanos
from tokenwell.billing.periods import Windows
from tokenwell.billing.ratelimit import Decision, RateLimiter
from tokenwell.config import Price
from tokenwell.engines.base import Prepared
from tokenwell.errors import (
    AuthenticationFailed,
    InsufficientQuota,
    Overloaded,
    PermissionDenied,
    RateLimited,
)
from tokenwell.protocol.events import Meter

log = logging.getLogger(__name__)

_FREE = Price()  # a model without a price
_PER = {"day": "daily", "week": "weekly", "month": "monthly"}


def _end_user_bucket(key: KeyRecord, user: str) -> str:
    """The rate-limit buckets of one end user of a key."""
    return f"{key.id}/user/{user}"


def new_request_id() -> str:
    """``req_`` + 48 bits of UNIX milliseconds + 48 random bits, in hex.

    An identifier, not a secret (the process's seeded PRNG). Time first, so
    new ledger rows land at the end of the primary-key index instead of on
    random pages: fewer pages written per commit, on SQLite and PostgreSQL.
    """
    return f"req_{time.time_ns() // 1_000_000:012x}{random.getrandbits(48):012x}"


def bearer_token(header: str | None) -> str:
    if not header:
        raise AuthenticationFailed(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed(
            "Malformed Authorization header: expected 'Bearer YOUR_KEY'.",
        )
    return token


def _masked(token: str) -> str:
    if len(token) <= 8:
        return "*" * len(token)
    return f"{token[:6]}{'*' * 6}{token[-4:]}"


@dataclass(slots=True)
class Ticket:
    """An admitted request: its ledger row is open until ``settle``."""

    accounting: Accounting
    request_id: str
    key: KeyRecord
    model: str
    price: Price
    reserved_nanos: int
    token_estimate: int
    # The meter the engine counts into: a journal record while the ticket is open.
    meter: Meter = field(default_factory=Meter)
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    committed: asyncio.Future[bool] | None = None
    # The key's budget windows it was admitted in (its cost counts toward them).
    windows: Windows = periods.EPOCH
    # Who it was for (``user``), and the window of their budget it reserved in.
    end_user: str | None = None
    end_user_window: float | None = None

    async def settle(
        self,
        meter: Meter,
        status: str,
        *,
        queue_ms: float | None = None,
        ttft_ms: float | None = None,
        total_ms: float | None = None,
        error: str | None = None,
    ) -> None:
        """Bill the request: its close is queued and its rate limits trued up.

        The close commits moments later (``durable``); until then the journal
        keeps the usage, so a crash in between loses nothing.
        """
        if self.settled:
            return
        self.settled = True
        self.committed = await self.accounting._settle(
            self, meter, status, queue_ms, ttft_ms, total_ms, error
        )

    async def durable(self) -> None:
        """Wait until the settled row is committed to the ledger."""
        committed, self.committed = self.committed, None
        if committed is not None:
            await committed  # cancelling this wait leaves the close to commit


class Accounting:
    def __init__(
        self,
        keys: KeyStore,
        ledger: Ledger,
        limiter: RateLimiter,
        master_key: str,
        instance: str,
        prices: dict[str, Price],
        journal: Journal | None = None,
        metering: bool = True,
    ) -> None:
        self.keys = keys
        self.ledger = ledger
        self.limiter = limiter
        self.instance = instance
        self.prices = prices
        self.journal = journal
        # Off only when an operator says so (benchmarks, trusted internal use):
        # keys are still checked, but nothing is limited, reserved or recorded.
        self.metering = metering
        self._master_hash = keys.hasher.hash(master_key)
        self.hasher: KeyHasher = keys.hasher
        # What time it is: budget windows begin at its midnights (a test's fake clock).
        self.clock: Callable[[], float] = time.time

    # ------------------------------------------------------------------ who

    async def authenticate(self, header: str | None) -> KeyRecord:
        token = bearer_token(header)
        digest = self.hasher.hash(token)
        if self.hasher.same(digest, self._master_hash):
            return MASTER
        record = await self.keys.lookup_hash(digest)
        if record is None:
            raise AuthenticationFailed(f"Incorrect API key provided: {_masked(token)}.")
        state = record.state()
        if state == "rotated":
            raise AuthenticationFailed(
                f"The API key {_masked(token)} was replaced by a new secret and its grace "
                "period has ended."
            )
        if state != "active":
            raise AuthenticationFailed(f"The API key {record.prefix}… is {state}.")
        return record

    @staticmethod
    def authorize(key: KeyRecord, model: str) -> None:
        if not key.allows(model):
            raise PermissionDenied(
                f"This API key may not use the model `{model}`.",
                param="model",
                code="model_not_allowed",
            )

    # ------------------------------------------------------------------ admit

    async def admit(
        self,
        key: KeyRecord,
        prepared: Prepared,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        claim: Claim | None = None,
    ) -> Ticket:
        """Admit the request: limits, then its write-ahead ledger row. With a
        ``claim``, the row's open claims the idempotency key too (billing.claims);
        ``KeyClaimed`` when another request holds it (nothing written or reserved;
        its tokens go back to the TPM limit, its one request stays counted: a
        duplicate only gets here when it raced the first on another replica)."""
        request = prepared.request
        price = self.prices.get(request.model, _FREE)
        if request.api == "embeddings":
            price = price.for_embeddings()
        request_id = request_id or new_request_id()
        if not self.metering:
            ticket = Ticket(self, request_id, key, request.model, price, 0, 0)
            ticket.headers["x-request-id"] = request_id
            ticket.settled = True  # nothing to settle
            return ticket
        asked = request.max_tokens or 0
        estimate = prepared.prompt_tokens + request.n * asked
        decision: Decision | None = None
        if key.rpm or key.tpm:
            decision = await self._take(
                key, prepared, request_id, key.id, key.rpm, key.tpm, estimate, "this key"
            )
        user = request.user
        if user is not None and (key.end_user_rpm or key.end_user_tpm):
            try:
                await self._take(
                    key,
                    prepared,
                    request_id,
                    _end_user_bucket(key, user),
                    key.end_user_rpm,
                    key.end_user_tpm,
                    estimate,
                    "each end user of this key",
                )
            except RateLimited:
                if key.tpm:  # the key's own tokens go back; its one request stays counted
                    await self.limiter.adjust(key.id, key.tpm, -estimate)
                raise
        reserve = worst_case_nanos(
            price, prepared.prompt_tokens, request.n * prepared.max_completion_tokens
        )
        row = self._row(key, prepared, request_id, prepared.prompt_tokens, reserve)
        row.idempotency_key = idempotency_key
        row.claim = claim
        try:
            admission = await self.ledger.open(row)
        except LedgerUnavailable as exc:
            await self._refund(key, user, estimate)
            raise Overloaded(
                "The usage ledger is unavailable; the request was not started.",
                headers={"Retry-After": "2"},
            ) from exc
        if not admission.ok:
            await self._refund(key, user, estimate)
            if admission.reason == "claimed":
                raise KeyClaimed(request_id)
            if admission.reason in ("revoked", "expired", "missing"):
                self.keys.forget(key)
                raise AuthenticationFailed(f"The API key {key.prefix}… is {admission.reason}.")
            raise self._over_budget(key, admission, reserve, row.created_at, request_id, user)
        headers = {"x-request-id": request_id}
        if decision is not None:
            headers.update(decision.headers())
        meter = self.journal.meter(request_id) if self.journal is not None else Meter()
        return Ticket(
            self,
            request_id,
            key,
            request.model,
            price,
            reserve,
            estimate,
            meter,
            headers,
            windows=row.windows,
            end_user=user,
            end_user_window=row.end_user.window if row.end_user is not None else None,
        )

    async def _take(
        self,
        key: KeyRecord,
        prepared: Prepared,
        request_id: str,
        bucket: str,
        rpm: int | None,
        tpm: int | None,
        estimate: int,
        whose: str,
    ) -> Decision:
        """One request and the token estimate from the bucket's limits, or a 429."""
        if tpm and estimate > tpm:
            await self._reject(key, prepared, request_id, "tpm: request too large")
            raise RateLimited(
                f"Request too large for `{prepared.request.model}`: {whose} may use {tpm} "
                f"tokens per minute, the request needs {estimate}. Reduce the prompt or "
                "max_completion_tokens.",
                code="rate_limit_exceeded",
                headers={"x-request-id": request_id},
            )
        decision = await self.limiter.acquire(bucket, rpm, tpm, estimate)
        if not decision.allowed:
            await self._reject(key, prepared, request_id, "rate limited")
            retry = max(1, int(decision.retry_after + 0.999))
            what = "requests" if rpm and (decision.requests_left or 0) < 1 else "tokens"
            limit = rpm if what == "requests" else tpm
            raise RateLimited(
                f"Rate limit reached for {whose} on {what} per minute: limit {limit}. "
                f"Please try again in {decision.retry_after:.2f}s.",
                headers={
                    "Retry-After": str(retry),
                    "x-request-id": request_id,
                    **decision.headers(),
                },
            )
        return decision

    @staticmethod
    def _over_budget(
        key: KeyRecord,
        admission: Admission,
        reserve: int,
        now: float,
        request_id: str,
        user: str | None,
    ) -> InsufficientQuota:
        """The 429 that names the budget that refused the request, and when it resets."""
        period = admission.period or "total"
        what = "lifetime" if period == "total" else _PER[period]
        headers = {"x-request-id": request_id, "x-tokenwell-budget-period": period}
        holder = "the key"
        if admission.reason == "end_user_budget":
            holder = f"the end user {user!r}"
            what += " per-end-user"
            headers["x-tokenwell-budget-scope"] = "end_user"
        reset = periods.next_reset(period, now, key.timezone)
        when = ""
        if reset is not None:
            headers["Retry-After"] = str(max(1, int(reset - now + 0.999)))
            when = f" It resets at {periods.iso(reset)}."
        return InsufficientQuota(
            f"You exceeded your current quota: this request may cost up to "
            f"${nanos_to_usd(reserve)} and {holder} has "
            f"${nanos_to_usd(admission.available_nanos or 0)} left of its {what} budget of "
            f"${nanos_to_usd(admission.budget_nanos or 0)}.{when} Lower "
            "max_completion_tokens or raise the key's budget.",
            headers=headers,
        )

    def _row(
        self, key: KeyRecord, prepared: Prepared, request_id: str, prompt: int, reserve: int
    ) -> OpenRow:
        request = prepared.request
        now = self.clock()
        budget = None
        if key.end_user_budget_nanos is not None and request.user is not None:
            period = key.end_user_period
            budget = EndUserBudget(
                key.end_user_budget_nanos,
                period,
                periods.window_start(period, now, key.timezone),
            )
        return OpenRow(
            created_at=now,
            windows=periods.windows(now, key.timezone),
            end_user=budget,
            tags=orjson.dumps(request.metadata).decode() if request.metadata else None,
            id=request_id,
            key_id=key.id,
            model=request.model,
            stream=request.stream,
            include_usage=request.include_usage,
            n=request.n,
            prompt_tokens=prompt,
            reserved_nanos=reserve,
            instance=self.instance,
            user=request.user,
            api=request.api,
        )

    async def _reject(self, key: KeyRecord, prepared: Prepared, request_id: str, why: str) -> None:
        """Record a request refused before admission (a rate limit): nothing is billed."""
        row = self._row(key, prepared, request_id, 0, 0)
        row.check_key = False
        row.status = "rejected"
        row.error = why
        try:
            await self.ledger.open(row)
        except LedgerUnavailable:
            log.warning("could not record rejected request %s", request_id)

    async def _refund(self, key: KeyRecord, user: str | None, tokens: int) -> None:
        await self._adjust(key, user, -tokens)

    async def _adjust(self, key: KeyRecord, user: str | None, tokens: int) -> None:
        """Settle ``tokens`` more (negative: fewer) on the key's and its end user's TPM."""
        if not tokens:
            return
        if key.tpm:
            await self.limiter.adjust(key.id, key.tpm, tokens)
        if user is not None and key.end_user_tpm:
            await self.limiter.adjust(_end_user_bucket(key, user), key.end_user_tpm, tokens)

    # ------------------------------------------------------------------ settle

    async def _settle(
        self,
        ticket: Ticket,
        meter: Meter,
        status: str,
        queue_ms: float | None,
        ttft_ms: float | None,
        total_ms: float | None,
        error: str | None,
    ) -> asyncio.Future[bool]:
        if status == "rejected":
            prompt = cached = completion = 0
        else:
            prompt, cached, completion = (
                meter.prompt_tokens,
                meter.cached_tokens,
                meter.completion_tokens,
            )
        cost = cost_nanos(ticket.price, prompt, cached, completion)
        row = CloseRow(
            id=ticket.request_id,
            key_id=ticket.key.id,
            status=status,
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=completion,
            cost_nanos=cost,
            reserved_nanos=ticket.reserved_nanos,
            estimated=meter.estimated,
            queue_ms=queue_ms,
            ttft_ms=ttft_ms,
            total_ms=total_ms,
            error=error,
            windows=ticket.windows,
        )
        if ticket.end_user_window is not None:
            row.end_user, row.end_user_window = ticket.end_user, ticket.end_user_window
        if self.journal is not None:
            # The journal keeps the usage until the ledger has it.
            row.on_commit = partial(self.journal.forget, ticket.request_id)
        committed = self.ledger.enqueue_close(row)
        await self._adjust(ticket.key, ticket.end_user, prompt + completion - ticket.token_estimate)
        return committed

    # ------------------------------------------------------------------ recovery

    async def recover(self, journal_entries: dict[str, tuple[int, int, int]]) -> int:
        """Close this instance's rows left open by a crash, as ``interrupted``.

        Each is billed with the last usage its journal recorded (the prompt
        alone when it never reached a token), and its reservation released.
        """
        rows = await self.ledger.open_rows(self.instance)
        zones = await self.keys.timezones({row.key_id for row in rows})
        for row in rows:
            known = journal_entries.get(row.id)
            prompt, cached, completion = known if known is not None else (0, 0, 0)
            price = self.prices.get(row.model, _FREE)
            if getattr(row, "api", None) == "embeddings":
                price = price.for_embeddings()
            await self.ledger.close(
                CloseRow(
                    id=row.id,
                    key_id=row.key_id,
                    status="interrupted",
                    prompt_tokens=prompt,
                    cached_tokens=cached,
                    completion_tokens=completion,
                    cost_nanos=cost_nanos(price, prompt, cached, completion),
                    reserved_nanos=row.reserved_nanos,
                    total_ms=max(time.time() - row.created_at, 0) * 1000,
                    windows=periods.windows(row.created_at, zones.get(row.key_id)),
                    # Its end user's reservation is released too.
                    end_user=row.user if row.end_user_window is not None else None,
                    end_user_window=row.end_user_window or 0.0,
                    error=(
                        "the server stopped while the request was in flight"
                        if known is not None
                        else "the server stopped; no usage was journaled for this request"
                    ),
                )
            )
        return len(rows)
