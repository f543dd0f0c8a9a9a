"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: the Anthropic Messages API.

The same admission as chat completions (key, body, model, permission, what
the model can take, limits and budget, capacity; all before the first byte),
the same engines and ledger; only the codec differs (``protocol.anthropic``
parses, ``protocol.anthropic_codec`` renders). Anthropic clients send their
key as ``x-api-key``; ``Authorization: Bearer`` works too.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

from starlette.requests import Request
from starlette.types import ASGIApp

from tokenwell.billing.keys import KeyRecord
from tokenwell.engines.base import Engine, Prepared
from tokenwell.errors import InvalidRequest
from tokenwell.protocol.anthropic import parse_messages_request, rename_fields
from tokenwell.protocol.anthropic_codec import AnthropicCodec
from tokenwell.protocol.requests import ChatRequest
from tokenwell.server.body import read_body
from tokenwell.server.chat import ChatService
from tokenwell.server.generation import GenerationResponse
from tokenwell.server.loading import wait_until_ready

API = "anthropic"


def clamped(engine: Engine, chat: ChatRequest) -> Prepared:
    """Prepared with ``max_tokens`` cut to what the context leaves (Anthropic clients
    ask for 32,000 and more): reaching it ends the message with ``max_tokens``."""
    try:
        prepared = engine.prepare(replace(chat, max_tokens=None))
    except InvalidRequest as exc:
        raise rename_fields(exc) from None
    room = prepared.max_completion_tokens
    limit = min(chat.max_tokens or room, room)
    prepared.request = replace(chat, max_tokens=limit, raw={**chat.raw, "max_tokens": limit})
    prepared.max_completion_tokens = limit
    return prepared


class MessagesService:
    def __init__(self, chat: ChatService) -> None:
        # One admission and one settlement for every API: the chat service's.
        self.chat = chat

    async def _key(self, request: Request) -> KeyRecord:
        api_key = request.headers.get("x-api-key")
        header = f"Bearer {api_key}" if api_key else request.headers.get("authorization")
        return await self.chat.accounting.authenticate(header)

    async def _parse(
        self, request: Request, *, counting: bool = False
    ) -> tuple[KeyRecord, Engine, ChatRequest, str]:
        key = await self._key(request)
        body = await read_body(request, self.chat.max_body_bytes)
        parsed = parse_messages_request(body, counting=counting)
        asked = parsed.chat.model
        engine = self.chat.models.get(asked)
        chat = replace(parsed.chat, model=engine.model_id)
        self.chat.accounting.authorize(key, chat.model)
        if not engine.ready:
            await wait_until_ready(engine, self.chat.model_load_wait)
        return key, engine, chat, asked

    async def create(self, request: Request) -> ASGIApp:
        started = time.perf_counter()
        key, engine, chat, asked = await self._parse(request)
        service = self.chat
        if service.policy is not None:
            service.policy.check_input(chat)
        prepared = clamped(engine, chat)
        ticket, generation = await service.start(key, prepared, partial(engine.submit, prepared))
        return GenerationResponse(
            generation,
            AnthropicCodec(asked, prepared.prompt_tokens),
            stream=chat.stream,
            keepalive=service.keepalive_seconds,
            settle=partial(service._settle, ticket),
            headers=ticket.headers,
            started_at=started,
            output_filter=service.policy.output_filter(1) if service.policy else None,
            slow_client=service.http.slow_client,
            stream_buffer=service.http.stream_buffer,
        )

    async def count_tokens(self, request: Request) -> dict[str, int]:
        """The prompt's tokens as the engine counts them; nothing is generated or billed."""
        _, engine, chat, _ = await self._parse(request, counting=True)
        return {"input_tokens": clamped(engine, chat).prompt_tokens}
