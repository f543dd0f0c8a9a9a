"""``Idempotency-Key`` on ``POST /v1/chat/completions`` and ``/v1/responses``: generate
once, answer every retry.

    Idempotency-Key: <1-255 printable ASCII>     else 400 (param "Idempotency-Key")
    Last-Event-ID: <N>                           resume a stream after event N

The key is scoped to the API key and remembered ``idempotency.ttl_seconds``.
The first request with a key claims it (``billing.idempotency``) and
generates into a request log (``server.requestlog``); every request with the
same key and the same body (by a canonical fingerprint) reads that log: from
the start, or after ``Last-Event-ID``; live while it runs, replayed from the
database once it finished. Those answers carry ``Idempotent-Replayed: true``
and are counted on the one ledger row (``replays``, ``attachments``). The same
key with another body is a 422; a key in use where its log cannot be read
(another replica, no Redis) a 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp

from tokenwell.billing.accounting import new_request_id
from tokenwell.billing.claims import Claim, ClaimEnd, KeyClaimed, pack
from tokenwell.billing.idempotency import IdempotencyStore, Record
from tokenwell.billing.keys import KeyRecord
from tokenwell.billing.ledger import Ledger
from tokenwell.config import IdempotencyConfig
from tokenwell.errors import APIError, InvalidRequest
from tokenwell.server.requestlog import LogReader, LogView, Producer, RedisLogs, RequestLog

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255

# Generate the response for a key: (request_id, idempotency_key, claim) → the
# response (a GenerationResponse), admitted and billed to that request id. With
# a claim, the admission claims the key (KeyClaimed: another request holds it).
Generate = Callable[[str, str, Claim | None], Awaitable[ASGIApp]]


class IdempotencyKeyReused(InvalidRequest):
    status = 422
    code = "idempotency_key_reused"


class IdempotencyKeyInUse(APIError):
    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_in_use"


def _printable(value: str) -> bool:
    """Printable ASCII (space to ``~``), in two C calls: every keyed request asks."""
    return value.isascii() and value.isprintable()


def parse_idempotency_key(headers: Headers) -> str | None:
    """The request's ``Idempotency-Key`` (None without one); 400 when malformed."""
    values = headers.getlist("idempotency-key")
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(
            f"Invalid '{HEADER}' header: sent {len(values)} times; send it once.",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    value = values[0]
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not _printable(value):
        raise InvalidRequest(
            f"Invalid '{HEADER}' header: expected 1 to {MAX_KEY_LENGTH} printable ASCII "
            f"characters, got {len(value)} character(s)"
            + ("" if _printable(value) else " including non-printable ones")
            + ".",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    return value


def parse_last_event_id(headers: Headers) -> int | None:
    value = headers.get("last-event-id")
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise InvalidRequest(
            f"Invalid 'Last-Event-ID' header: expected the number of an event, got {value!r}.",
            param="Last-Event-ID",
            code="invalid_last_event_id",
        )
    return int(value)


def parse_resume_headers(headers: Headers) -> tuple[str | None, int | None]:
    """``Idempotency-Key`` and ``Last-Event-ID``; a resume needs the key it resumes."""
    idempotency_key = parse_idempotency_key(headers)
    last_event_id = parse_last_event_id(headers)
    if last_event_id is not None and idempotency_key is None:
        raise InvalidRequest(
            "'Last-Event-ID' resumes a request made with an 'Idempotency-Key': send the same key.",
            param="Last-Event-ID",
            code="missing_idempotency_key",
        )
    return idempotency_key, last_event_id


def _canonical(value: Any) -> Any:
    """JSON values whose equal meanings have one form: 1.0 is 1."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


# A JSON number with a fraction or an exponent has a digit before its "." or "e";
# a body without one holds no float (one with one may: in a string, say).
_MAY_HOLD_FLOAT = re.compile(rb"[0-9][.eE]")


def fingerprint(body: bytes, route: str = "chat.completions") -> str:
    """sha256 of the body as canonical JSON (keys sorted, compact, 1.0 as 1)."""
    data = orjson.loads(body)
    if _MAY_HOLD_FLOAT.search(body) is not None:
        data = _canonical(data)
    canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(route.encode() + b"\n" + canonical).hexdigest()


class IdempotencyService:
    WAIT_FOR_PRODUCER = 10.0  # seconds a duplicate waits for the first to be admitted
    PURGE_INTERVAL = 600.0

    def __init__(
        self,
        store: IdempotencyStore,
        settings: IdempotencyConfig,
        instance: str,
        keepalive: float,
        redis_url: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.instance = instance
        self.keepalive = keepalive
        self.remote = (
            RedisLogs(redis_url, settings.ttl_seconds, settings.grace_seconds)
            if redis_url
            else None
        )
        # This process's requests in flight, by request id, and the keys whose
        # first request is being admitted here right now.
        self.logs: dict[str, RequestLog] = {}
        self._claiming: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._producers: set[asyncio.Task[None]] = set()
        self._purger: asyncio.Task[None] | None = None
        # With metering on, claims ride on the ledger's opens and their ends on
        # its closes (billing.claims); without, each is a transaction of its own.
        self.ledger: Ledger | None = None

    def use_ledger(self, ledger: Ledger | None) -> None:
        self.ledger = ledger

    async def start(self) -> None:
        released = await self.store.release_instance(self.instance)
        if released:
            log.warning("released %d idempotency key(s) left running by a crash", released)
        self._purger = asyncio.create_task(self._purge(), name="idempotency-purge")

    async def stop(self, timeout: float = 15) -> None:
        if self._purger is not None:
            self._purger.cancel()
        if self._producers:
            await asyncio.wait(list(self._producers), timeout=timeout)
        if self.remote is not None:
            await self.remote.close()
        self.store.close()

    def stats(self) -> dict[str, int]:
        return {
            "logs": len(self.logs),
            "log_bytes": sum(rl.size + len(rl.body_bytes) for rl in self.logs.values()),
        }

    async def _purge(self) -> None:
        while True:
            try:
                await self.store.purge()
            except Exception:
                log.warning("purging expired idempotency keys failed", exc_info=True)
            await asyncio.sleep(self.PURGE_INTERVAL)

    # ------------------------------------------------------------------ respond

    async def respond(
        self,
        key: KeyRecord,
        idempotency_key: str,
        body: bytes,
        stream: bool,
        last_event_id: int | None,
        generate: Generate,
        *,
        route: str = "chat.completions",
        reader: type[LogReader] = LogReader,
    ) -> ASGIApp:
        """The answer to a keyed request of ``route`` (``fingerprint``'s route: one
        key used on two APIs is two bodies): generated once, each connection a
        ``reader`` of its log (the wire API's own reader: how a stream that cannot
        go on ends)."""
        fp = fingerprint(body, route)
        scope = (key.id, idempotency_key)
        deadline = time.monotonic() + self.WAIT_FOR_PRODUCER
        loop = asyncio.get_running_loop()
        while True:
            claiming = self._claiming.get(scope)
            if claiming is not None:  # its first request is being admitted here
                await asyncio.shield(claiming)
                continue
            record = None
            if self.ledger is not None:
                # Held already? (A read: the claim itself is written with the open.)
                record = await self.store.get(key.id, idempotency_key)
                if record is None and scope in self._claiming:
                    continue  # another request here started to claim it meanwhile
            if record is None:
                request_id = new_request_id()
                self._claiming[scope] = marker = loop.create_future()
                try:
                    claim = None
                    if self.ledger is None:
                        record = await self.store.claim(
                            key.id, idempotency_key, fp, request_id, stream, self.instance
                        )
                    else:
                        claim = Claim(idempotency_key, fp, stream, self.store.ttl)
                    if record is None:
                        return await self._generate(
                            scope, request_id, stream, last_event_id, generate, claim, reader
                        )
                except KeyClaimed:
                    pass  # another request (on another replica) claimed it first
                finally:
                    del self._claiming[scope]
                    marker.set_result(None)
                if record is None:
                    continue  # read who holds it
            if record.fingerprint != fp:
                raise IdempotencyKeyReused(
                    f"This '{HEADER}' was already used with a different request body; "
                    "use a new key for a new request.",
                    param=HEADER,
                )
            app = await self._existing(record, last_event_id, reader)
            if app is not None:
                return app
            if time.monotonic() > deadline:
                raise IdempotencyKeyInUse(
                    f"A request with this '{HEADER}' is still running on another server, "
                    "and its events cannot be read from this one. Retry shortly.",
                    param=HEADER,
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(0.05)

    async def _generate(
        self,
        scope: tuple[str, str],
        request_id: str,
        stream: bool,
        last_event_id: int | None,
        generate: Generate,
        claim: Claim | None,
        reader: type[LogReader],
    ) -> ASGIApp:
        try:
            response = await generate(request_id, scope[1], claim)
        except KeyClaimed:
            raise  # nothing was claimed
        except BaseException:
            # Not admitted (or not started): a retry may generate.
            await asyncio.shield(self._end(ClaimEnd(scope[0], scope[1], request_id)))
            raise
        rlog = RequestLog(request_id, stream, self.settings.max_log_bytes)
        self.logs[request_id] = rlog
        producer = Producer(
            rlog,
            response,
            self.settings.grace_seconds,
            on_done=partial(self._done, scope),
            remote=self.remote,
        )
        task = producer.start()
        self._producers.add(task)
        task.add_done_callback(self._producers.discard)
        return reader(rlog, after=last_event_id, replayed=False, keepalive=self.keepalive)

    async def _done(self, scope: tuple[str, str], rlog: RequestLog) -> None:
        """Keep a finished response for replay (or release the key), then free the log."""
        try:
            end = ClaimEnd(scope[0], scope[1], rlog.request_id)
            if rlog.complete and rlog.status == 200:
                body = (
                    None
                    if rlog.truncated
                    else (b"".join(rlog.events) if rlog.sse else rlog.body_bytes)
                )
                end.status_code, end.content_type, end.body = 200, rlog.content_type, pack(body)
            # Else an error, or abandoned by its client: nothing whole was answered,
            # so the key is released and a retry generates anew.
            await self._end(end)
        finally:
            self.logs.pop(rlog.request_id, None)
            if self.remote is not None:
                with contextlib.suppress(Exception):
                    await self.remote.forget(rlog.request_id)

    async def _end(self, end: ClaimEnd) -> None:
        """Store the result (or release the key): with the ledger's closes if it runs."""
        if self.ledger is not None:
            await self.ledger.end_claim(end)
        elif end.release:
            await self.store.release(end.key_id, end.idempotency_key, end.request_id)
        else:
            assert end.status_code is not None and end.content_type is not None
            await self.store.finish(
                end.key_id,
                end.idempotency_key,
                end.request_id,
                end.status_code,
                end.content_type,
                end.body,
            )

    async def _existing(
        self, record: Record, last_event_id: int | None, reader: type[LogReader]
    ) -> ASGIApp | None:
        """A reader of the request that holds the key; None: not readable yet."""
        rid = record.request_id
        if record.done:
            view = self._stored(record)
            await self._count(rid, "replays")
            return reader(view, after=last_event_id, replayed=True, keepalive=self.keepalive)
        local = self.logs.get(rid)
        if local is not None:
            # Answered in full already (its result is being stored): a replay,
            # though read from memory; else the connection joins a live request.
            await self._count(rid, "replays" if local.complete else "attachments")
            return reader(local, after=last_event_id, replayed=True, keepalive=self.keepalive)
        if self.remote is not None and await self.remote.exists(rid):
            await self._count(rid, "attachments")
            return reader(
                self.remote.view(rid),
                after=last_event_id,
                replayed=True,
                keepalive=self.keepalive,
                reopen=partial(self._reopen, record),
            )
        if record.instance != self.instance and self.remote is None:
            raise IdempotencyKeyInUse(
                f"A request with this '{HEADER}' is running on another server "
                f"({record.instance}); without Redis its events can only be read there.",
                param=HEADER,
                headers={"Retry-After": "1"},
            )
        return None  # finishing here, or being admitted elsewhere: look again

    def _stored(self, record: Record) -> RequestLog:
        if record.body is None:
            raise IdempotencyKeyInUse(
                f"The response for this '{HEADER}' was too large to keep "
                "(idempotency.max_log_bytes) and cannot be replayed.",
                param=HEADER,
                code="idempotency_result_unavailable",
            )
        return RequestLog.completed(
            record.request_id,
            record.stream,
            record.status_code or 200,
            record.content_type or "application/json",
            record.body,
        )

    async def _reopen(self, record: Record) -> LogView | None:
        """The Redis log went away under a reader: the request finished, read its result."""
        for _ in range(100):
            found = await self.store.get(record.key_id, record.idempotency_key)
            if found is None or found.request_id != record.request_id:
                return None
            if found.done:
                return self._stored(found) if found.body is not None else None
            await asyncio.sleep(0.05)
        return None

    async def _count(self, request_id: str, what: str) -> None:
        try:
            await self.store.count(request_id, what)
        except Exception:
            log.warning("counting a %s of %s failed", what, request_id, exc_info=True)
