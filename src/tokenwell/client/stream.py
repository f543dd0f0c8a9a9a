"""A streaming chat client that never loses a token.

    from tokenwell.client import Client

    with Client("http://127.0.0.1:8000/v1", api_key="tw-…") as client:
        stream = client.stream(model="…", messages=[{"role": "user", "content": "Hi"}])
        for chunk in stream:
            ...                           # chat.completion.chunk dicts
        stream.result()                   # the whole chat.completion, usage included

Each stream asks for ``include_usage`` (unless told otherwise), carries an
``Idempotency-Key`` and, through ``ResumingTransport``, reconnects with
``Last-Event-ID`` when its connection drops, so the caller sees one
uninterrupted stream. Where resuming is impossible the stream stops with what
arrived: ``stream.complete`` is False and ``stream.error`` says why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from tokenwell.client.accumulate import ChatAccumulator
from tokenwell.client.transport import ResumingTransport, new_key, split_event


class ChatError(Exception):
    """The server refused the request (an HTTP error before the stream began)."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {error.get('message', body)}")
        self.status = status
        self.body = body
        self.code = error.get("code")
        self.param = error.get("param")


class ChatStream:
    def __init__(self, http: httpx.Client, body: dict[str, Any], headers: dict[str, str]) -> None:
        self._http = http
        self._body = body
        self.headers = headers
        self.idempotency_key = headers["Idempotency-Key"]
        self.accumulator = ChatAccumulator()
        self.complete = False  # [DONE] arrived after every choice finished
        self.error: str | None = None
        self.request_id: str | None = None
        self.replayed = False
        self._consumed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._consumed:
            raise RuntimeError("a ChatStream can be iterated once")
        self._consumed = True
        with self._http.stream(
            "POST", "chat/completions", json=self._body, headers=self.headers
        ) as response:
            self.request_id = response.headers.get("x-request-id")
            self.replayed = response.headers.get("idempotent-replayed") == "true"
            if response.status_code != 200:
                response.read()
                try:
                    payload: Any = response.json()
                except ValueError:
                    payload = response.text
                raise ChatError(response.status_code, payload)
            buffer = b""
            for raw in response.iter_bytes():
                buffer += raw
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    _, data = split_event(block)
                    if data is None:
                        continue
                    if data == b"[DONE]":
                        self.complete = self.accumulator.finished and self.error is None
                        return
                    chunk = json.loads(data)
                    if "error" in chunk and "choices" not in chunk:
                        self.error = chunk["error"].get("message") or str(chunk["error"])
                        continue
                    self.accumulator.add(chunk)
                    yield chunk
        self.error = self.error or "The stream ended without [DONE]."

    def result(self) -> dict[str, Any]:
        """The chat.completion the stream made up (drains it first if need be)."""
        if not self._consumed:
            for _ in self:
                pass
        return self.accumulator.result()

    def text(self, index: int = 0) -> str:
        return self.accumulator.text(index)


class Client:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 600,
        max_attempts: int = 20,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.transport = ResumingTransport(transport, max_attempts=max_attempts)
        self.http = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=self.transport,
        )

    def stream(
        self,
        *,
        idempotency_key: str | None = None,
        include_usage: bool = True,
        **body: Any,
    ) -> ChatStream:
        body["stream"] = True
        options = dict(body.get("stream_options") or {})
        options.setdefault("include_usage", include_usage)
        body["stream_options"] = options
        headers = {"Idempotency-Key": idempotency_key or new_key()}
        return ChatStream(self.http, body, headers)

    def complete(self, **body: Any) -> dict[str, Any]:
        """Stream a completion to its end and return the whole of it."""
        stream = self.stream(**body)
        result = stream.result()
        if not stream.complete:
            result["error"] = stream.error
        return result

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
