"""An upstream's chat completion chunks → tokenwell's events and meter. Pure.

Upstreams differ in small ways (vLLM repeats tool call ids, some servers send
``finish_reason: "eos"``, some put usage on every chunk); clients see one
contract whatever is behind, so each chunk is taken apart here and only
events leave: role chunks are dropped (the renderer writes its own), a tool
call's id and name are emitted once, finish reasons are mapped to the four
OpenAI knows, and usage goes to the meter, never to the client directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenwell.protocol.events import (
    Event,
    Failed,
    Finish,
    Meter,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
)

_REASONS = {
    "stop": "stop",
    "eos": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "max_tokens": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


class MalformedChunk(Exception):
    """The upstream sent something that is not a chat completion chunk."""


@dataclass
class Normalizer:
    """Turns one upstream stream into events; updates ``meter`` as it goes.

    Until the upstream reports usage, completion tokens are estimated (one per
    fragment, or by ``count`` when a tokenizer is configured) and the meter is
    marked estimated; the upstream's own usage, when it comes, replaces it.
    """

    meter: Meter
    count: Callable[[str], int] | None = None
    _calls: set[tuple[int, int]] = field(default_factory=set)
    _finished: set[int] = field(default_factory=set)
    exact_usage: bool = False

    def feed(self, chunk: Any) -> list[Event]:
        if not isinstance(chunk, dict):
            raise MalformedChunk(f"expected a JSON object, got {type(chunk).__name__}")
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            message = str(error.get("message") or chunk["error"])
            return [Failed(f"upstream error: {message}", error.get("code"), "upstream_error")]
        events: list[Event] = []
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise MalformedChunk("'choices' is not a list")
        for choice in choices:
            events.extend(self._choice(choice))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)
        return events

    def _choice(self, choice: Any) -> list[Event]:
        if not isinstance(choice, dict):
            raise MalformedChunk("a choice is not an object")
        index = int(choice.get("index", 0))
        delta = choice.get("delta") or {}
        events: list[Event] = []
        content = delta.get("content")
        logprobs = choice.get("logprobs")
        entries = None
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            entries = tuple(logprobs["content"])
        if content or entries:
            events.append(TextDelta(index, content or "", entries))
            self._estimate(content or "")
        for call in delta.get("tool_calls") or []:
            events.extend(self._call(index, call))
        reason = choice.get("finish_reason")
        if reason and index not in self._finished:
            self._finished.add(index)
            events.append(Finish(index, _REASONS.get(str(reason), "stop")))  # type: ignore[arg-type]
        return events

    def _call(self, choice: int, call: Any) -> list[Event]:
        if not isinstance(call, dict):
            raise MalformedChunk("a tool call is not an object")
        index = int(call.get("index", 0))
        function = call.get("function") or {}
        events: list[Event] = []
        if (choice, index) not in self._calls:
            name = function.get("name")
            if not name:
                raise MalformedChunk("a tool call started without a function name")
            self._calls.add((choice, index))
            call_id = call.get("id") or f"call_{choice}_{index}"
            events.append(ToolCallStart(choice, index, str(call_id), str(name)))
        fragment = function.get("arguments")
        if fragment:
            events.append(ToolCallArguments(choice, index, str(fragment)))
            self._estimate(str(fragment))
        return events

    def _estimate(self, text: str) -> None:
        if self.exact_usage or not text:
            return
        self.meter.estimated = True
        self.meter.add_completion(self.count(text) if self.count else 1)

    def _usage(self, usage: dict[str, Any]) -> None:
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        self.meter.prompt_tokens = prompt
        self.meter.cached_tokens = cached if isinstance(cached, int) else 0
        self.meter.completion_tokens = completion
        self.meter.estimated = False
        self.exact_usage = True

    @property
    def finished(self) -> set[int]:
        return self._finished


def chat_chunk(chunk: Any) -> Any:
    """A ``text_completion`` chunk (an upstream's ``/v1/completions``) as a chat
    completion chunk, so that one normaliser reads both."""
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
        return chunk
    choices = []
    for choice in chunk["choices"]:
        if not isinstance(choice, dict):
            choices.append(choice)
            continue
        out = {
            "index": choice.get("index", 0),
            "delta": {"content": choice.get("text") or ""},
            "finish_reason": choice.get("finish_reason"),
            "logprobs": None,
        }
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
            tops = logprobs.get("top_logprobs") or []
            values = logprobs.get("token_logprobs") or []
            content = []
            for i, token in enumerate(logprobs["tokens"]):
                top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
                content.append(
                    {
                        "token": token,
                        "logprob": values[i] if i < len(values) else None,
                        "bytes": None,
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()
                        ],
                    }
                )
            out["logprobs"] = {"content": content}
        choices.append(out)
    return {**chunk, "choices": choices}
