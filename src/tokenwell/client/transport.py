"""``httpx`` transports that make chat completions and responses safe to retry and resume.

For the official SDK, one line changes::

    client = openai.OpenAI(
        base_url="http://127.0.0.1:8000/v1",
        api_key="tw-…",
        http_client=httpx.Client(transport=ResumingTransport()),
    )
    client = openai.AsyncOpenAI(
        ...,
        http_client=httpx.AsyncClient(transport=AsyncResumingTransport()),
    )

Every ``POST …/chat/completions`` and ``POST …/responses`` gets an
``Idempotency-Key`` (unless it has one). A request whose connection fails
before the response, or (not streaming) while its body is read, is sent again
with the same key: the server never generates twice, and answers a retry with
the stored result. A stream whose connection drops is resumed with
``Last-Event-ID``: the caller reads one uninterrupted stream, handed on in
whole events only, so no event is lost, cut or repeated. Where resuming is
impossible (the server kept no log, too many failures) the stream ends with an
error event (``code``: ``resume_failed``): for chat, an error chunk and
``[DONE]`` (the SDK raises ``openai.APIError`` after the chunks that did
arrive); for the Responses API, its ``error`` event, as OpenAI ends a failed
stream.

The decisions (retry or not, where a stream stands, when to give up) are one
I/O-free state machine, ``_Resume``; the sync and async transports only move
bytes, as httpx's own sync/async twins do.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx

_RETRY_STATUS = {409, 502, 503, 504}
_NETWORK = (httpx.TransportError,)


def new_key() -> str:
    return f"twc-{uuid.uuid4().hex}"


def _api(request: httpx.Request) -> str | None:
    """The resumable API a request is for: chat completions, the Responses API, or none."""
    if request.method != "POST":
        return None
    path = request.url.path
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/responses"):
        return "responses"
    return None


# A Responses stream's last event (it has no [DONE]).
_RESPONSES_ENDS = {b"response.completed", b"response.incomplete", b"response.failed", b"error"}


def _retry_after(response: httpx.Response, default: float) -> float:
    value = response.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 10.0)
    except ValueError:
        return default


def error_event(message: str, code: str = "resume_failed") -> bytes:
    body = {"error": {"message": message, "type": "client_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _end(api: str, message: str, sequence_number: int) -> bytes:
    """How a stream this transport cannot resume ends: chat's error chunk and
    [DONE], or the Responses API's ``error`` event (as OpenAI ends a failed stream)."""
    if api == "chat":
        return error_event(message) + b"data: [DONE]\n\n"
    body = {
        "type": "error",
        "code": "resume_failed",
        "message": message,
        "param": None,
        "sequence_number": sequence_number,
    }
    return b"event: error\ndata: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _delay(backoff: float, max_backoff: float, attempt: int) -> float:
    return min(backoff * 2 ** min(attempt, 10), max_backoff)


