"""The OpenAI Responses API: ``/v1/responses`` and its stored responses.

The same admission, engines, ledger and ``GenerationResponse`` as chat
completions (``ChatService``); only the codec differs
(``protocol.responses.ResponsesCodec``). A response is one ledger row, billed
once, from the engine's meter.

- Stored responses (``store``, the default) are rows beside the ledger
  (``billing.responses``), written before the last bytes go out, so a
  ``GET`` right after the response always finds it.
- A background response (``background: true``) is a request that outlives
  its connection by design: its ``GenerationResponse`` runs into a numbered
  ``RequestLog`` (``server.requestlog``, as for idempotency keys) with no
  grace limit; ``GET …?stream=true&starting_after=N`` is a ``LogReader`` of
  that log (event N is the one with ``sequence_number`` N), a poll reads the
  codec's snapshot, and ``cancel`` stops the generation (billed as what was
  generated, status ``cancelled``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Send

from tokenwell.billing.accounting import Ticket
from tokenwell.billing.keys import KeyRecord
from tokenwell.billing.responses import ResponseStore
from tokenwell.engines.base import Engine, Generation
from tokenwell.errors import InvalidRequest, NotFound
from tokenwell.protocol.responses import (
    TERMINAL,
    ResponsesCodec,
    ResponsesEncoder,
    ResponsesRequest,
    frame,
    input_item_objects,
    new_id,
    output_items_as_input,
    parse_body,
    parse_responses_request,
)
from tokenwell.server.body import read_body
from tokenwell.server.cancels import CancelBus
from tokenwell.server.chat import ChatService
from tokenwell.server.generation import GenerationResponse, Outcome
from tokenwell.server.idempotent import parse_resume_headers
from tokenwell.server.loading import wait_until_ready
from tokenwell.server.requestlog import LogReader, Producer, RequestLog
from tokenwell.server.responses import json_response

log = logging.getLogger(__name__)

# A background response's log is held this long after it ended, for
# ``?stream=true`` readers that come late (then: the stored object only).
FINISHED_LOG_SECONDS = 600.0
MAX_LOG_BYTES = 64 * 1024 * 1024
NEVER = 10.0**9  # a background response runs with no reader at all
# A background response started on another replica is in Redis within this long.
MIRROR_WAIT_SECONDS = 2.0
# A cancel sent to the replica running a response: how long its answer is awaited.
CANCEL_WAIT_SECONDS = 15.0


@dataclass
class _Live:
    """A background response this process runs."""

    key_id: str
    codec: ResponsesCodec
    response: GenerationResponse
    log: RequestLog
    producer: Producer
    done: asyncio.Event
    queued: dict[str, Any]


class ResponsesService:
    def __init__(self, chat: ChatService, store: ResponseStore | None) -> None:
        self.chat = chat
        self.store = store
        self.live: dict[str, _Live] = {}
        # With Redis, a background response's log is mirrored there, so that
        # ``?stream=true`` reads it on any replica (server.requestlog.RedisLogs).
        self.remote = chat.idempotency.remote if chat.idempotency is not None else None
        # With Redis, a cancel reaching another replica is passed to this one.
        self.cancels = (
            CancelBus(self.remote.client, self._cancel_here) if self.remote is not None else None
        )
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self.cancels is not None:
            await self.cancels.start()

    @property
    def keepalive(self) -> float:
        return self.chat.keepalive_seconds

    async def stop(self) -> None:
        """Shut-down: background generations end (billed ``interrupted``) and are stored."""
        for live in list(self.live.values()):
            live.response.generation.cancel()
        for live in list(self.live.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.done.wait(), 15)
        for task in list(self._tasks):
            task.cancel()
        if self.cancels is not None:
            await self.cancels.stop()

    # ------------------------------------------------------------------ create

    async def _key(self, request: Request) -> KeyRecord:
        return await self.chat.accounting.authenticate(request.headers.get("authorization"))

    async def _parse(
        self, request: Request, key: KeyRecord
    ) -> tuple[bytes, ResponsesRequest, Engine]:
        body = await read_body(request, self.chat.max_body_bytes)
        data = parse_body(body)
        history: list[dict[str, Any]] = []
        previous = data.get("previous_response_id")
        if isinstance(previous, str):
            history = await self._history(key, previous)
        rr = parse_responses_request(data, history)
        engine = self.chat.models.get(rr.chat.model)
        self.chat.accounting.authorize(key, rr.chat.model)
        if self.chat.policy is not None:
            self.chat.policy.check_input(rr.chat)
        return body, rr, engine

    async def _history(self, key: KeyRecord, previous: str) -> list[dict[str, Any]]:
        stored = await self.store.get(key.id, previous) if self.store is not None else None
        if stored is None:
            raise InvalidRequest(
                f"Previous response with id '{previous[:80]}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if stored.status not in TERMINAL:
            raise InvalidRequest(
                f"Previous response with id '{previous}' is still {stored.status}; "
                "continue it once it has finished.",
                param="previous_response_id",
                code="previous_response_in_progress",
            )
        return [*stored.history, *output_items_as_input(stored.response.get("output", []))]

    async def create(self, request: Request) -> ASGIApp:
        started = time.perf_counter()
        key = await self._key(request)
        idempotency_key, last_event_id = parse_resume_headers(request.headers)
        body, rr, engine = await self._parse(request, key)
        if rr.store and self.store is None:
            raise InvalidRequest("Responses cannot be stored here.", param="store")
        if not engine.ready:
            await wait_until_ready(engine, self.chat.model_load_wait)
        respond = partial(self._respond, key, rr, engine, started)
        idempotency = self.chat.idempotency
        if idempotency_key is not None and idempotency is not None:
            # Generated once, whatever the retries; streams numbered and resumable
            # (server/idempotent.py), as for chat completions.
            return await idempotency.respond(
                key,
                idempotency_key,
                body,
                rr.stream,
                last_event_id,
                respond,
                route="responses",
                reader=ResponsesLogReader,
            )
        return await respond()

    async def _respond(
        self, key: KeyRecord, rr: ResponsesRequest, engine: Engine, started: float, *admit: Any
    ) -> ASGIApp:
        """Admit and start a response (``admit``: an idempotent request's id, key and
        claim); answer with it, as a stream, a JSON body, or the queued object."""
        encoder = ResponsesEncoder(new_id("resp"), rr.echo)
        codec = ResponsesCodec(encoder)
        history = [*rr.history, *rr.input_items]
        response, ticket = await self._generate(key, rr, engine, codec, started, *admit)
        if rr.background:
            live = await self._background(key, rr, codec, response, ticket, history)
            if rr.stream:  # streamed from its start, as a reader of its log
                return ResponsesLogReader(
                    live.log, after=None, replayed=False, keepalive=self.keepalive
                )
            return json_response(live.queued, headers=ticket.headers)
        if rr.store:
            assert self.store is not None
            store_final = partial(self._store_final, key, rr, ticket, history, codec)
            if self.store.commits_in_step:
                response.after_last = store_final  # its last bytes do not wait for it
            else:
                response.before_last = store_final
        return response

    async def _generate(
        self,
        key: KeyRecord,
        rr: ResponsesRequest,
        engine: Engine,
        codec: ResponsesCodec,
        started: float,
        *admit: Any,
    ) -> tuple[GenerationResponse, Ticket]:
        chat = self.chat
        prepared = engine.prepare(rr.chat)
        ticket, generation = await chat.start(
            key, prepared, partial(engine.submit, prepared), *admit
        )
        response = GenerationResponse(
            generation,
            codec,
            stream=rr.stream or rr.background,
            keepalive=chat.keepalive_seconds,
            settle=partial(self._settle, ticket, codec),
            headers=ticket.headers,
            started_at=started,
            output_filter=chat.policy.output_filter(1) if chat.policy else None,
            # A background response has no reader to be slow.
            slow_client=chat.http.slow_client,
            stream_buffer=None if rr.background else chat.http.stream_buffer,
        )
        return response, ticket

    async def _settle(
        self, ticket: Ticket, codec: ResponsesCodec, gen: Generation, outcome: Outcome
    ) -> None:
        if codec.cancelled and outcome.status == "interrupted":
            # Stopped by cancel (one that came as it finished completed as usual).
            outcome.status = "cancelled"
        await self.chat._settle(ticket, gen, outcome)

    async def _store_final(
        self,
        key: KeyRecord,
        rr: ResponsesRequest,
        ticket: Ticket,
        history: list[dict[str, Any]],
        codec: ResponsesCodec,
    ) -> None:
        """A finished response's row: queued, where every read of its id waits for
        it, right after its last bytes (ResponseStore.commits_in_step), else
        committed before them."""
        assert self.store is not None
        if codec.final is None:
            return
        try:
            await self.store.put(
                key.id,
                codec.final,
                request_id=ticket.request_id,
                input_items=rr.input_items,
                history=history,
            )
        except Exception:
            log.exception("storing response %s failed", codec.id)

    # ------------------------------------------------------------------ background

    async def _background(
        self,
        key: KeyRecord,
        rr: ResponsesRequest,
        codec: ResponsesCodec,
        response: GenerationResponse,
        ticket: Ticket,
        history: list[dict[str, Any]],
    ) -> _Live:
        assert self.store is not None
        queued = codec.encoder.snapshot("queued")
        await self.store.put(
            key.id,
            queued,
            request_id=ticket.request_id,
            input_items=rr.input_items,
            history=history,
        )
        rlog = RequestLog(codec.id, True, MAX_LOG_BYTES)
        done = asyncio.Event()
        producer = Producer(
            rlog,
            response,
            NEVER,
            partial(self._background_done, codec, done),
            remote=self.remote,
        )
        live = self.live[codec.id] = _Live(key.id, codec, response, rlog, producer, done, queued)
        producer.start()
        self._spawn(self._mark_in_progress(codec, rlog))
        return live

    async def _mark_in_progress(self, codec: ResponsesCodec, rlog: RequestLog) -> None:
        """Stored as ``in_progress`` once it runs, for polls on other replicas (this one
        answers from memory); never over an end stored first."""
        while rlog.end < 2 and not rlog.done:  # response.created, response.in_progress
            await rlog.wait(None)
        if not rlog.done and self.store is not None:
            await self.store.advance(codec.encoder.snapshot("in_progress"), "queued")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _background_done(
        self, codec: ResponsesCodec, done: asyncio.Event, rlog: RequestLog
    ) -> None:
        try:
            final = codec.final
            if final is None:  # refused before its first event (an engine error)
                final = codec.encoder.snapshot("failed")
                final["error"] = {"code": "server_error", "message": "The generation failed."}
            assert self.store is not None
            await self.store.update(final)
        finally:
            done.set()
            self._spawn(self._forget(codec.id))

    async def _forget(self, response_id: str) -> None:
        await asyncio.sleep(FINISHED_LOG_SECONDS)
        self.live.pop(response_id, None)

    # ------------------------------------------------------------------ stored

    def _live(self, key: KeyRecord, response_id: str) -> _Live | None:
        live = self.live.get(response_id)
        return live if live is not None and live.key_id == key.id else None

    async def _stored(self, key: KeyRecord, response_id: str) -> dict[str, Any]:
        stored = await self.store.get(key.id, response_id) if self.store is not None else None
        if stored is None:
            raise _not_found(response_id)
        return stored.response

    async def retrieve(self, request: Request) -> ASGIApp:
        key = await self._key(request)
        response_id = request.path_params["response_id"]
        params = request.query_params
        stream = params.get("stream", "false").lower() in ("true", "1")
        after = _starting_after(params.get("starting_after"))
        live = self._live(key, response_id)
        if stream:
            if live is None:
                stored = await self._stored(key, response_id)  # 404 when not there at all
                if (
                    self.remote is not None
                    and stored.get("background")
                    and await self._mirrored(response_id, stored["status"])
                ):  # running, or just ended, on another replica: its log is in Redis
                    return ResponsesLogReader(
                        self.remote.view(response_id),
                        after=after,
                        replayed=False,
                        keepalive=self.keepalive,
                    )
                raise InvalidRequest(
                    "This response can no longer be streamed: only a background response's "
                    f"events are held, for {int(FINISHED_LOG_SECONDS)} s after it ends.",
                    param="stream",
                    code="stream_unavailable",
                )
            return ResponsesLogReader(
                live.log, after=after, replayed=False, keepalive=self.keepalive
            )
        if live is not None:
            codec = live.codec
            return json_response(codec.final or codec.encoder.snapshot())
        return json_response(await self._stored(key, response_id))

    async def _mirrored(self, response_id: str, status: str) -> bool:
        """Its log is in Redis; one just started elsewhere shows up with the mirror's
        next flush (every 50 ms), so a running one is waited for a moment."""
        assert self.remote is not None
        deadline = time.monotonic() + (0.0 if status in TERMINAL else MIRROR_WAIT_SECONDS)
        while True:
            if await self.remote.exists(response_id):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def delete(self, request: Request) -> Response:
        key = await self._key(request)
        response_id = request.path_params["response_id"]
        live = self._live(key, response_id)
        if live is not None and not live.done.is_set():
            self._cancel_here(response_id)
            await live.done.wait()
        deleted = self.store is not None and await self.store.delete(key.id, response_id)
        if not deleted:
            raise _not_found(response_id)
        self.live.pop(response_id, None)
        return json_response({"id": response_id, "object": "response", "deleted": True})

    async def cancel(self, request: Request) -> Response:
        key = await self._key(request)
        response_id = request.path_params["response_id"]
        live = self._live(key, response_id)
        if live is None:
            stored = await self._stored(key, response_id)
            if not stored.get("background"):
                raise InvalidRequest(
                    "Only responses created with 'background' true can be cancelled.",
                    param="response_id",
                    code="not_background",
                )
            if stored["status"] not in TERMINAL:
                return json_response(await self._cancel_elsewhere(key, response_id))
            return json_response(stored)
        if not live.done.is_set():
            self._cancel_here(response_id)
            await live.done.wait()
        return json_response(live.codec.final or live.codec.encoder.snapshot())

    def _cancel_here(self, response_id: str) -> None:
        """Cancel a background response if this replica runs it (also on a cancel
        that reached another replica: server/cancels.py)."""
        live = self.live.get(response_id)
        if live is not None and not live.done.is_set():
            live.codec.cancelled = True
            live.response.generation.cancel()

    async def _cancel_elsewhere(self, key: KeyRecord, response_id: str) -> dict[str, Any]:
        """Have the replica running it cancel it; the stored response once it ended."""
        why = (
            "cancels reach other servers only with Redis configured"
            if self.cancels is None
            else "no server running it answered the cancel"
        )
        conflict = InvalidRequest(
            f"This response is running on another server, and {why}.",
            param="response_id",
            code="response_elsewhere",
        )
        conflict.status = 409
        if self.cancels is None or await self.cancels.publish(response_id) < 2:
            raise conflict  # no Redis, or no replica but this one listening
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < deadline:
            stored = await self._stored(key, response_id)
            if stored["status"] in TERMINAL:
                return stored
            await asyncio.sleep(0.05)
        raise conflict

    async def input_items(self, request: Request) -> Response:
        key = await self._key(request)
        response_id = request.path_params["response_id"]
        stored = await self.store.get(key.id, response_id) if self.store is not None else None
        if stored is None:
            raise _not_found(response_id)
        params = request.query_params
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest(
                f"Invalid value for 'order': {order[:40]!r}. Supported values are: 'asc', 'desc'.",
                param="order",
                code="invalid_value",
            )
        raw_limit = params.get("limit", "20")
        if not raw_limit.isascii() or not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
            raise InvalidRequest(
                "Invalid 'limit': an integer from 1 to 100.", param="limit", code="invalid_value"
            )
        items = input_item_objects(stored.input_items, response_id)
        if order == "desc":
            items.reverse()
        after = params.get("after")
        if after is not None:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[: int(raw_limit)]
        return json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > len(page),
            }
        )

    async def input_tokens(self, request: Request) -> Response:
        key = await self._key(request)
        _, rr, engine = await self._parse(request, key)
        if not engine.ready:
            await wait_until_ready(engine, self.chat.model_load_wait)
        prepared = engine.prepare(rr.chat)
        return json_response(
            {"object": "response.input_tokens", "input_tokens": prepared.prompt_tokens}
        )


def _starting_after(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise InvalidRequest(
            "Invalid 'starting_after': a sequence number (a non-negative integer).",
            param="starting_after",
            code="invalid_value",
        )
    return int(value)


def _not_found(response_id: str) -> NotFound:
    return NotFound(
        f"Response with id '{response_id[:80]}' not found.",
        param="response_id",
    )


class ResponsesLogReader(LogReader):
    """A reader of a background response's log: a stream it cannot finish ends with
    a Responses ``error`` event (the next sequence number), not chat's ``[DONE]``."""

    async def _end(self, send: Send, message: str) -> None:
        event = {
            "type": "error",
            "sequence_number": self.next,
            "error": {
                "type": "server_error",
                "code": "interrupted",
                "message": message,
                "param": None,
            },
        }
        out = b"id: %d\n%s" % (self.next, frame(event))
        await send({"type": "http.response.body", "body": out, "more_body": False})
