"""The ASGI response that runs one generation to the client.

It streams SSE events (or collects one JSON body), watches the connection
for the client going away, sends keep-alives while nothing is ready, and
settles the request exactly once, whatever happens: billing reads
the engine's meter only after the engine has let go of the request, so the
bill is exactly what was generated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from tokenwell.engines.base import Generation
from tokenwell.moderation import OutputFilter
from tokenwell.protocol.codec import Codec
from tokenwell.protocol.events import Failed, TextDelta, ToolCallStart

log = logging.getLogger(__name__)

# Ledger statuses of a finished request, by the finish reasons of its choices;
# with n > 1 the most telling reason wins.
_STATUS_BY_REASON = {
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "length": "length",
    "stop": "completed",
}


def finished_status(reasons: dict[int, str]) -> str:
    for reason, status in _STATUS_BY_REASON.items():
        if reason in reasons.values():
            return status
    return "completed"


@dataclass(slots=True)
class Outcome:
    """How a request ended, for the ledger."""

    status: str
    started_at: float
    first_token_at: float | None = None
    ended_at: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# Settling bills the request: usage journaled, limits trued up, the ledger
# close queued (it commits moments later, without holding the response).
Settle = Callable[[Generation, Outcome], Awaitable[None]]


class GenerationResponse:
    def __init__(
        self,
        generation: Generation,
        codec: Codec,
        *,
        stream: bool,
        keepalive: float,
        settle: Settle,
        headers: dict[str, str] | None = None,
        started_at: float | None = None,
        output_filter: OutputFilter | None = None,
        slow_client: str = "pause",
        stream_buffer: int | None = None,
    ) -> None:
        self.generation = generation
        # The wire API: every byte sent is the codec's (protocol.codec).
        self.codec = codec
        self.stream = stream
        self.keepalive = keepalive
        self._settle = settle
        self.headers = headers or {}
        self.outcome = Outcome("completed", started_at or time.perf_counter())
        self.disconnected = False
        self.interrupted = False
        self._response_started = False
        self._finished = False
        self._settled = asyncio.Event()
        self.filter = output_filter
        # A slow reader (see config.HTTPConfig): how far behind a stream may
        # fall, and whether its engine then pauses or the request ends.
        self.slow_client = slow_client
        self.stream_buffer = stream_buffer
        self.slow = False
        self._state: dict[str, Any] = {}
        self._ending: asyncio.Task[None] | None = None
        # Awaited just before the response's last bytes go out, whatever they
        # are (a stored response's row is committed first: a client that has
        # the whole response finds it stored) ...
        self.before_last: Callable[[], Awaitable[None]] | None = None
        # ... or just after them, where what it does is seen by every request
        # the server handles next (a put queued in the same step of the event
        # loop, which every read of its id waits for: ResponseStore.commits_in_step).
        self.after_last: Callable[[], Awaitable[None]] | None = None
        # Where a stream's events go first when it is produced into a request log
        # (requestlog.Producer.take_event: no send coroutine per token); True
        # when taken.
        self.event_sink: Callable[[bytes], bool] | None = None
        # Produced into a request log, whose producer says when every reader has
        # gone (``abandon``): no receive channel to watch, so no task for it.
        self.detached = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state")
        self._state = state if isinstance(state, dict) else {}
        if self.stream and self.stream_buffer is not None:
            gen = self.generation
            pauses = self.slow_client == "pause" and gen.pausable
            # Per choice. A pausing engine stops at the mark; the request ends
            # at 4x only if it did not (one step can push many events).
            mark = self.stream_buffer * gen.n
            gen.backpressure(mark, mark * 4 if pauses else mark, self._too_slow)
        watcher = None if self.detached else asyncio.create_task(self._watch(receive))
        try:
            if self.stream:
                await self._send_stream(send)
            else:
                await self._send_json(send)
        except OSError:
            self._client_gone()
        except asyncio.CancelledError:
            # The server is going down and its drain time is over: stop
            # generating, bill what was made as `interrupted`, and end the
            # response properly below (no cut stream, no traceback).
            self.interrupted = True
            self.generation.cancel()
        finally:
            if watcher is not None:
                watcher.cancel()
            await asyncio.shield(self._finish())
        if self.interrupted and not self.disconnected:
            await self._send_interrupted(send)

    @property
    def _complete(self) -> bool:
        """Every choice finished (or was ended by the content filter)."""
        return self.generation.done or (self.filter is not None and self.filter.all_done)

    @property
    def _cut_short(self) -> bool:
        """The content filter ended every choice that was still going: stop reading."""
        return self.filter is not None and self.filter.filtered and self.filter.all_done

    def _filtered(self, events: list[Any]) -> list[Any]:
        if self.filter is None or not events:
            return events
        out = self.filter.apply(events)
        if self._cut_short and not self.generation.done:
            # Stop generating (what was made is billed). Otherwise the engine
            # ends by itself, and an upstream's usage chunk, after the finish
            # chunk, is still read.
            self.generation.cancel()
        return out

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._client_gone()
                return

    def abandon(self) -> None:
        """No one reads this response any more (a detached one's producer says so)."""
        self._client_gone()

    def _client_gone(self) -> None:
        if not self.disconnected:
            self.disconnected = True
            if self._state.get("send_timed_out"):
                self.slow = True  # cut off by the server (server.protocol): it read nothing
            self.generation.cancel()

    def _too_slow(self) -> None:
        """The reader is a whole buffer behind: end the request now and bill it.

        The response ends (an error event and [DONE]) once the client takes
        what is already on its way, or is cut off by ``send_timeout``.
        """
        if self.slow or self._finished:
            return
        self.slow = True
        self.generation.cancel()
        self._ending = asyncio.ensure_future(self._finish())

    async def _finish(self) -> None:
        """Settle once: before the last bytes on the normal path, else on the way out."""
        if self._finished:
            await self._settled.wait()  # settled once, by whoever came first
            return
        self._finished = True
        try:
            await self._settle_once()
        finally:
            self._settled.set()

    async def _settle_once(self) -> None:
        gen = self.generation
        if not gen.is_closed:
            gen.cancel()
            try:
                await asyncio.wait_for(gen.closed(), timeout=30)
            except TimeoutError:
                log.error("engine did not release request %s within 30 s", self.codec.id)
        outcome = self.outcome
        outcome.ended_at = time.perf_counter()
        outcome.first_token_at = gen.first_token_at
        if self.filter is not None and self.filter.filtered:
            outcome.status = "content_filter"
        elif self.interrupted or (gen.failure is not None and gen.failure.code == "shutting_down"):
            outcome.status = "interrupted"
        elif gen.failure is not None:
            outcome.status = (
                "upstream_error" if gen.failure.status == "upstream_error" else "engine_error"
            )
            outcome.error = gen.failure.message
        elif self._complete:
            outcome.status = finished_status(gen.finished)
        elif self.slow:
            outcome.status = "slow_client"
            outcome.error = "the client read its stream too slowly"
        elif self.disconnected:
            outcome.status = "client_disconnected"
        else:
            outcome.status = "interrupted"
        try:
            await self._settle(gen, outcome)
        except Exception:
            log.exception("settling request %s failed", self.codec.id)

    # ------------------------------------------------------------------ stream

    async def _send_stream(self, send: Send) -> None:
        gen = self.generation
        codec = self.codec
        started = False
        head = b""
        # A keep-alive goes out only after ``keepalive`` seconds with nothing sent.
        quiet_since = time.perf_counter()
        while not self.disconnected:
            wait = max(self.keepalive - (time.perf_counter() - quiet_since), 0.0)
            events = self._filtered(await gen.next_batch(wait))
            if (
                not events
                and not gen.exhausted
                and time.perf_counter() - quiet_since < self.keepalive
            ):
                continue  # woken with nothing to send (or all of it filtered out)
            quiet_since = time.perf_counter()
            if not started:
                if events and isinstance(events[0], Failed):
                    # Nothing was sent yet: an ordinary HTTP error, never a 200.
                    await asyncio.shield(self._finish())
                    await self._send_error(send, events[0])
                    return
                if not events and gen.exhausted:
                    break
                # The first event, or a keep-alive that cannot wait: commit to 200.
                await self._start_stream(send)
                started = True
                head = codec.head(gen.meter)
            if not events:
                if gen.exhausted:
                    break
                body, head = head + codec.keepalive, b""
                await send({"type": "http.response.body", "body": body, "more_body": True})
                continue
            if gen.first_token_at is None:
                _mark_first(gen, events)
            out = head + b"".join(codec.render(event) for event in events)
            head = b""
            sink = self.event_sink
            if not self.disconnected and (sink is None or not sink(out)):
                await send({"type": "http.response.body", "body": out, "more_body": True})
            if gen.failure is not None or self._cut_short:
                break
        if self.disconnected:
            return
        # Billed (journaled, limits trued up, ledger close queued) before [DONE].
        await asyncio.shield(self._finish())
        if not started:
            await self._send_error(send, _interrupted())
            return
        if self.slow and not self._complete and gen.failure is None:
            tail = codec.error(
                "The client read the stream too slowly; the generation was ended.",
                "slow_client",
            )
        elif not self._complete and gen.failure is None:
            # The engine let go without finishing (shut down): say so.
            tail = codec.error("The generation was interrupted.", "interrupted")
        elif gen.failure is None:
            tail = codec.end(gen.meter)
        else:
            tail = codec.after_failure()
        await self._send_last(send, head + tail)

    async def _send_interrupted(self, send: Send) -> None:
        """End a response cut by shutdown: an error event and [DONE], or a 503."""
        message = "The server is shutting down; the generation was interrupted."
        try:
            async with asyncio.timeout(1):
                if self._response_started and self.stream:
                    tail = self.codec.error(message, "interrupted")
                    await self._send_last(send, tail)
                elif not self._response_started:
                    await self._send_error(send, Failed(message, "interrupted", http_status=503))
        except (OSError, TimeoutError, RuntimeError):
            pass  # the client is gone or the connection is closing: nothing to tell

    async def _start_stream(self, send: Send) -> None:
        self._response_started = True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    *_headers(self.headers, self.codec.media_type),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )

    async def _send_last(self, send: Send, body: bytes) -> None:
        if self.before_last is not None:
            await self.before_last()
        try:
            await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            if self.after_last is not None:
                await self.after_last()

    async def _send_error(self, send: Send, failure: Failed) -> None:
        status, content = self.codec.error_body(failure)
        body = orjson.dumps(content)
        self._response_started = True
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    *_headers({**self.headers, **(failure.headers or {})}, b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await self._send_last(send, body)

    # ------------------------------------------------------------------ JSON

    async def _send_json(self, send: Send) -> None:
        gen = self.generation
        codec = self.codec
        while not self.disconnected:
            events = self._filtered(await gen.next_batch(None))
            if not events and gen.exhausted:
                break
            if self._cut_short:
                for event in events:
                    codec.add(event)
                break
            if gen.first_token_at is None:
                _mark_first(gen, events)
            for event in events:
                codec.add(event)
        if self.disconnected:
            return
        await asyncio.shield(self._finish())
        if gen.failure is not None or not self._complete:
            await self._send_error(send, gen.failure or _interrupted())
            return
        body = orjson.dumps(codec.body(gen.meter))
        self._response_started = True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    *_headers(self.headers, b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await self._send_last(send, body)


def _interrupted() -> Failed:
    return Failed("The generation was interrupted.", "interrupted", http_status=503)


def _mark_first(gen: Generation, events: list[Any]) -> None:
    if any(isinstance(e, TextDelta | ToolCallStart) for e in events):
        gen.first_token_at = time.perf_counter()


def _headers(extra: dict[str, str], content_type: bytes) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", content_type)]
    headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
    return headers
