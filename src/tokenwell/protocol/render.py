"""Engine events → the OpenAI wire format (CONTRACT.md). Pure: no I/O.

``StreamRenderer`` makes ``chat.completion.chunk`` SSE bytes as events
arrive; ``CompletionBuilder`` folds the same events into one
``chat.completion`` object.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenwell.protocol import sse
from tokenwell.protocol.events import (
    Event,
    Failed,
    Finish,
    Meter,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
)

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def completion_id() -> str:
    # An identifier, not a secret: the process's seeded PRNG (no system call).
    bits = random.getrandbits(168)
    chars = []
    for _ in range(28):
        bits, digit = divmod(bits, 62)
        chars.append(_ALPHABET[digit])
    return "chatcmpl-" + "".join(chars)


@dataclass(slots=True)
class Identity:
    """What every chunk of one response repeats."""

    model: str
    system_fingerprint: str
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))


class StreamRenderer:
    def __init__(self, ident: Identity, include_usage: bool) -> None:
        self._ident = ident
        self._include_usage = include_usage
        self._started: set[int] = set()

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._ident.id,
            "object": "chat.completion.chunk",
            "created": self._ident.created,
            "model": self._ident.model,
            "system_fingerprint": self._ident.system_fingerprint,
            "choices": choices,
        }
        if self._include_usage:
            chunk["usage"] = None
        return sse.encode(orjson.dumps(chunk))

    @staticmethod
    def _choice(
        index: int,
        delta: dict[str, Any],
        finish: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def _role(self, choice: int, content: str | None) -> bytes:
        self._started.add(choice)
        return self._chunk([self._choice(choice, {"role": "assistant", "content": content})])

    def render(self, event: Event) -> bytes:
        """The SSE bytes for one event (with the role chunk first, for a new choice)."""
        if isinstance(event, Failed):
            return self.error(event.message, event.code, event.type)
        out = b""
        if event.choice not in self._started:
            first_is_call = isinstance(event, ToolCallStart)
            out = self._role(event.choice, None if first_is_call else "")
        if isinstance(event, TextDelta):
            if not event.text and not event.logprobs:
                return out
            logprobs = (
                {"content": list(event.logprobs), "refusal": None}
                if event.logprobs is not None
                else None
            )
            return out + self._chunk(
                [self._choice(event.choice, {"content": event.text}, logprobs=logprobs)]
            )
        if isinstance(event, ToolCallStart):
            call = {
                "index": event.index,
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            return out + self._chunk([self._choice(event.choice, {"tool_calls": [call]})])
        if isinstance(event, ToolCallArguments):
            # id, type and name went out once with ToolCallStart: the SDK
            # concatenates strings, so repeating the name would corrupt it.
            call = {"index": event.index, "function": {"arguments": event.fragment}}
            return out + self._chunk([self._choice(event.choice, {"tool_calls": [call]})])
        assert isinstance(event, Finish)
        return out + self._chunk([self._choice(event.choice, {}, finish=event.reason)])

    def usage(self, meter: Meter) -> bytes:
        chunk = {
            "id": self._ident.id,
            "object": "chat.completion.chunk",
            "created": self._ident.created,
            "model": self._ident.model,
            "system_fingerprint": self._ident.system_fingerprint,
            "choices": [],
            "usage": meter.usage(),
        }
        return sse.encode(orjson.dumps(chunk))

    @staticmethod
    def error(message: str, code: str | None = None, type_: str = "server_error") -> bytes:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return sse.encode(orjson.dumps(body))


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    finish: str | None = None


class CompletionBuilder:
    """Folds events into a ``chat.completion`` object."""

    def __init__(self, ident: Identity, n: int, logprobs: bool) -> None:
        self._ident = ident
        self._choices = [_Choice(logprobs=[] if logprobs else None) for _ in range(n)]

    def add(self, event: Event) -> None:
        if isinstance(event, Failed):
            return
        choice = self._choices[event.choice]
        if isinstance(event, TextDelta):
            choice.text.append(event.text)
            if event.logprobs and choice.logprobs is not None:
                choice.logprobs.extend(event.logprobs)
        elif isinstance(event, ToolCallStart):
            choice.calls.append(
                {
                    "id": event.id,
                    "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                }
            )
        elif isinstance(event, ToolCallArguments):
            choice.calls[event.index]["function"]["arguments"] += event.fragment
        elif isinstance(event, Finish):
            choice.finish = event.reason

    def build(self, meter: Meter) -> dict[str, Any]:
        choices = []
        for index, c in enumerate(self._choices):
            text = "".join(c.text)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text if (text or not c.calls) else None,
                "refusal": None,
            }
            if c.calls:
                message["tool_calls"] = c.calls
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": (
                        {"content": c.logprobs, "refusal": None} if c.logprobs is not None else None
                    ),
                    "finish_reason": c.finish,
                }
            )
        return {
            "id": self._ident.id,
            "object": "chat.completion",
            "created": self._ident.created,
            "model": self._ident.model,
            "system_fingerprint": self._ident.system_fingerprint,
            "choices": choices,
            "usage": meter.usage(),
        }
