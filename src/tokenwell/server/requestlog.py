"""One request, one log: a request's response, numbered, and every connection a reader.

A request made with an ``Idempotency-Key`` does not write to its connection.
A ``Producer`` runs its ``GenerationResponse`` into a ``RequestLog`` — the
status and headers, then the SSE events one by one (numbered from 0, ``[DONE]``
included), or one JSON body — and each connection (the first, a retry, a
resume with ``Last-Event-ID``) is a ``LogReader`` that sends what the log
holds after the reader's position, then what comes, with an ``id: N`` line
on every event.

Generation no longer ends with a socket: when the last reader leaves, the
producer waits ``grace`` seconds for another, then disconnects the response
(it is cancelled and billed ``client_disconnected``, as before).

In process by default. With Redis (``RedisLogs``) the log is mirrored there
as it grows, so a reader on another replica can follow it; that replica's
readers keep the generation alive through a presence key, and the producer a
heartbeat, so a reader sees when the replica that generated has died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Protocol

import msgpack
import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenwell.protocol import sse
from tokenwell.protocol.render import StreamRenderer
from tokenwell.server.generation import GenerationResponse

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]


class LogGone(Exception):
    """The log is no longer where the reader was reading it (the request finished)."""


class ProducerGone(Exception):
    """The server that was generating this request stopped before it finished."""


class Truncated(Exception):
    """The events asked for are no longer held (the log outgrew its bound)."""


# The ``id:`` lines of a stream's first events, made once (one per token otherwise).
_NUMBERED = 4096
_IDS = [b"id: %d\n" % n for n in range(_NUMBERED)]


def numbered(events: list[bytes], start: int) -> bytes:
    """``events`` with an ``id:`` line each, numbered from ``start``."""
    return b"".join(
        (_IDS[n] if n < _NUMBERED else b"id: %d\n" % n) + event
        for n, event in enumerate(events, start)
    )


def split_events(body: bytes) -> list[bytes]:
    """SSE bytes → one ``data: …\\n\\n`` block per event (comments dropped)."""
    if body.endswith(b"\n\n") and body.find(b"\n\n") == len(body) - 2 and body[:1] != b":":
        return [body]  # one event: what a stream sends per token
    return [part + b"\n\n" for part in body.split(b"\n\n") if part and not part.startswith(b":")]


class LogView(Protocol):
    """What a reader reads: a local ``RequestLog`` or a ``RemoteLog``."""

    def attach(self) -> None: ...

    def detach(self) -> None: ...

    async def head(self) -> tuple[int, Headers, bool]: ...

    async def read(self, start: int, timeout: float) -> tuple[list[bytes], bool]: ...

    async def body(self) -> bytes: ...


class RequestLog:
    """A request's response as it is made. Pure bookkeeping on the event loop."""

    def __init__(self, request_id: str, stream: bool, max_bytes: int) -> None:
        self.request_id = request_id
        self.stream = stream
        self.max_bytes = max_bytes
        self.status: int | None = None
        self.headers: Headers = []
        self.events: list[bytes] = []
        self.first = 0  # the number of events[0]: more than 0 once trimmed
        self.size = 0
        self.body_bytes = b""
        self.done = False
        self.complete = False  # the response ended as it should (not abandoned)
        self.readers = 0
        self.on_idle: Callable[[], None] | None = None
        self.on_active: Callable[[], None] | None = None
        self.on_change: Callable[[RequestLog], None] | None = None  # a mirror's
        # A reader that caught up: the producer writes new events straight to its
        # connection (LogReader.push) instead of waking it for each.
        self.sink: LogReader | None = None
        self._waiters: list[asyncio.Future[None]] = []

    @classmethod
    def completed(
        cls,
        request_id: str,
        stream: bool,
        status: int,
        content_type: str,
        body: bytes,
    ) -> RequestLog:
        """A finished request's stored response, as a log to read."""
        done = cls(request_id, stream, max(len(body), 1))
        headers: Headers = [
            (b"content-type", content_type.encode()),
            (b"x-request-id", request_id.encode()),
        ]
        done.start(status, headers)
        if done.sse:
            done.headers.append((b"cache-control", b"no-cache"))
            done.append(split_events(body))
        else:
            done.body_bytes = body
        done.complete = True
        done.finish()
        return done

    @property
    def sse(self) -> bool:
        return self.stream and self.status == 200

    @property
    def end(self) -> int:
        """The number the next event gets."""
        return self.first + len(self.events)

    @property
    def truncated(self) -> bool:
        return self.first > 0

    @property
    def content_type(self) -> str:
        for name, value in self.headers:
            if name.lower() == b"content-type":
                return value.decode()
        return "application/json"

    # ---------------------------------------------------------------- writer

    def start(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = [
            (name, value) for name, value in headers if name.lower() != b"content-length"
        ]
        self._notify()

    def append(self, events: list[bytes]) -> None:
        if not events:
            return
        self.events.extend(events)
        self.size += sum(map(len, events))
        if self.size > self.max_bytes:
            # Keep the newest: live readers go on; a reader behind the cut is told.
            cut = 0
            while self.size > self.max_bytes and cut < len(self.events) - 1:
                self.size -= len(self.events[cut])
                cut += 1
            del self.events[:cut]
            self.first += cut
        self._notify()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            if self.sink is not None:
                self.sink.unsink(None)
            self._notify()

    # ---------------------------------------------------------------- readers

    def attach(self) -> None:
        self.readers += 1
        if self.on_active is not None:
            self.on_active()

    def detach(self) -> None:
        self.readers -= 1
        if self.readers == 0 and not self.done and self.on_idle is not None:
            self.on_idle()

    async def head(self) -> tuple[int, Headers, bool]:
        while self.status is None:
            await self.wait(None)
        return self.status, self.headers, self.sse

    async def read(self, start: int, timeout: float) -> tuple[list[bytes], bool]:
        """The events from number ``start`` on (waits up to ``timeout`` for one); done?"""
        if start >= self.end and not self.done:
            await self.wait(timeout)
        if start < self.first:
            raise Truncated(f"events before {self.first} are no longer held")
        events = self.events[start - self.first :]
        return events, self.done

    async def body(self) -> bytes:
        while not self.done:
            await self.wait(None)
        return self.body_bytes

    async def wait(self, timeout: float | None) -> None:
        """Until the log changes, or ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        handle = loop.call_later(timeout, _resolve, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change(self)
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _resolve(waiter)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# ---------------------------------------------------------------------- producer


class Producer:
    """Runs a response (``GenerationResponse``) into a log instead of a socket."""

    def __init__(
        self,
        request_log: RequestLog,
        response: ASGIApp,
        grace: float,
        on_done: Callable[[RequestLog], Awaitable[None]],
        remote: RedisLogs | None = None,
    ) -> None:
        self.log = request_log
        self.response = response
        self.grace = grace
        self.on_done = on_done
        self.remote = remote
        self.abandoned = False
        self._streaming = False  # an SSE response has begun
        self._abandon = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        request_log.on_idle = self._idle
        request_log.on_active = self._active

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self._run(), name=f"produce-{self.log.request_id}")
        return self.task

    async def _run(self) -> None:
        mirror = self.remote.mirror(self.log) if self.remote is not None else None
        if isinstance(self.response, GenerationResponse):
            self.response.event_sink = self.take_event
            self.response.detached = True  # told by _give_up, not through _receive
        try:
            await self.response({"type": "http"}, self._receive, self._send)
        except Exception:
            log.exception("request %s failed while producing", self.log.request_id)
        finally:
            self._active()
            self.log.finish()
            if mirror is not None:
                with contextlib.suppress(Exception):
                    await mirror
            try:
                await self.on_done(self.log)
            except Exception:
                log.exception("storing the result of %s failed", self.log.request_id)

    async def _receive(self) -> dict[str, Any]:
        await self._abandon.wait()
        return {"type": "http.disconnect"}

    def take_event(self, body: bytes) -> bool:
        """One event of a stream (what it sends per token), logged and handed to a
        caught-up reader, with no coroutine: a ``GenerationResponse`` offers
        its events here first (its ``event_sink``). False: not one event; it
        goes through ``_send``."""
        size = len(body)
        if not (
            self._streaming
            and size > 2
            # One event, ending the body: a chat chunk's one line found with
            # memchr; else (an ``event:`` line first) the first blank line.
            and (body.find(b"\n") == size - 2 or body.find(b"\n\n") == size - 2)
            and body[-1] == 10
            and body[0] != 58  # ":": a comment (keep-alive)
        ):
            return False
        rlog = self.log
        number = rlog.first + len(rlog.events)
        rlog.events.append(body)
        rlog.size += size
        if rlog.size > rlog.max_bytes or rlog._waiters:
            rlog.size -= size
            rlog.events.pop()
            rlog.append([body])
        elif rlog.on_change is not None:
            rlog.on_change(rlog)
        sink = rlog.sink
        if sink is None:
            return True
        if number != sink.next:  # pragma: no cover - a sink is always caught up
            sink.unsink(None)
            return True
        # LogReader.push and .deliver for one event, inline: this runs per token.
        sink.next = number + 1
        pump = sink._pump
        try:
            outcome = pump.send(  # type: ignore[union-attr]
                {
                    "type": "http.response.body",
                    "body": (_IDS[number] if number < _NUMBERED else b"id: %d\n" % number) + body,
                    "more_body": True,
                }
            )
        except Exception as exc:
            sink.unsink(exc)
            return True
        if outcome is not _SENT:  # the connection is slow: its reader finishes the send
            sink.unsink((pump, outcome))
        return True

    async def _send(self, message: dict[str, Any]) -> None:
        rlog = self.log
        body = message.get("body")
        if body and message.get("more_body") and self.take_event(body):
            return
        if message["type"] == "http.response.start":
            rlog.start(message["status"], list(message.get("headers", [])))
            self._streaming = rlog.sse
            if rlog.sink is not None:
                rlog.sink.begin(rlog)
            return
        body = body or b""
        if rlog.sse:
            if body == sse.KEEPALIVE:
                if rlog.sink is not None:
                    rlog.sink.deliver(sse.KEEPALIVE_NUMBERED)
            elif body:
                start = rlog.end
                events = split_events(body)
                rlog.append(events)
                if rlog.sink is not None:
                    rlog.sink.push(events, start)
        else:
            rlog.body_bytes += body
        if not message.get("more_body", False):
            rlog.complete = True
            rlog.finish()

    # The grace period: armed when the last reader leaves, disarmed when one comes.

    def _idle(self) -> None:
        self._active()
        self._timer = asyncio.get_running_loop().call_later(self.grace, self._grace_over)

    def _active(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _grace_over(self) -> None:
        self._timer = None
        if self.log.readers or self.log.done:
            return
        if self.remote is None:
            self._give_up()
        else:
            asyncio.get_running_loop().create_task(self._check_remote())

    async def _check_remote(self) -> None:
        assert self.remote is not None
        try:
            left = await self.remote.readers_left(self.log.request_id)
        except Exception:
            log.warning("could not ask Redis for readers of %s", self.log.request_id)
            left = 0.0
        if self.log.readers or self.log.done or self._timer is not None:
            return
        if left > 0:
            self._timer = asyncio.get_running_loop().call_later(left, self._grace_over)
        else:
            self._give_up()

    def _give_up(self) -> None:
        self.abandoned = True
        self._abandon.set()
        if isinstance(self.response, GenerationResponse):
            self.response.abandon()


# ---------------------------------------------------------------------- reader


class LogReader:
    """One connection reading a log: the ASGI app a keyed request answers with."""

    def __init__(
        self,
        view: LogView,
        *,
        after: int | None,
        replayed: bool,
        keepalive: float,
        reopen: Callable[[], Awaitable[LogView | None]] | None = None,
    ) -> None:
        self.view = view
        self.next = 0 if after is None else after + 1
        self.replayed = replayed
        self.keepalive = keepalive
        self.reopen = reopen
        self.gone = False
        self._begun = False  # the head was sent by the producer (``begin``)
        self._send: Send | None = None
        self._pump: Generator[Any, dict[str, Any] | None, None] | None = None  # ``_pump``
        self._sunk: asyncio.Future[Any] | None = None

    # ------------------------------------------------ written to by the producer

    def begin(self, view: RequestLog) -> None:
        """The log's head, for this reader that was its sink before it had one: a
        stream's head written to its connection now, from the producer's task;
        anything else (one JSON body, an error) left to this reader's task."""
        if not view.sse:
            self.unsink(None)
            return
        headers = view.headers
        if self.replayed:
            headers = [*headers, (b"idempotent-replayed", b"true")]
        self._begun = True
        self.next = view.end
        self._send_now({"type": "http.response.start", "status": view.status, "headers": headers})

    def push(self, events: list[bytes], start: int) -> None:
        """New events, numbered from ``start``, for this caught-up reader (the log's
        sink): written to its connection now, from the producer's task."""
        if start != self.next:  # pragma: no cover - a sink is always caught up
            self.unsink(None)
            return
        self.next = start + len(events)
        self.deliver(numbered(events, start))

    def deliver(self, body: bytes) -> None:
        self._send_now({"type": "http.response.body", "body": body, "more_body": True})

    def _send_now(self, message: dict[str, Any]) -> None:
        """Send without making the producer wait: a send that cannot finish now
        (the connection is slow: uvicorn waits for its buffer to drain before
        writing) is handed to this reader's own task, which finishes it and goes
        back to reading the log; the producer generates on, as for any reader."""
        pump = self._pump
        assert pump is not None
        try:
            outcome = pump.send(message)
        except Exception as exc:
            self.unsink(exc)
            return
        if outcome is not _SENT:
            self.unsink((pump, outcome))

    def unsink(self, outcome: Any) -> None:
        """Stop being the log's sink; wake this reader's task with ``outcome``:
        None, an exception to raise, or a send to finish."""
        view = self.view
        if isinstance(view, RequestLog) and view.sink is self:
            view.sink = None
        sunk, self._sunk = self._sunk, None
        if sunk is not None and not sunk.done():
            sunk.set_result(outcome)

    async def _sink(self, view: RequestLog) -> None:
        """Caught up with a live log: be its sink until it ends or a send waits."""
        if self._pump is None:
            assert self._send is not None
            self._pump = _pump(self._send)
            self._pump.send(None)
        view.sink = self
        self._sunk = sunk = asyncio.get_running_loop().create_future()
        try:
            outcome = await sunk
        finally:
            if view.sink is self:
                view.sink = None
            self._sunk = None
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is not None:
            await _finish_send(*outcome)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        view = self.view
        view.attach()
        watcher = asyncio.create_task(self._watch(receive, task))
        try:
            await self._serve(send)
        except OSError:
            self.gone = True
        except asyncio.CancelledError:
            if not self.gone:
                raise
            task.uncancel()
        finally:
            watcher.cancel()
            view.detach()

    async def _watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                task.cancel()
                return

    async def _switch(self) -> bool:
        """The log moved (finished, from Redis to the database): read it there."""
        view = await self.reopen() if self.reopen is not None else None
        if view is None:
            return False
        self.view.detach()
        self.view = view
        view.attach()
        return True

    async def _serve(self, send: Send) -> None:
        view = self.view
        if (
            isinstance(view, RequestLog)
            and view.status is None
            and view.sink is None
            and self.next == 0
        ):
            # Here before the log's head (the request's own connection, whose
            # producer starts on the loop's next turn): its sink from the head
            # on, so the producer writes the whole stream to this connection as
            # it makes it, with no wake-up of this task for the head, the first
            # event, or any after it.
            self._send = send
            await self._sink(view)
            if self._begun:
                await self._follow(send)
                return
        while True:
            try:
                status, headers, is_sse = await self.view.head()
                break
            except LogGone:
                if not await self._switch():
                    body = orjson.dumps(
                        {
                            "error": {
                                "message": "The request's result is no longer available.",
                                "type": "server_error",
                                "param": None,
                                "code": "interrupted",
                            }
                        }
                    )
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 503,
                            "headers": [(b"content-type", b"application/json")],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
        headers = list(headers)
        if self.replayed:
            headers.append((b"idempotent-replayed", b"true"))
        if not is_sse:
            while True:
                try:
                    body = await self.view.body()
                    break
                except LogGone:
                    if not await self._switch():
                        raise
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        self._send = send
        await self._follow(send)

    async def _follow(self, send: Send) -> None:
        """The stream's events from ``self.next`` on, as the log gets them, to its end."""
        # A keep-alive only after ``keepalive`` seconds with nothing sent (a log
        # also changes without new events: its head, its readers).
        quiet_since = time.monotonic()
        while True:
            view = self.view
            if (
                isinstance(view, RequestLog)
                and view.sink is None
                and not view.done
                and self.next == view.end
            ):
                await self._sink(view)
                continue
            wait = max(self.keepalive - (time.monotonic() - quiet_since), 0.0)
            try:
                events, done = await self.view.read(self.next, wait)
            except LogGone:
                if not await self._switch():
                    await self._end(send, "The request's event log is no longer available.")
                    return
                continue
            except ProducerGone:
                await self._end(
                    send, "The server generating this response stopped before it finished."
                )
                return
            except Truncated:
                await self._end(
                    send,
                    "The events after Last-Event-ID are no longer held: the response "
                    "outgrew the server's event log (idempotency.max_log_bytes).",
                )
                return
            if events:
                out = numbered(events, self.next)
                self.next += len(events)
                await send({"type": "http.response.body", "body": out, "more_body": True})
                quiet_since = time.monotonic()
            elif done:
                break
            elif time.monotonic() - quiet_since >= self.keepalive:
                await send(
                    {
                        "type": "http.response.body",
                        "body": sse.KEEPALIVE_NUMBERED,
                        "more_body": True,
                    }
                )
                quiet_since = time.monotonic()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _end(self, send: Send, message: str) -> None:
        error = StreamRenderer.error(message, "interrupted")
        out = b"id: %d\n%sid: %d\n%s" % (self.next, error, self.next + 1, sse.DONE)
        await send({"type": "http.response.body", "body": out, "more_body": False})


# What a pump yields once a message is sent.
_SENT = object()


@types.coroutine
def _pump(send: Send) -> Generator[Any, dict[str, Any] | None, None]:
    """Sends each message given to it (``pump.send(message)``) with ``send``:
    ``pump.send`` returns ``_SENT`` once it is written, or what the send waits on
    when it cannot finish now (then whoever holds the pump runs it to ``_SENT``
    with ``_finish_send``). A send's end is a return inside ``yield from``, where
    driving the send's own coroutine would end each message with a StopIteration:
    an exception made and caught per token (2.5k instructions in CPython 3.11,
    twice what the send itself takes)."""
    message = yield _SENT
    while True:
        yield from send(message)  # type: ignore[arg-type, misc]
        message = yield _SENT


async def _finish_send(pump: Any, pending: Any) -> None:
    """Run a send that the producer began on another task to its end, here:
    what a task does with a coroutine that waits (``pending``: what it waits on,
    a future yielded up by ``await``, or None for a bare yield)."""
    while pending is not _SENT:
        try:
            if pending is None:
                await asyncio.sleep(0)
            else:
                # The future was yielded with its "awaited" flag set, for the task
                # that runs the send to clear: that task is this one. Awaited again
                # with the flag still set, asyncio raises "await wasn't used with
                # future" (a slow keyed reader's connection was aborted so).
                pending._asyncio_future_blocking = False
                await pending
        except BaseException as exc:  # cancelled (the client left): the send ends too
            pending = pump.throw(exc)
            continue
        pending = pump.send(None)


# ---------------------------------------------------------------------- Redis


class RedisLogs:
    """Request logs mirrored to Redis, for readers on other replicas.

    Per request, under ``{prefix}{request_id}:``: ``m`` (hash: status, headers,
    sse, done, body), ``e`` (list: the events), ``a`` (the producer's
    heartbeat, 3 s), ``r`` (readers elsewhere: how long they keep it alive).
    Everything is deleted once the result is stored in the database.
    """

    HEARTBEAT = 1.0
    ALIVE_MS = 3000
    INTERVAL = 0.05  # between two flushes: what changed meanwhile goes in one

    def __init__(self, url: str, ttl: float, grace: float, prefix: str = "tokenwell:log:") -> None:
        import redis.asyncio as redis

        self.client: Any = redis.from_url(url)
        self.ttl = max(int(ttl), 1)
        self.grace = grace
        self.prefix = prefix
        self._live: dict[str, _Mirror] = {}  # logs being mirrored, by request id
        self._pending = False  # something to send
        self._script: Any = None
        self._forgotten: list[tuple[str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None

    def _k(self, request_id: str, part: str) -> str:
        return f"{self.prefix}{request_id}:{part}"

    def mirror(self, request_log: RequestLog) -> asyncio.Future[None]:
        """Mirror the log as it grows; resolves once its end is in Redis.

        One flusher serves every log of this process: each round it sends what
        changed in all of them — heads, new events (one RPUSH per log), heartbeats
        due, ends, forgotten logs — in one pipeline (one round trip), then waits
        ``INTERVAL`` for more to gather. A log per task, one pipeline per event,
        made ~14 round trips and ~30 commands per request of the benchmark.
        """
        mirror = _Mirror(self, request_log, asyncio.get_running_loop().create_future())
        self._live[request_log.request_id] = mirror
        request_log.on_change = mirror.changed
        mirror.changed(request_log)
        return mirror.finished

    def _poke(self) -> None:
        """Something changed: the flusher sends it in its next round."""
        self._pending = True
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_forever(), name="redis-log-mirror"
            )
        waiter = self._wake
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:  # nothing changed: wake for the heartbeats only
                self._wake = loop.create_future()
                handle = loop.call_later(self.HEARTBEAT, _resolve, self._wake)
                try:
                    await self._wake
                finally:
                    handle.cancel()
                    self._wake = None
            self._pending = False
            try:
                await self._flush()
            except Exception:
                log.warning("mirroring request logs to Redis failed", exc_info=True)
            await asyncio.sleep(self.INTERVAL)

    async def _flush(self) -> None:
        forgotten, self._forgotten = self._forgotten, []
        args: list[Any] = [self.prefix, self.ttl, self.ALIVE_MS]
        now = time.monotonic()
        ended: list[_Mirror] = []
        for mirror in list(self._live.values()):
            # What changed, and heartbeats due.
            if (mirror.dirty or now - mirror.beat >= self.HEARTBEAT) and mirror.write(
                self, args, now
            ):
                ended.append(mirror)
        for request_id, _ in forgotten:
            args.extend((request_id, _DELETE, 0))
        try:
            if len(args) > 3:
                # One command for the whole round (a pipeline of one command per
                # log and change cost redis-py ~10 µs of packing per command),
                # with one argument: redis-py encodes and packs each argument
                # in Python, and a round at 64 streams had ~5 per log.
                if self._script is None:
                    self._script = self.client.register_script(_FLUSH)
                await self._script(args=[msgpack.packb(args, use_bin_type=False)])
        finally:
            for mirror in ended:
                self._live.pop(mirror.rlog.request_id, None)
                _resolve(mirror.finished)
            for _, future in forgotten:
                _resolve(future)

    async def exists(self, request_id: str) -> bool:
        return bool(await self.client.exists(self._k(request_id, "m")))

    async def readers_left(self, request_id: str) -> float:
        """Seconds readers on other replicas still keep this request alive (0: none)."""
        ms = await self.client.pttl(self._k(request_id, "r"))
        return max(int(ms), 0) / 1000

    async def forget(self, request_id: str) -> None:
        """Delete a finished request's log (with the next flush)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._forgotten.append((request_id, future))
        self._poke()
        await future

    def view(self, request_id: str) -> RemoteLog:
        return RemoteLog(self, request_id)

    async def close(self) -> None:
        if self._flusher is not None:
            if self._pending:
                with contextlib.suppress(Exception):
                    await self._flush()
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.client.aclose()


# One round of the mirror, every log's changes, as one script with one
# argument: a msgpack array (bytes as msgpack's raw strings, which Redis's
# cmsgpack reads) of the key prefix, the TTL, the heartbeat's ms, then per
# entry its request id (its keys are the prefix, the id and m, e, a or r),
# its flags, its number of events, and (in this order, as the flags say)
# status, headers and sse, first, the events, the body. The events are one
# string, joined: each is one SSE event, ending at its only blank line
# (``take_event``, ``split_events``), so the script cuts them there. (The
# keys are not given as KEYS: a Redis Cluster cannot run it.)
_HEAD, _FIRST, _BEAT, _DONE, _EVENTS_TTL, _DELETE = 1, 2, 4, 8, 16, 32
_FLUSH = """
local argv = cmsgpack.unpack(ARGV[1])
local prefix, ttl, alive = argv[1], argv[2], argv[3]
local a = 4
while a <= #argv do
  local base = prefix .. argv[a] .. ':'
  local flags, n = argv[a + 1], argv[a + 2]
  local m, e = base .. 'm', base .. 'e'
  a = a + 3
  if bit.band(flags, 32) ~= 0 then
    redis.call('DEL', m, e, base .. 'a', base .. 'r')
  end
  if bit.band(flags, 1) ~= 0 then
    redis.call('HSET', m, 'status', argv[a], 'headers', argv[a + 1], 'sse', argv[a + 2])
    redis.call('EXPIRE', m, ttl)
    a = a + 3
  end
  if bit.band(flags, 2) ~= 0 then
    redis.call('HSET', m, 'first', argv[a])
    a = a + 1
  end
  if n > 0 then
    local blob, at, batch, cut = argv[a], 1, {}, 0
    a = a + 1
    while at <= #blob do
      local blank = string.find(blob, '\\n\\n', at, true)
      if not blank then
        return redis.error_reply('a mirrored event without its blank line')
      end
      batch[#batch + 1] = string.sub(blob, at, blank + 1)
      at = blank + 2
      if #batch == 1000 then
        redis.call('RPUSH', e, unpack(batch))
        cut, batch = cut + 1000, {}
      end
    end
    if #batch > 0 then
      redis.call('RPUSH', e, unpack(batch))
    end
    if cut + #batch ~= n then
      return redis.error_reply('mirrored events miscounted')
    end
  end
  if bit.band(flags, 16) ~= 0 then
    redis.call('EXPIRE', e, ttl)
  end
  if bit.band(flags, 4) ~= 0 then
    redis.call('SET', base .. 'a', '1', 'PX', alive)
  end
  if bit.band(flags, 8) ~= 0 then
    redis.call('HSET', m, 'done', '1', 'body', argv[a])
    a = a + 1
  end
end
return 1
"""


class _Mirror:
    """What of one log is in Redis already."""

    __slots__ = ("beat", "dirty", "events_ttl", "finished", "head", "logs", "rlog", "sent")

    def __init__(self, logs: RedisLogs, rlog: RequestLog, finished: asyncio.Future[None]) -> None:
        self.logs = logs
        self.rlog = rlog
        self.finished = finished
        self.sent = 0  # the number of the next event to mirror
        self.head = False
        self.beat = 0.0
        self.dirty = False
        self.events_ttl = False

    def changed(self, _rlog: RequestLog) -> None:
        if not self.dirty:
            self.dirty = True
            self.logs._poke()

    def write(self, logs: RedisLogs, args: list[Any], now: float) -> bool:
        """Add what changed to the round's script call (see ``_FLUSH``); True once
        the log's end is in it."""
        rlog = self.rlog
        self.dirty = False
        done = rlog.done
        at = len(args) + 1
        args.extend((rlog.request_id, 0, 0))
        flags = 0
        if rlog.status is not None and not self.head:
            headers = orjson.dumps([[k.decode(), v.decode()] for k, v in rlog.headers])
            args.extend((rlog.status, headers, int(rlog.sse)))
            flags |= _HEAD
            self.head = True
        count = 0
        if rlog.end > self.sent:
            if self.sent < rlog.first:  # trimmed before it was mirrored
                args.append(rlog.first)
                flags |= _FIRST
                self.sent = rlog.first
            events = rlog.events[self.sent - rlog.first :]
            # One argument (the script splits it at each event's blank line):
            # redis-py packs each argument in Python, ~1 µs apiece.
            args.append(b"".join(events))
            count = len(events)
            if not self.events_ttl:  # set once: RPUSH keeps a list's TTL
                flags |= _EVENTS_TTL
                self.events_ttl = True
            self.sent = rlog.end
        if not done and now - self.beat >= logs.HEARTBEAT:
            flags |= _BEAT
            self.beat = now
        if done:
            args.append(rlog.body_bytes)
            flags |= _DONE
        args[at] = flags
        args[at + 1] = count
        return done


class RemoteLog:
    """A log mirrored in Redis by another replica, read by polling."""

    POLL = 0.025

    def __init__(self, logs: RedisLogs, request_id: str) -> None:
        self.logs = logs
        self.request_id = request_id
        self._presence: asyncio.Task[None] | None = None
        self._k = logs._k
        self._dead_since: float | None = None
        self._first = 0  # the number of the first event of the list in Redis

    def attach(self) -> None:
        self._presence = asyncio.create_task(self._present())

    def detach(self) -> None:
        if self._presence is not None:
            self._presence.cancel()
            self._presence = None
        if self.logs.grace > 0:
            # Gone from here: the producer waits the grace period from now.
            asyncio.get_running_loop().create_task(self._leave())

    async def _present(self) -> None:
        key = self._k(self.request_id, "r")
        with contextlib.suppress(Exception):
            while True:
                await self.logs.client.set(key, 1, px=RedisLogs.ALIVE_MS)
                await asyncio.sleep(RedisLogs.HEARTBEAT)

    async def _leave(self) -> None:
        with contextlib.suppress(Exception):
            await self.logs.client.set(
                self._k(self.request_id, "r"), 1, px=max(int(self.logs.grace * 1000), 1)
            )

    async def _meta(self) -> dict[bytes, bytes]:
        meta: dict[bytes, bytes] = await self.logs.client.hgetall(self._k(self.request_id, "m"))
        if not meta:
            raise LogGone(self.request_id)
        return meta

    async def head(self) -> tuple[int, Headers, bool]:
        while True:
            meta = await self._meta()
            if b"status" in meta:
                headers = [(k.encode(), v.encode()) for k, v in orjson.loads(meta[b"headers"])]
                return int(meta[b"status"]), headers, meta.get(b"sse") == b"1"
            await self._check_alive(meta)
            await asyncio.sleep(self.POLL)

    async def read(self, start: int, timeout: float) -> tuple[list[bytes], bool]:
        deadline = time.monotonic() + timeout
        rid = self.request_id
        while True:
            # One snapshot (MULTI): the list as it was when ``done`` was read (the
            # keys may be deleted the moment the result is in the database), only
            # the events from ``start`` on, and the producer's heartbeat.
            pipe = self.logs.client.pipeline(transaction=True)
            pipe.hmget(self._k(rid, "m"), "status", "first", "done")
            pipe.lrange(self._k(rid, "e"), max(start - self._first, 0), -1)
            pipe.exists(self._k(rid, "a"))
            (status, first, done), events, alive = await pipe.execute()
            if status is None:
                raise LogGone(rid)
            first = int(first or 0)
            if first != self._first:  # the list starts later than assumed: again
                self._first = first
                continue
            if start < first:
                raise Truncated(f"events before {first} are no longer held")
            if events or done == b"1":
                return events, done == b"1"
            self._alive(bool(alive))
            if time.monotonic() >= deadline:
                return [], False
            await asyncio.sleep(self.POLL)

    async def body(self) -> bytes:
        while True:
            meta = await self._meta()
            if meta.get(b"done") == b"1":
                return meta.get(b"body", b"")
            await self._check_alive(meta)
            await asyncio.sleep(self.POLL)

    async def _check_alive(self, meta: dict[bytes, bytes]) -> None:
        self._alive(bool(await self.logs.client.exists(self._k(self.request_id, "a"))))

    def _alive(self, alive: bool) -> None:
        """ProducerGone once the producer's heartbeat has been missing for a while."""
        if alive:
            self._dead_since = None
            return
        now = time.monotonic()
        if self._dead_since is None:
            self._dead_since = now
        elif now - self._dead_since > RedisLogs.ALIVE_MS / 1000:
            raise ProducerGone(self.request_id)
