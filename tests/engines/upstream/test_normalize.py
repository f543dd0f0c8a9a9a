from __future__ import annotations

import pytest

from tokenwell.engines.upstream.normalize import MalformedChunk, Normalizer
from tokenwell.protocol.events import (
    Failed,
    Finish,
    Meter,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
)


def chunk(delta: dict, finish: str | None = None, index: int = 0, **extra: object) -> dict:
    return {"choices": [{"index": index, "delta": delta, "finish_reason": finish}], **extra}


def test_role_chunks_are_dropped_and_content_flows() -> None:
    n = Normalizer(Meter())
    assert n.feed(chunk({"role": "assistant", "content": ""})) == []
    assert n.feed(chunk({"content": "Hi"})) == [TextDelta(0, "Hi")]


def test_usage_goes_to_the_meter_and_replaces_the_estimate() -> None:
    meter = Meter()
    n = Normalizer(meter)
    n.feed(chunk({"content": "a"}))
    n.feed(chunk({"content": "b"}))
    assert (meter.completion_tokens, meter.estimated) == (2, True)
    usage = {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert n.feed({"choices": [], "usage": usage}) == []
    assert (meter.prompt_tokens, meter.cached_tokens, meter.completion_tokens) == (9, 4, 3)
    assert meter.estimated is False
    n.feed(chunk({"content": "c"}))  # once exact, no more estimating
    assert meter.completion_tokens == 3


def test_continuous_usage_on_every_chunk_keeps_the_meter_exact() -> None:
    meter = Meter()
    n = Normalizer(meter)
    for i in range(1, 4):
        n.feed(chunk({"content": "x"}, usage={"prompt_tokens": 5, "completion_tokens": i}))
        assert meter.completion_tokens == i and not meter.estimated


def test_tool_call_id_and_name_are_sent_once() -> None:
    n = Normalizer(Meter())
    start = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    again = {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a"'}}
    assert n.feed(chunk({"tool_calls": [start]})) == [ToolCallStart(0, 0, "call_1", "f")]
    assert n.feed(chunk({"tool_calls": [again]})) == [ToolCallArguments(0, 0, '{"a"')]


def test_finish_reasons_are_mapped_and_sent_once() -> None:
    n = Normalizer(Meter())
    assert n.feed(chunk({}, "eos")) == [Finish(0, "stop")]
    assert n.feed(chunk({}, "stop")) == []
    assert Normalizer(Meter()).feed(chunk({}, "max_tokens")) == [Finish(0, "length")]


def test_an_error_chunk_fails_the_generation() -> None:
    events = Normalizer(Meter()).feed({"error": {"message": "overloaded", "code": "x"}})
    assert isinstance(events[0], Failed) and "overloaded" in events[0].message


@pytest.mark.parametrize(
    "bad",
    [
        [1],
        {"choices": "no"},
        {"choices": [1]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]},
    ],
)
def test_malformed_chunks_raise(bad: object) -> None:
    with pytest.raises(MalformedChunk):
        Normalizer(Meter()).feed(bad)
