"""uvicorn's httptools protocol, with the time limits it lacks.

uvicorn closes a kept-alive connection that stays idle (``timeout_keep_alive``)
but puts no limit on a connection that never sends a request, sends half its
headers, trickles its body, or never reads its response: each holds a socket
(and a request task) for as long as the client likes. This protocol adds,
per connection (settings in ``[http]``, see ``config.HTTPConfig``):

- ``header_timeout``: a request's headers must be in within this long of the
  connection opening, or of its first byte on a kept-alive connection. A
  connection that sent nothing is closed; one that sent part of a request
  gets a 408 in the API's error shape, then is closed.
- ``body_timeout``: its body within this long of its headers. The request
  then ends as a client disconnect (quietly, see ``server.errors``); a 408 is
  sent first when no response has begun.
- ``send_timeout``: a client that takes none of its response's bytes for this
  long (the transport's buffer stays above its high-water mark) is cut off.
  The request's ``scope["state"]["send_timed_out"]`` says so, so that a
  generation ends as ``slow_client`` (billed for what was made).

Headers are limited in size too (``max_header_bytes``: httptools has no
limit, so a client could stream headers into memory until the header
timeout): past it, a 431. And a request the HTTP parser refuses gets its 400
in the API's error shape, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokenwell.config import HTTPConfig
from tokenwell.errors import InvalidRequest, RequestTimeout
from tokenwell.server.errors import raw_error_response


class _HeadersTooLarge(Exception):
    pass


def protocol_class(limits: HTTPConfig) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    return type("TimedHttpToolsProtocol", (TimedHttpToolsProtocol,), {"limits": limits})


class TimedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[HTTPConfig] = HTTPConfig()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        # What is being read: "idle" (no request begun), "headers" or "body".
        self._reading = "idle"
        self._header_bytes = 0
        self._headers_too_large = False

    # -- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for name in ("_header_timer", "_body_timer", "_send_timer"):
            self._cancel(name)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading == "idle" and self._header_timer is None:
            self._arm_header_timer()  # the first byte of a request on a kept-alive connection
        super().data_received(data)

    # -- parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = "headers"
        self._header_bytes = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        super().on_header(name, value)

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            self._headers_too_large = True
            # Out of the parser: uvicorn answers a parser error with send_400_response.
            raise _HeadersTooLarge

    def on_headers_complete(self) -> None:
        self._cancel("_header_timer")
        self._reading = "body"
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel("_body_timer")
        self._reading = "idle"
        super().on_message_complete()

    # -- flow control: a client that reads nothing
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        self._cancel("_send_timer")
        super().resume_writing()

    def send_400_response(self, msg: str) -> None:
        """The parser refused the request: a 400 in the API's error shape, then close."""
        if self._headers_too_large:
            error = InvalidRequest(
                "Request headers too large: the limit is "
                f"{self.limits.max_header_bytes} bytes (URL and headers).",
                code="headers_too_large",
            )
            error.status = 431
        else:
            error = InvalidRequest("Invalid HTTP request.", code="invalid_http_request")
        self.transport.write(raw_error_response(error))
        self.transport.close()

    # -- the limits
    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout, self._header_timed_out
        )

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._responding():
            # A pipelined request behind one still being answered: the wait
            # for its headers begins once that one is done.
            self._arm_header_timer()
            return
        if self._reading == "headers":
            self.transport.write(
                raw_error_response(
                    RequestTimeout(
                        "Request timeout: its headers did not arrive within "
                        f"{self.limits.header_timeout:g} s."
                    )
                )
            )
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(
                raw_error_response(
                    RequestTimeout(
                        "Request timeout: its body did not arrive within "
                        f"{self.limits.body_timeout:g} s."
                    )
                )
            )
        if cycle is not None and not cycle.response_complete:
            # The app reading the body sees the client gone; what it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            state = cycle.scope.get("state")
            if isinstance(state, dict):
                state["send_timed_out"] = True
        # abort, not close: close would wait for the buffer to drain, forever.
        self.transport.abort()
