"""``POST /v1/embeddings``, on chat's admission and ledger.

Key, body, model (aliases), permission, the inputs' tokens (counted and
checked by the engine), limits and budget: all before any work. One ledger
row per request (api ``embeddings``), billed its input tokens at the model's
``embedding`` price (its prompt price when it has none), settled exactly once
however the request ends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import Response

from tokenwell import logs
from tokenwell.errors import APIError
from tokenwell.protocol.embeddings import (
    check_dimensions,
    embeddings_body,
    parse_embeddings_request,
    truncate,
)
from tokenwell.protocol.events import Meter
from tokenwell.server.body import read_body
from tokenwell.server.chat import ChatService
from tokenwell.server.loading import wait_until_ready
from tokenwell.server.responses import json_response


class EmbeddingsService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def create(self, request: Request) -> Response:
        started = time.perf_counter()
        service = self.chat
        key = await service.accounting.authenticate(request.headers.get("authorization"))
        body = await read_body(request, service.max_body_bytes)
        parsed = parse_embeddings_request(body)
        engine = service.models.get(parsed.model)
        model = engine.model_id
        service.accounting.authorize(key, model)
        if not engine.ready:
            await wait_until_ready(engine, service.model_load_wait)
        native = engine.embedding_size
        if native is not None:
            check_dimensions(parsed.dimensions, native, engine.config.embedding_truncate, model)
        prepared = engine.prepare_embeddings(replace(parsed.request, model=model), parsed.inputs)
        ticket = await service.accounting.admit(key, prepared)
        logs.bind_request(ticket.request_id)
        service.metrics.request_started(model)
        service.track(ticket, "embeddings")
        status, error = "completed", None
        meter = ticket.meter
        try:
            vectors = await engine.embed(prepared, meter)
            if native is None and vectors:  # known once the engine answered
                check_dimensions(
                    parsed.dimensions, len(vectors[0]), engine.config.embedding_truncate, model
                )
            vectors = truncate(vectors, parsed.dimensions)
        except APIError as exc:
            failed = "upstream_error" if engine.kind == "upstream" else "engine_error"
            status, error = ("rejected" if exc.status < 500 else failed), exc.message
            exc.headers.setdefault("x-request-id", ticket.request_id)
            raise
        except asyncio.CancelledError:
            status, error = "client_disconnected", "the request was cancelled"
            raise
        except Exception as exc:
            status, error = "engine_error", f"embedding failed: {exc}"
            raise
        finally:
            billed = meter if status in ("completed", "client_disconnected") else Meter()
            total = (time.perf_counter() - started) * 1000
            await asyncio.shield(ticket.settle(billed, status, total_ms=total, error=error))
            service.finished(ticket, status, billed, total_ms=total, error=error)
        return json_response(
            embeddings_body(model, vectors, parsed.encoding_format, meter.prompt_tokens),
            headers=ticket.headers,
        )
