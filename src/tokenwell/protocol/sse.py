"""Server-sent events: the one encoder and the one decoder.

Decoding follows the WHATWG HTML "event stream interpretation"
(https://html.spec.whatwg.org/multipage/server-sent-events.html): lines end
in CR, LF or CRLF; ``:`` starts a comment; a blank line dispatches the event.
Bytes are split into lines *before* UTF-8 decoding, so a character split
across network reads is never damaged.
"""

from __future__ import annotations

from dataclasses import dataclass

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
# The same on a stream whose events carry ``id:`` lines (a resumable one): a
# comment line that ends no block. The openai and anthropic SDKs' decoders
# keep the last event id, as the SSE spec says, and then dispatch any blank
# line as an event, a comment's included, with empty data they cannot parse
# (JSONDecodeError). The spec dispatches nothing for it; the line joins the
# next event's block here, which every decoder reads alike.
KEEPALIVE_NUMBERED = b": keep-alive\n"


def encode(data: bytes) -> bytes:
    """One ``data:`` event. ``data`` is compact JSON, which holds no newline."""
    return b"data: " + data + b"\n\n"


@dataclass(slots=True, frozen=True)
class ServerSentEvent:
    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder: feed bytes as they arrive, get whole events back."""

    def __init__(self) -> None:
        self._buffer = b""
        self._pending_cr = False
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        data = self._buffer + chunk if self._buffer else chunk
        events: list[ServerSentEvent] = []
        start = 0
        end = len(data)
        # Lines end in LF, CR or CRLF; find them with C-speed searches.
        while start < end:
            lf = data.find(b"\n", start)
            cr = data.find(b"\r", start, lf if lf >= 0 else end)
            if cr >= 0:
                self._line(data[start:cr], events)
                if cr + 1 < end:
                    start = cr + 2 if data[cr + 1] == 0x0A else cr + 1
                else:
                    self._pending_cr = True
                    start = end
                continue
            if lf < 0:
                break
            self._line(data[start:lf], events)
            start = lf + 1
        self._buffer = data[start:]
        return events

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: an unterminated event is discarded, as the spec says."""
        self._buffer = b""
        self._data, self._event, self._id, self._retry = [], None, None, None
        return []

    def _line(self, raw: bytes, events: list[ServerSentEvent]) -> None:
        if not raw:
            if self._data or self._event is not None:
                events.append(
                    ServerSentEvent("\n".join(self._data), self._event, self._id, self._retry)
                )
            self._data, self._event, self._retry = [], None, None
            return
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(":"):
            self.comments += 1
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():  # not "²"
            self._retry = int(value)
