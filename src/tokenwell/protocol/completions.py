"""``POST /v1/completions`` (OpenAI's legacy text completions): request and codec.

The request becomes one internal ``ChatRequest`` per prompt, each carrying its
raw ``prompt`` (text or token ids: no chat template) and ``api="completions"``.
Several prompts with ``n`` choices each answer ``len(prompts) * n`` choices,
indexed as OpenAI does: choice ``i * n + j`` is the ``j``-th sample of prompt
``i``. The codec renders the one event stream as ``text_completion`` objects
and chunks. Pure: no I/O.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenwell.errors import InvalidRequest
from tokenwell.protocol import sse
from tokenwell.protocol.events import Event, Failed, Finish, Meter, TextDelta
from tokenwell.protocol.inputs import Text, texts_or_token_ids
from tokenwell.protocol.requests import (
    ChatRequest,
    Stop,
    StreamOptions,
    _logit_bias,
    _stop,
    decode_object,
)
from tokenwell.protocol.validation import first_error

API = "completions"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_PROMPTS = 128

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def completion_id() -> str:
    bits = random.getrandbits(168)
    chars = []
    for _ in range(28):
        bits, digit = divmod(bits, 62)
        chars.append(_ALPHABET[digit])
    return "cmpl-" + "".join(chars)


class _CompletionsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str
    prompt: Any
    suffix: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    stop: Stop | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


Prompt = Text


@dataclass(frozen=True, slots=True)
class CompletionsRequest:
    """A validated completions request: one internal request per prompt."""

    requests: tuple[ChatRequest, ...]
    n: int
    echo: bool
    suffix: str | None
    # Top alternatives per token (OpenAI's integer ``logprobs``), None when not asked.
    logprobs: int | None
    stream: bool
    include_usage: bool

    @property
    def model(self) -> str:
        return self.requests[0].model

    @property
    def prompts(self) -> list[Prompt]:
        return [r.prompt for r in self.requests]  # type: ignore[misc]


def parse_completions_request(body: bytes) -> CompletionsRequest:
    data = decode_object(body)
    if "prompt" not in data:
        raise InvalidRequest(
            "Missing required parameter: 'prompt'.",
            param="prompt",
            code="missing_required_parameter",
        )
    try:
        body = _CompletionsBody.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc) from exc
    prompts = texts_or_token_ids(body.prompt, "prompt", MAX_PROMPTS, empty_text=True)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest(
            "Invalid 'stream_options': only allowed when 'stream' is true.",
            param="stream_options",
            code="invalid_value",
        )
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequest(
            "Invalid 'best_of': only best_of equal to n (or unset) is supported.",
            param="best_of",
            code="unsupported_value",
        )
    if body.echo and any(isinstance(p, tuple) for p in prompts):
        raise InvalidRequest(
            "Invalid 'echo': echo needs text prompts, not token ids.",
            param="echo",
            code="unsupported_value",
        )
    if body.echo and body.logprobs is not None:
        raise InvalidRequest(
            "Invalid 'echo': echo with 'logprobs' (the prompt's own logprobs) is not supported.",
            param="echo",
            code="unsupported_value",
        )
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0:
        raise InvalidRequest(
            "Invalid 'max_tokens': at least 1 (scoring a prompt alone is not supported).",
            param="max_tokens",
            code="integer_below_min_value",
        )
    base = ChatRequest(
        model=body.model,
        messages=(),
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        max_tokens=max_tokens,
        stop=_stop(body.stop),
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
        logit_bias=_logit_bias(body.logit_bias),
        user=body.user,
        cache_key=body.user,
        raw=data,
        api=API,
    )
    return CompletionsRequest(
        requests=tuple(replace(base, prompt=p) for p in prompts),
        n=body.n,
        echo=body.echo,
        suffix=body.suffix,
        logprobs=body.logprobs,
        stream=body.stream,
        include_usage=base.include_usage,
    )


# ---------------------------------------------------------------- codec


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    offset: int = 0  # characters of text so far (logprobs' text_offset)
    logprobs: dict[str, list[Any]] | None = None
    finish: str | None = None


def _logprobs(entries: tuple[dict[str, Any], ...], offset: int) -> tuple[dict[str, list[Any]], int]:
    """Chat logprob entries as the completions shape (``tokens``, ``token_logprobs``…)."""
    out: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for entry in entries:
        out["tokens"].append(entry["token"])
        out["token_logprobs"].append(entry["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in entry["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(entry["token"])
    return out, offset


class CompletionsCodec:
    """``text_completion`` objects and chunks; ``data: [DONE]`` ends a stream."""

    media_type = b"text/event-stream; charset=utf-8"
    keepalive = sse.KEEPALIVE

    def __init__(
        self,
        model: str,
        system_fingerprint: str,
        *,
        n: int,
        echo: list[str] | None,
        logprobs: bool,
        include_usage: bool,
    ) -> None:
        self.model = model
        self.system_fingerprint = system_fingerprint
        self._id = completion_id()
        self.created = int(time.time())
        self.include_usage = include_usage
        # The echoed prompt text of every choice (prompt i*n + j), when asked.
        self.echo = echo
        self.want_logprobs = logprobs
        self._choices = [_Choice(logprobs=None) for _ in range(n)]
        if echo is not None:
            for choice, text in zip(self._choices, echo, strict=True):
                choice.text.append(text)
                choice.offset = len(text)

    @property
    def id(self) -> str:
        return self._id

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return sse.encode(orjson.dumps(chunk))

    @staticmethod
    def _choice(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> Any:
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}

    def head(self, meter: Meter) -> bytes:
        if self.echo is None:
            return b""
        return b"".join(
            self._chunk([self._choice(i, text)]) for i, text in enumerate(self.echo) if text
        )

    def render(self, event: Event) -> bytes:
        if isinstance(event, Failed):
            return self.error(event.message, event.code or "server_error", sse_done=False)
        if isinstance(event, TextDelta):
            logprobs = None
            if self.want_logprobs:
                choice = self._choices[event.choice]
                logprobs, choice.offset = _logprobs(event.logprobs or (), choice.offset)
            if not event.text and logprobs is None:
                return b""
            return self._chunk([self._choice(event.choice, event.text, logprobs)])
        if isinstance(event, Finish):
            return self._chunk([self._choice(event.choice, "", finish=event.reason)])
        return b""  # no tools here

    def end(self, meter: Meter) -> bytes:
        tail = self._chunk([], _usage(meter)) if self.include_usage else b""
        return tail + sse.DONE

    def after_failure(self) -> bytes:
        return sse.DONE

    def error(self, message: str, code: str, *, sse_done: bool = True) -> bytes:
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
        return sse.encode(orjson.dumps(body)) + (sse.DONE if sse_done else b"")

    def add(self, event: Event) -> None:
        if isinstance(event, Failed):
            return
        choice = self._choices[event.choice]
        if isinstance(event, TextDelta):
            choice.text.append(event.text)
            if self.want_logprobs:
                part, choice.offset = _logprobs(event.logprobs or (), choice.offset)
                if choice.logprobs is None:
                    choice.logprobs = part
                else:
                    for name, values in part.items():
                        choice.logprobs[name].extend(values)
        elif isinstance(event, Finish):
            choice.finish = event.reason

    def body(self, meter: Meter) -> dict[str, Any]:
        empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        return {
            "id": self._id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": [
                self._choice(
                    i,
                    "".join(c.text),
                    (c.logprobs or empty) if self.want_logprobs else None,
                    c.finish,
                )
                for i, c in enumerate(self._choices)
            ],
            "usage": _usage(meter),
        }

    def error_body(self, failure: Failed) -> tuple[int, dict[str, Any]]:
        return failure.http, {
            "error": {
                "message": failure.message,
                "type": failure.type,
                "param": None,
                "code": failure.code,
            }
        }


def _usage(meter: Meter) -> dict[str, Any]:
    return {
        "prompt_tokens": meter.prompt_tokens,
        "completion_tokens": meter.completion_tokens,
        "total_tokens": meter.prompt_tokens + meter.completion_tokens,
    }
