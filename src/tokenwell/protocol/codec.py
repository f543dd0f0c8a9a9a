"""What a wire API is to the server: a codec over the one engine event stream.

``server.generation.GenerationResponse`` runs a generation to the client and
settles it; everything it sends is made by the request's ``Codec``, so a new
wire API (chat completions, Responses, Anthropic Messages) is a codec in
``protocol/`` and a thin route, never edits to the server. Pure: no I/O.

A stream is::

    head(meter) · render(event)… · end(meter)        a normal end
    head(meter) · render(event)… · render(Failed) · after_failure()
    head(meter) · render(event)… · error(message, code)   cut short by the server

with ``keepalive`` bytes while nothing is ready. A non-streamed response
folds the events with ``add`` and answers ``body(meter)``. An error before
the first byte is an ordinary HTTP error with ``error_body(failure)``.
"""

from __future__ import annotations

from typing import Any, Protocol

from tokenwell.protocol import sse
from tokenwell.protocol.events import Event, Failed, Meter
from tokenwell.protocol.render import CompletionBuilder, Identity, StreamRenderer


class Codec(Protocol):
    """One response's encoder; made per request by the route's service."""

    media_type: bytes  # of a stream
    keepalive: bytes  # sent while nothing is ready

    @property
    def id(self) -> str: ...

    def head(self, meter: Meter) -> bytes:
        """What opens the stream, sent with its first bytes."""
        ...

    def render(self, event: Event) -> bytes: ...

    def end(self, meter: Meter) -> bytes:
        """What closes a stream whose every choice finished."""
        ...

    def after_failure(self) -> bytes:
        """What closes a stream after a rendered ``Failed`` event."""
        ...

    def error(self, message: str, code: str) -> bytes:
        """An error event that ends a stream the server cut short, and the stream's end."""
        ...

    def add(self, event: Event) -> None:
        """Fold one event into the non-streamed body."""
        ...

    def body(self, meter: Meter) -> dict[str, Any]: ...

    def error_body(self, failure: Failed) -> tuple[int, dict[str, Any]]:
        """The HTTP status and JSON body of an error before the first byte."""
        ...


class ChatCodec:
    """``/v1/chat/completions``: chunks, ``: keep-alive``, ``[DONE]`` (CONTRACT.md)."""

    media_type = b"text/event-stream; charset=utf-8"
    keepalive = sse.KEEPALIVE

    def __init__(self, ident: Identity, *, n: int, include_usage: bool, logprobs: bool) -> None:
        self.ident = ident
        self.include_usage = include_usage
        self._renderer = StreamRenderer(ident, include_usage)
        self._builder = CompletionBuilder(ident, n, logprobs)

    @property
    def id(self) -> str:
        return self.ident.id

    def head(self, meter: Meter) -> bytes:
        return b""

    def render(self, event: Event) -> bytes:
        return self._renderer.render(event)

    def end(self, meter: Meter) -> bytes:
        tail = self._renderer.usage(meter) if self.include_usage else b""
        return tail + sse.DONE

    def after_failure(self) -> bytes:
        return sse.DONE

    def error(self, message: str, code: str) -> bytes:
        return StreamRenderer.error(message, code) + sse.DONE

    def add(self, event: Event) -> None:
        self._builder.add(event)

    def body(self, meter: Meter) -> dict[str, Any]:
        return self._builder.build(meter)

    def error_body(self, failure: Failed) -> tuple[int, dict[str, Any]]:
        return failure.http, {
            "error": {
                "message": failure.message,
                "type": failure.type,
                "param": None,
                "code": failure.code,
            }
        }
