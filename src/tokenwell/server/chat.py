"""``POST /v1/chat/completions``: admit, generate, respond, settle.

Every check that can fail does so before the first byte (CONTRACT.md):
key (401), body (413/400), model (404), permission (403), what the model can
take (400), limits and budget (429), capacity (503). Once admitted, the
request's ledger row is open and ``GenerationResponse`` settles it exactly
once, with the engine's meter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp

from tokenwell import logs
from tokenwell.billing.accounting import Accounting, Ticket
from tokenwell.billing.claims import Claim
from tokenwell.billing.keys import KeyRecord
from tokenwell.config import HTTPConfig
from tokenwell.engines.base import Engine, Generation, Prepared
from tokenwell.errors import APIError, ModelNotFound
from tokenwell.moderation import ContentPolicy
from tokenwell.protocol.codec import ChatCodec
from tokenwell.protocol.events import Meter
from tokenwell.protocol.render import Identity
from tokenwell.protocol.requests import ChatRequest, parse_chat_request
from tokenwell.server import accesslog
from tokenwell.server.body import read_body
from tokenwell.server.generation import GenerationResponse, Outcome
from tokenwell.server.idempotent import IdempotencyService, parse_resume_headers
from tokenwell.server.loading import LoadingStream, wait_until_ready
from tokenwell.server.metrics import Metrics

log = logging.getLogger(__name__)


class ModelRegistry:
    """The served models by id, and by their aliases (names, then glob patterns,
    in the order of the config; a model's own name always wins)."""

    def __init__(self, engines: list[Engine]) -> None:
        self.engines = {engine.model_id: engine for engine in engines}
        self.aliases: dict[str, Engine] = {}
        self.patterns: list[tuple[str, Engine]] = []
        for engine in engines:
            for alias in engine.config.aliases:
                if any(ch in alias for ch in "*?["):
                    self.patterns.append((alias, engine))
                else:
                    self.aliases.setdefault(alias, engine)

    def resolve(self, model: str) -> Engine | None:
        engine = self.engines.get(model) or self.aliases.get(model)
        if engine is None:
            engine = next((e for p, e in self.patterns if fnmatchcase(model, p)), None)
        return engine

    def get(self, model: str) -> Engine:
        engine = self.resolve(model)
        if engine is None:
            raise ModelNotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            )
        return engine

    def __iter__(self) -> Iterator[Engine]:
        return iter(self.engines.values())


@dataclass(slots=True)
class Running:
    """A request admitted and not yet settled."""

    ticket: Ticket
    api: str
    since: float  # UNIX time it was admitted


