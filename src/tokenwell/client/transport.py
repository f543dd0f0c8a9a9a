"""An ``httpx`` transport that makes chat completions safe to retry and resume.

For the official SDK, one line changes::

    client = openai.OpenAI(
        base_url="http://127.0.0.1:8000/v1",
        api_key="tw-…",
        http_client=httpx.Client(transport=ResumingTransport()),
    )

Every ``POST …/chat/completions`` gets an ``Idempotency-Key`` (unless it has
one). A request whose connection fails before the response, or (not
streaming) while its body is read, is sent again with the same key: the
server never generates twice, and answers a retry with the stored result. A
stream whose connection drops is resumed with ``Last-Event-ID``: the caller
reads one uninterrupted stream, handed on in whole events only, so no event
is lost, cut or repeated. Where resuming is impossible (the server kept no
log, too many failures) the stream ends with an error event (``code``:
``resume_failed``) and ``[DONE]``: the SDK raises ``openai.APIError`` after
the chunks that did arrive.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import httpx

_RETRY_STATUS = {409, 502, 503, 504}
_NETWORK = (httpx.TransportError,)


def new_key() -> str:
    return f"twc-{uuid.uuid4().hex}"


def _is_chat(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith("/chat/completions")


def _retry_after(response: httpx.Response, default: float) -> float:
    value = response.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 10.0)
    except ValueError:
        return default


def error_event(message: str, code: str = "resume_failed") -> bytes:
    body = {"error": {"message": message, "type": "client_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


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
        time.sleep(min(self.backoff * 2 ** min(attempt, 10), self.max_backoff))

    def send(self, request: httpx.Request, last_event_id: int | None) -> httpx.Response:
        """Send (again) with the same key: a retry, or a resume after ``last_event_id``."""
        headers = httpx.Headers(request.headers)
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        else:
            headers.pop("Last-Event-ID", None)
        again = httpx.Request(
            request.method,
            request.url,
            headers=headers,
            content=request.content,
            extensions=request.extensions,
        )
        return self.inner.handle_request(again)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not _is_chat(request):
            return self.inner.handle_request(request)
        if "idempotency-key" not in request.headers:
            request.headers["Idempotency-Key"] = new_key()
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
        content_type = response.headers.get("content-type", "")
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):
            try:
                content = response.read()
            except _NETWORK:
                response.close()
                # The body was lost on the way: the same key answers with the stored result.
                self.resumes += 1
                return self.handle_request(request)
            response.close()
            return httpx.Response(
                response.status_code,
                headers=[h for h in response.headers.multi_items() if h[0] != "content-length"],
                content=content,
                request=request,
                extensions=response.extensions,
            )
        return httpx.Response(
            200,
            headers=response.headers,
            stream=_ResumingStream(self, request, response),
            request=request,
            extensions=response.extensions,
        )


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
        self, transport: ResumingTransport, request: httpx.Request, first: httpx.Response
    ) -> None:
        self.transport = transport
        self.request = request
        self.response: httpx.Response | None = first
        self.last_id: int | None = None
        self.unnumbered = False  # an event came without an id: resuming is impossible

    def __iter__(self) -> Iterator[bytes]:
        failures = 0
        while True:
            response = self.response
            ended = False
            buffer = b""
            try:
                if response is None:
                    response = self.response = self.transport.send(self.request, self.last_id)
                    if response.status_code != 200:
                        body = response.read()
                        response.close()
                        if response.status_code in _RETRY_STATUS:
                            raise httpx.ReadError(f"resume answered {response.status_code}")
                        yield (
                            error_event(
                                f"The stream could not be resumed: HTTP {response.status_code} "
                                f"{body[:300].decode(errors='replace')}"
                            )
                            + b"data: [DONE]\n\n"
                        )
                        return
                for raw in response.iter_raw():
                    buffer += raw.replace(b"\r\n", b"\n")
                    *blocks, buffer = buffer.split(b"\n\n")
                    out = []
                    for block in blocks:
                        event_id, data = split_event(block)
                        if event_id is not None:
                            self.last_id = event_id
                        elif data is not None:
                            self.unnumbered = True
                        if data == b"[DONE]":
                            ended = True
                        out.append(block + b"\n\n")
                    if out:
                        failures = 0
                        yield b"".join(out)
                    if ended:
                        return
            except _NETWORK:
                pass
            finally:
                if response is not None:
                    response.close()
                self.response = None
            # The connection ended before [DONE]: resume after the last whole event.
            failures += 1
            if self.unnumbered:
                yield (
                    error_event(
                        "The stream ended early and cannot be resumed: the server numbers no "
                        "events (is it tokenwell, and did the request carry an Idempotency-Key?)."
                    )
                    + b"data: [DONE]\n\n"
                )
                return
            if failures >= self.transport.max_attempts:
                yield (
                    error_event(f"The stream could not be resumed after {failures} attempts.")
                    + b"data: [DONE]\n\n"
                )
                return
            self.transport.resumes += 1
            self.transport._pause(failures - 1)

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None
