"""Engine events → the Anthropic Messages wire format. Pure: no I/O.

A stream is ``message_start``, then per content block ``content_block_start``,
``content_block_delta``… (``text_delta``, or ``input_json_delta`` with the
tool input's ``partial_json`` as it is generated), ``content_block_stop``;
then ``message_delta`` (``stop_reason``, cumulative usage) and
``message_stop``. Every frame is ``event: <type>\\ndata: <json>\\n\\n``; a
``ping`` keeps a quiet stream alive; an error after the first byte is an
``error`` event, which ends the stream.

Usage is the meter's: ``input_tokens`` are the prompt tokens not read from
the prompt cache, ``cache_read_input_tokens`` those that were (Anthropic
counts them apart, their sum is the prompt).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenwell.errors import APIError
from tokenwell.protocol.events import (
    Event,
    Failed,
    Finish,
    Meter,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
)

MEDIA_TYPE = b"text/event-stream; charset=utf-8"
# Anthropic writes its pings with spaces after the colons; clients accept either.
PING = b'event: ping\ndata: {"type": "ping"}\n\n'

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}

# HTTP status → Anthropic's error type; the rest are invalid_request_error (4xx)
# or api_error (5xx). Anthropic answers "overloaded" with 529, not 503.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _random_id(prefix: str) -> str:
    # An identifier, not a secret: the process's seeded PRNG (no system call).
    bits = random.getrandbits(144)
    chars = []
    for _ in range(24):
        bits, digit = divmod(bits, 62)
        chars.append(_ALPHABET[digit])
    return prefix + "".join(chars)


def message_id() -> str:
    return _random_id("msg_")


def tool_use_id(engine_id: str) -> str:
    """Anthropic's tool ids begin ``toolu_``; an engine's call id is kept after it."""
    return engine_id if engine_id.startswith("toolu_") else "toolu_" + engine_id


def error_status(status: int) -> tuple[int, str]:
    """An HTTP status → (Anthropic's status, its error type)."""
    if status == 503:
        return 529, "overloaded_error"
    kind = _ERROR_TYPES.get(status)
    if kind is None:
        kind = "api_error" if status >= 500 else "invalid_request_error"
    return status, kind


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def api_error_body(error: APIError) -> tuple[int, dict[str, Any]]:
    status, kind = error_status(error.status)
    return status, error_body(kind, error.message)


def frame(data: dict[str, Any]) -> bytes:
    """One event; its name is its ``type``, as Anthropic sends them."""
    return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def usage(meter: Meter) -> dict[str, int]:
    cached = min(meter.cached_tokens, meter.prompt_tokens)
    return {
        "input_tokens": meter.prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": meter.completion_tokens,
    }


@dataclass(slots=True)
class _Block:
    type: str  # "text" | "tool_use"
    text: list[str] = field(default_factory=list)
    id: str = ""
    name: str = ""

    def content(self) -> dict[str, Any]:
        if self.type == "text":
            return {"type": "text", "text": "".join(self.text)}
        joined = "".join(self.text)
        try:
            tool_input = orjson.loads(joined) if joined.strip() else {}
        except orjson.JSONDecodeError:
            tool_input = {}
        if not isinstance(tool_input, dict):
            tool_input = {}
        return {"type": "tool_use", "id": self.id, "name": self.name, "input": tool_input}


class AnthropicCodec:
    """One message's stream or body (``protocol.codec.Codec``).

    ``prompt_tokens`` is what the engine counted when it accepted the request:
    ``message_start`` goes out before the engine may have metered the prompt.
    """

    media_type = MEDIA_TYPE
    keepalive = PING

    def __init__(self, model: str, prompt_tokens: int = 0) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self._id = message_id()
        self._blocks: list[_Block] = []
        self._open = False  # the last block is still open (in a stream)
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    @property
    def id(self) -> str:
        return self._id

    def _usage(self, meter: Meter) -> dict[str, int]:
        if meter.prompt_tokens or not self.prompt_tokens:
            return usage(meter)
        return usage(
            Meter(self.prompt_tokens, meter.cached_tokens, meter.completion_tokens, meter.estimated)
        )

    # ------------------------------------------------------------------ stream

    def head(self, meter: Meter) -> bytes:
        message = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage(meter),
        }
        return frame({"type": "message_start", "message": message}) + PING

    def _close(self) -> bytes:
        if not self._open:
            return b""
        self._open = False
        return frame({"type": "content_block_stop", "index": len(self._blocks) - 1})

    def _start(self, block: _Block, start: dict[str, Any]) -> bytes:
        out = self._close()
        self._blocks.append(block)
        self._open = True
        return out + frame(
            {"type": "content_block_start", "index": len(self._blocks) - 1, "content_block": start}
        )

    def render(self, event: Event) -> bytes:
        if isinstance(event, Failed):
            _, kind = error_status(event.http)
            return frame(error_body(kind, event.message))
        if isinstance(event, TextDelta):
            if not event.text:
                return b""
            out = b""
            if not (self._open and self._blocks[-1].type == "text"):
                out = self._start(_Block("text"), {"type": "text", "text": ""})
            self._blocks[-1].text.append(event.text)
            return out + frame(
                {
                    "type": "content_block_delta",
                    "index": len(self._blocks) - 1,
                    "delta": {"type": "text_delta", "text": event.text},
                }
            )
        if isinstance(event, ToolCallStart):
            block = _Block("tool_use", id=tool_use_id(event.id), name=event.name)
            return self._start(
                block, {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            )
        if isinstance(event, ToolCallArguments):
            self._blocks[-1].text.append(event.fragment)
            return frame(
                {
                    "type": "content_block_delta",
                    "index": len(self._blocks) - 1,
                    "delta": {"type": "input_json_delta", "partial_json": event.fragment},
                }
            )
        assert isinstance(event, Finish)
        self._finish(event)
        return self._close()

    def _finish(self, event: Finish) -> None:
        self.stop_reason = STOP_REASONS.get(event.reason, "end_turn")
        if event.reason == "stop" and event.stop_sequence is not None:
            self.stop_reason = "stop_sequence"
            self.stop_sequence = event.stop_sequence

    def end(self, meter: Meter) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
            "usage": self._usage(meter),
        }
        return self._close() + frame(delta) + frame({"type": "message_stop"})

    def after_failure(self) -> bytes:
        return b""  # the error event ended the stream

    def error(self, message: str, code: str) -> bytes:
        return frame(error_body("api_error", message))

    # ------------------------------------------------------------------ body

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            if not event.text:
                return
            if not self._blocks or self._blocks[-1].type != "text":
                self._blocks.append(_Block("text"))
            self._blocks[-1].text.append(event.text)
        elif isinstance(event, ToolCallStart):
            self._blocks.append(_Block("tool_use", id=tool_use_id(event.id), name=event.name))
        elif isinstance(event, ToolCallArguments):
            self._blocks[-1].text.append(event.fragment)
        elif isinstance(event, Finish):
            self._finish(event)

    def body(self, meter: Meter) -> dict[str, Any]:
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [block.content() for block in self._blocks],
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": self._usage(meter),
        }

    def error_body(self, failure: Failed) -> tuple[int, dict[str, Any]]:
        status, kind = error_status(failure.http)
        return status, error_body(kind, failure.message)