class ChatService:
    def __init__(
        self,
        models: ModelRegistry,
        accounting: Accounting,
        metrics: Metrics,
        *,
        max_body_bytes: int,
        keepalive_seconds: float,
        policy: ContentPolicy | None = None,
        idempotency: IdempotencyService | None = None,
        model_load_wait: float = 0.0,
        http: HTTPConfig | None = None,
    ) -> None:
        self.models = models
        self.accounting = accounting
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.keepalive_seconds = keepalive_seconds
        self.policy = policy
        self.idempotency = idempotency
        if idempotency is not None:
            # Claims ride on the ledger's opens when it records requests.
            idempotency.use_ledger(accounting.ledger if accounting.metering else None)
        self.model_load_wait = model_load_wait
        self.http = http or HTTPConfig()
        self.running: dict[str, Running] = {}

    async def create(self, request: Request) -> ASGIApp:
        started = time.perf_counter()
        key = await self.accounting.authenticate(request.headers.get("authorization"))
        idempotency_key, last_event_id = parse_resume_headers(request.headers)
        body = await read_body(request, self.max_body_bytes)
        chat = parse_chat_request(body)
        engine = self.models.get(chat.model)
        if chat.model != engine.model_id:  # an alias: billed and authorised as the model
            chat = replace(chat, model=engine.model_id)
        self.accounting.authorize(key, chat.model)
        if self.policy is not None:
            self.policy.check_input(chat)

        async def respond() -> ASGIApp:
            if idempotency_key is not None and self.idempotency is not None:
                return await self.idempotency.respond(
                    key,
                    idempotency_key,
                    body,
                    chat.stream,
                    last_event_id,
                    partial(self._generate, key, chat, engine, started),
                )
            return await self._generate(key, chat, engine, started)

        if not engine.ready:
            # Still loading: wait for it rather than answer a 503 (server/loading.py).
            if chat.stream:
                return LoadingStream(engine, self.model_load_wait, self.keepalive_seconds, respond)
            await wait_until_ready(engine, self.model_load_wait)
        return await respond()

    async def _generate(
        self,
        key: KeyRecord,
        chat: ChatRequest,
        engine: Engine,
        started: float,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        claim: Claim | None = None,
    ) -> GenerationResponse:
        prepared = engine.prepare(chat)
        ticket, generation = await self.start(
            key, prepared, partial(engine.submit, prepared), request_id, idempotency_key, claim
        )

        ident = Identity(model=chat.model, system_fingerprint=engine.system_fingerprint)
        return GenerationResponse(
            generation,
            ChatCodec(ident, n=chat.n, include_usage=chat.include_usage, logprobs=chat.logprobs),
            stream=chat.stream,
            keepalive=self.keepalive_seconds,
            settle=partial(self._settle, ticket),
            headers=ticket.headers,
            started_at=started,
            output_filter=self.policy.output_filter(chat.n) if self.policy else None,
            slow_client=self.http.slow_client,
            stream_buffer=self.http.stream_buffer,
        )

    async def start(
        self,
        key: KeyRecord,
        prepared: Prepared,
        submit: Callable[[Meter], Generation],
        *admit: Any,
    ) -> tuple[Ticket, Generation]:
        """Admit (limits, budget, the write-ahead ledger row), then hand the work to
        the engine with the ticket's meter: every wire API starts a generation here.
        A refusal by the engine (a full queue) closes the row as ``rejected``, with
        the request id on the error, before the error is raised."""
        model = prepared.request.model
        ticket = await self.accounting.admit(key, prepared, *admit)
        logs.bind_request(ticket.request_id)
        try:
            generation = submit(ticket.meter)
        except APIError as exc:
            await ticket.settle(Meter(), "rejected", error=exc.message)
            await ticket.durable()
            self.finished(ticket, "rejected", Meter(), error=exc.message, started=False)
            exc.headers.setdefault("x-request-id", ticket.request_id)
            raise
        self.metrics.request_started(model)
        self.track(ticket, prepared.request.api)
        return ticket, generation

    def finished(
        self,
        ticket: Ticket,
        status: str,
        meter: Meter,
        *,
        queue_ms: float | None = None,
        ttft_ms: float | None = None,
        total_ms: float | None = None,
        error: str | None = None,
        started: bool = True,
        itl_seconds: float | None = None,
    ) -> None:
        """A settled request: its log line, its metrics, and when its row committed."""
        self.running.pop(ticket.request_id, None)
        cost = accesslog.finished(
            ticket,
            status,
            meter,
            queue_ms=queue_ms,
            ttft_ms=ttft_ms,
            total_ms=total_ms,
            error=error,
        )
        self.metrics.request_done(
            ticket.model,
            status,
            meter,
            ttft_ms,
            cost,
            started=started,
            itl_seconds=itl_seconds,
        )
        committed = ticket.committed
        if committed is not None:
            queued_at = time.perf_counter()
            committed.add_done_callback(
                lambda _: self.metrics.ledger_committed(time.perf_counter() - queued_at)
            )

    def track(self, ticket: Ticket, kind: str) -> None:
        """A request in flight, for the dashboard's live view (until ``finished``)."""
        self.running[ticket.request_id] = Running(ticket, kind, time.time())

    async def _settle(self, ticket: Ticket, gen: Generation, outcome: Outcome) -> None:
        meter = gen.meter
        ttft = (
            (outcome.first_token_at - outcome.started_at) * 1000
            if outcome.first_token_at is not None
            else None
        )
        queue_ms = (
            (gen.started_at - outcome.started_at) * 1000 if gen.started_at is not None else None
        )
        total = (outcome.ended_at - outcome.started_at) * 1000
        itl = None
        per_choice = meter.completion_tokens // max(gen.n, 1)
        if outcome.first_token_at is not None and per_choice > 1:
            itl = (outcome.ended_at - outcome.first_token_at) / (per_choice - 1)
        await ticket.settle(
            meter,
            outcome.status,
            queue_ms=queue_ms,
            ttft_ms=ttft,
            total_ms=total,
            error=outcome.error,
        )
        self.finished(
            ticket,
            outcome.status,
            meter,
            queue_ms=queue_ms,
            ttft_ms=ttft,
            total_ms=total,
            error=outcome.error,
            itl_seconds=itl,
        )
