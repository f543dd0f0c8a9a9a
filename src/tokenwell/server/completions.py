"""``POST /v1/completions``: OpenAI's text completions, on chat's admission.

The same key, body, model (aliases), permission, limits, budget and capacity
checks as chat completions, all before the first byte; the same engines and
ledger (rows say api ``completions``); only the codec differs
(``protocol.completions``). Each prompt is its own engine request with a raw
prompt (no chat template); several prompts run side by side and their events
are merged into one generation, choice ``i * n + j`` for sample ``j`` of
prompt ``i``, billed as one request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from functools import partial

from starlette.requests import Request
from starlette.types import ASGIApp

from tokenwell.engines.base import Engine, Generation, Prepared
from tokenwell.errors import APIError, InvalidRequest
from tokenwell.protocol.completions import CompletionsCodec, parse_completions_request
from tokenwell.protocol.events import Event, Failed, Meter
from tokenwell.protocol.requests import Message
from tokenwell.server.body import read_body
from tokenwell.server.chat import ChatService
from tokenwell.server.generation import GenerationResponse
from tokenwell.server.loading import wait_until_ready


class Fanout:
    """Several prompts' generations as one: events re-indexed, meters summed."""

    def __init__(self, subs: list[Generation], n: int, meter: Meter) -> None:
        self.subs = subs
        self.generation = Generation(n * len(subs), meter)
        self._n = n
        self._task = asyncio.create_task(self._run())
        self.generation.on_cancel(self._cancel)

    def _cancel(self) -> None:
        for sub in self.subs:
            sub.cancel()

    def _sum(self) -> None:
        meter = self.generation.meter
        meter.prompt_tokens = sum(s.meter.prompt_tokens for s in self.subs)
        meter.cached_tokens = sum(s.meter.cached_tokens for s in self.subs)
        meter.completion_tokens = sum(s.meter.completion_tokens for s in self.subs)
        meter.estimated = any(s.meter.estimated for s in self.subs)

    async def _forward(self, index: int, sub: Generation) -> None:
        offset = index * self._n
        while not sub.exhausted:
            batch = await sub.next_batch(1.0)
            if self.generation.started_at is None and sub.started_at is not None:
                self.generation.started_at = sub.started_at
            events: list[Event] = [
                e if isinstance(e, Failed) else replace(e, choice=e.choice + offset) for e in batch
            ]
            self._sum()
            if events:
                self.generation.push(events)
            if any(isinstance(e, Failed) for e in batch):
                self._cancel()

    async def _run(self) -> None:
        try:
            await asyncio.gather(*(self._forward(i, s) for i, s in enumerate(self.subs)))
        finally:
            self._cancel()
            await asyncio.gather(*(s.closed() for s in self.subs), return_exceptions=True)
            self._sum()
            self.generation.close()


class CompletionsService:
    def __init__(self, chat: ChatService) -> None:
        # One admission and one settlement for every API: the chat service's.
        self.chat = chat

    async def create(self, request: Request) -> ASGIApp:
        started = time.perf_counter()
        service = self.chat
        key = await service.accounting.authenticate(request.headers.get("authorization"))
        body = await read_body(request, service.max_body_bytes)
        parsed = parse_completions_request(body)
        engine = service.models.get(parsed.model)
        requests = [replace(r, model=engine.model_id) for r in parsed.requests]
        service.accounting.authorize(key, engine.model_id)
        if parsed.suffix is not None and not _can_suffix(engine):
            raise InvalidRequest(
                f"Invalid 'suffix': the model `{engine.model_id}` cannot insert text "
                "(it has no fill-in-the-middle support).",
                param="suffix",
                code="unsupported_value",
            )
        if service.policy is not None:
            for r in requests:
                text = r.prompt if isinstance(r.prompt, str) else ""
                service.policy.check_input(replace(r, prompt=None, messages=_as_user(text)))
        if not engine.ready:
            await wait_until_ready(engine, service.model_load_wait)
        preps = [engine.prepare(r) for r in requests]
        first = preps[0].request
        total = len(preps) * parsed.n
        combined = Prepared(
            replace(first, n=total),
            sum(p.prompt_tokens for p in preps),
            max(p.max_completion_tokens for p in preps),
        )

        def submit(meter: Meter) -> Generation:
            if len(preps) == 1:
                return engine.submit(preps[0], meter)
            subs: list[Generation] = []
            try:
                for p in preps:
                    subs.append(engine.submit(p, Meter()))
            except APIError:
                for sub in subs:
                    sub.cancel()
                raise
            return Fanout(subs, parsed.n, meter).generation

        ticket, generation = await service.start(key, combined, submit)
        echo = [str(p) for p in parsed.prompts for _ in range(parsed.n)] if parsed.echo else None
        codec = CompletionsCodec(
            engine.model_id,
            engine.system_fingerprint,
            n=total,
            echo=echo,
            logprobs=parsed.logprobs is not None,
            include_usage=parsed.include_usage,
        )
        return GenerationResponse(
            generation,
            codec,
            stream=parsed.stream,
            keepalive=service.keepalive_seconds,
            settle=partial(service._settle, ticket),
            headers=ticket.headers,
            started_at=started,
            output_filter=service.policy.output_filter(total) if service.policy else None,
            slow_client=service.http.slow_client,
            stream_buffer=service.http.stream_buffer,
        )


def _can_suffix(engine: Engine) -> bool:
    # An upstream gets the request as it came (suffix included) and answers
    # for itself; the embedded models have no fill-in-the-middle.
    return engine.kind == "upstream"


def _as_user(text: str) -> tuple[Message, ...]:
    return (Message("user", text),)