def _again(request: httpx.Request, last_event_id: int | None) -> httpx.Request:
    """The request once more, with the same key: a retry, or a resume after an event."""
    headers = httpx.Headers(request.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    else:
        headers.pop("Last-Event-ID", None)
    return httpx.Request(
        request.method,
        request.url,
        headers=headers,
        content=request.content,
        extensions=request.extensions,
    )


def _prepare(request: httpx.Request) -> None:
    if "idempotency-key" not in request.headers:
        request.headers["Idempotency-Key"] = new_key()


def _is_stream(response: httpx.Response) -> bool:
    content_type = response.headers.get("content-type", "")
    return response.status_code == 200 and content_type.startswith("text/event-stream")


def _whole(request: httpx.Request, response: httpx.Response, content: bytes) -> httpx.Response:
    return httpx.Response(
        response.status_code,
        headers=[h for h in response.headers.multi_items() if h[0] != "content-length"],
        content=content,
        request=request,
        extensions=response.extensions,
    )


def _streamed(
    request: httpx.Request,
    response: httpx.Response,
    stream: httpx.SyncByteStream | httpx.AsyncByteStream,
) -> httpx.Response:
    return httpx.Response(
        200,
        headers=response.headers,
        stream=stream,
        request=request,
        extensions=response.extensions,
    )


class _Resume:
    """Where one stream stands across its connections, with no I/O: whole events to
    hand on, the last event id, and what to do when a connection ends early."""

    def __init__(self, max_attempts: int, api: str) -> None:
        self.max_attempts = max_attempts
        self.api = api
        self.last_id: int | None = None
        self.unnumbered = False  # an event came without an id: resuming is impossible
        self.failures = 0
        self.ended = False  # [DONE] was handed on
        self._buffer = b""

    def connected(self) -> None:
        self._buffer = b""  # a partial event of a lost connection is never handed on

    def feed(self, raw: bytes) -> bytes:
        """Bytes of the connection → the whole events among them, to hand on."""
        self._buffer += raw.replace(b"\r\n", b"\n")
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        out = []
        for block in blocks:
            event_id, data = split_event(block)
            if event_id is not None:
                self.last_id = event_id
            elif data is not None:
                self.unnumbered = True
            if data == b"[DONE]" or (
                self.api == "responses" and _event_name(block) in _RESPONSES_ENDS
            ):
                self.ended = True
            out.append(block + b"\n\n")
        if out:
            self.failures = 0
        return b"".join(out)

    def refused(self, status: int, body: bytes) -> bytes | None:
        """A resume answered ``status``: None to try again, else the stream's end."""
        if status in _RETRY_STATUS:
            return None
        message = f"The stream could not be resumed: HTTP {status} "
        return _end(self.api, message + body[:300].decode(errors="replace"), self._next())

    def _next(self) -> int:
        return 0 if self.last_id is None else self.last_id + 1

    def lost(self) -> bytes | None:
        """The connection ended before the stream's end: None to resume after the last
        whole event, else how the stream ends (``_end``: an error event)."""
        self.failures += 1
        if self.unnumbered:
            return _end(
                self.api,
                "The stream ended early and cannot be resumed: the server numbers no "
                "events (is it tokenwell, and did the request carry an Idempotency-Key?).",
                self._next(),
            )
        if self.failures >= self.max_attempts:
            return _end(
                self.api,
                f"The stream could not be resumed after {self.failures} attempts.",
                self._next(),
            )
        return None


class ResumingTransport(httpx.BaseTransport):
    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        max_attempts: int = 20,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.inner = transport or httpx.HTTPTransport()
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.resumes = 0  # connections resumed or retried, for the curious

    def close(self) -> None:
        self.inner.close()

    def _pause(self, attempt: int) -> None:
        time.sleep(_delay(self.backoff, self.max_backoff, attempt))

    def send(self, request: httpx.Request, last_event_id: int | None) -> httpx.Response:
        return self.inner.handle_request(_again(request, last_event_id))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        api = _api(request)
        if api is None:
            return self.inner.handle_request(request)
        _prepare(request)
        request.read()
        attempt = 0
        while True:
            try:
                response = self.send(request, None)
            except _NETWORK:
                attempt += 1
                if attempt >= self.max_attempts:
                    raise
                self.resumes += 1
                self._pause(attempt)
                continue
            if response.status_code in _RETRY_STATUS and attempt + 1 < self.max_attempts:
                response.read()
                response.close()
                attempt += 1
                self.resumes += 1
                time.sleep(_retry_after(response, self.backoff))
                continue
            break
        if not _is_stream(response):
            try:
                content = response.read()
            except _NETWORK:
                response.close()
                # The body was lost on the way: the same key answers with the stored result.
                self.resumes += 1
                return self.handle_request(request)
            response.close()
            return _whole(request, response, content)
        return _streamed(request, response, _ResumingStream(self, request, response, api))


class AsyncResumingTransport(httpx.AsyncBaseTransport):
    """``ResumingTransport`` for ``httpx.AsyncClient`` (``openai.AsyncOpenAI``, the
    OpenAI Agents SDK): the same retries and resumes, awaiting instead of blocking."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        max_attempts: int = 20,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.inner = transport or httpx.AsyncHTTPTransport()
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.resumes = 0

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def _pause(self, attempt: int) -> None:
        await asyncio.sleep(_delay(self.backoff, self.max_backoff, attempt))

    async def send(self, request: httpx.Request, last_event_id: int | None) -> httpx.Response:
        return await self.inner.handle_async_request(_again(request, last_event_id))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        api = _api(request)
        if api is None:
            return await self.inner.handle_async_request(request)
        _prepare(request)
        await request.aread()
        attempt = 0
        while True:
            try:
                response = await self.send(request, None)
            except _NETWORK:
                attempt += 1
                if attempt >= self.max_attempts:
                    raise
                self.resumes += 1
                await self._pause(attempt)
                continue
            if response.status_code in _RETRY_STATUS and attempt + 1 < self.max_attempts:
                await response.aread()
                await response.aclose()
                attempt += 1
                self.resumes += 1
                await asyncio.sleep(_retry_after(response, self.backoff))
                continue
            break
        if not _is_stream(response):
            try:
                content = await response.aread()
            except _NETWORK:
                await response.aclose()
                self.resumes += 1
                return await self.handle_async_request(request)
            await response.aclose()
            return _whole(request, response, content)
        return _streamed(request, response, _AsyncResumingStream(self, request, response, api))


def _event_name(block: bytes) -> bytes | None:
    for line in block.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip()
    return None


def split_event(block: bytes) -> tuple[int | None, bytes | None]:
    """One SSE event's id (None if none) and data (None if a comment only)."""
    event_id: int | None = None
    data: list[bytes] = []
    for line in block.splitlines():
        if line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"id" and value.isdigit():
            event_id = int(value)
        elif name == b"data":
            data.append(value)
    return event_id, b"\n".join(data) if data else None


class _ResumingStream(httpx.SyncByteStream):
    """The response's bytes, whole events at a time, resumed across connections."""

    def __init__(
        self,
        transport: ResumingTransport,
        request: httpx.Request,
        first: httpx.Response,
        api: str,
    ) -> None:
        self.transport = transport
        self.request = request
        self.response: httpx.Response | None = first
        self.state = _Resume(transport.max_attempts, api)

    def __iter__(self) -> Iterator[bytes]:
        state = self.state
        while True:
            response = self.response
            state.connected()
            try:
                if response is None:
                    response = self.response = self.transport.send(self.request, state.last_id)
                    if response.status_code != 200:
                        body = response.read()
                        end = state.refused(response.status_code, body)
                        if end is not None:
                            yield end
                            return
                        raise httpx.ReadError(f"resume answered {response.status_code}")
                for raw in response.iter_raw():
                    out = state.feed(raw)
                    if out:
                        yield out
                    if state.ended:
                        return
            except _NETWORK:
                pass
            finally:
                if response is not None:
                    response.close()
                self.response = None
            end = state.lost()
            if end is not None:
                yield end
                return
            self.transport.resumes += 1
            self.transport._pause(state.failures - 1)

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None


class _AsyncResumingStream(httpx.AsyncByteStream):
    """``_ResumingStream`` for the async transport."""

    def __init__(
        self,
        transport: AsyncResumingTransport,
        request: httpx.Request,
        first: httpx.Response,
        api: str,
    ) -> None:
        self.transport = transport
        self.request = request
        self.response: httpx.Response | None = first
        self.state = _Resume(transport.max_attempts, api)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        state = self.state
        while True:
            response = self.response
            state.connected()
            try:
                if response is None:
                    response = self.response = await self.transport.send(
                        self.request, state.last_id
                    )
                    if response.status_code != 200:
                        body = await response.aread()
                        end = state.refused(response.status_code, body)
                        if end is not None:
                            yield end
                            return
                        raise httpx.ReadError(f"resume answered {response.status_code}")
                async for raw in response.aiter_raw():
                    out = state.feed(raw)
                    if out:
                        yield out
                    if state.ended:
                        return
            except _NETWORK:
                pass
            finally:
                if response is not None:
                    await response.aclose()
                self.response = None
            end = state.lost()
            if end is not None:
                yield end
                return
            self.transport.resumes += 1
            await self.transport._pause(state.failures - 1)

    async def aclose(self) -> None:
        if self.response is not None:
            await self.response.aclose()
            self.response = None
