"""AnthropicCodec replayed against recorded Anthropic traffic (tests/fixtures/anthropic-recorded).

Each recorded stream is turned into the engine events that would have made it;
the codec's bytes must then carry the same events, in the same order, with the
same block indexes, block starts and deltas (ids, usage and pings aside).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tokenwell.errors import Overloaded, RateLimited
from tokenwell.protocol.anthropic_codec import AnthropicCodec, api_error_body
from tokenwell.protocol.events import (
    Event,
    Failed,
    Finish,
    Meter,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
)
from tokenwell.protocol.sse import SSEDecoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "anthropic-recorded"
REASONS = {"end_turn": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def decode(body: bytes) -> list[dict[str, Any]]:
    out = []
    for event in SSEDecoder().feed(body):
        data = orjson.loads(event.data)
        assert event.event == data["type"]
        out.append(data)
    return out


def engine_events(recorded: list[dict[str, Any]]) -> list[Event]:
    events: list[Event] = []
    calls = 0
    for data in recorded:
        kind = data["type"]
        if kind == "content_block_start" and data["content_block"]["type"] == "tool_use":
            block = data["content_block"]
            events.append(ToolCallStart(0, calls, block["id"], block["name"]))
            calls += 1
        elif kind == "content_block_delta" and data["delta"]["type"] == "text_delta":
            events.append(TextDelta(0, data["delta"]["text"]))
        elif kind == "content_block_delta" and data["delta"]["type"] == "input_json_delta":
            events.append(ToolCallArguments(0, calls - 1, data["delta"]["partial_json"]))
        elif kind == "message_delta":
            events.append(Finish(0, REASONS[data["delta"]["stop_reason"]]))  # type: ignore[arg-type]
    return events


def shape(data: dict[str, Any]) -> Any:
    """What must match: the event, its block index, block start and delta."""
    kind = data["type"]
    if kind == "message_start":
        message = data["message"]
        return kind, message["type"], message["role"], message["content"], message["stop_reason"]
    if kind == "content_block_start":
        block = dict(data["content_block"])
        block.pop("id", None)
        return kind, data["index"], block
    if kind in ("content_block_delta", "content_block_stop"):
        return kind, data["index"], data.get("delta")
    if kind == "message_delta":
        return kind, data["delta"]
    return (kind,)


@pytest.mark.parametrize("name", ["text.sse", "tool-use.sse", "max-tokens.sse"])
def test_replay_recorded_stream(name: str) -> None:
    recorded = [d for d in decode((FIXTURES / name).read_bytes()) if d["type"] != "ping"]
    meter = Meter(prompt_tokens=15, completion_tokens=50)
    codec = AnthropicCodec("claude-sonnet-4-20250514", 15)
    body = codec.head(meter)
    body += b"".join(codec.render(event) for event in engine_events(recorded))
    body += codec.end(meter)
    ours = [d for d in decode(body) if d["type"] != "ping"]
    assert [shape(d) for d in ours] == [shape(d) for d in recorded]
    # Usage the way Anthropic sends it: cumulative and final in message_delta.
    assert ours[-2]["usage"]["output_tokens"] == 50
    assert set(ours[-2]["usage"]) <= set(recorded[-2]["usage"]) | {
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "input_tokens",
    }


@pytest.mark.parametrize(
    ("stream", "message"), [("text.sse", "message.json"), ("tool-use.sse", "message-tool-use.json")]
)
def test_non_streamed_body_matches_recorded_message(stream: str, message: str) -> None:
    recorded = decode((FIXTURES / stream).read_bytes())
    codec = AnthropicCodec("claude-sonnet-4-20250514")
    for event in engine_events(recorded):
        codec.add(event)
    ours = codec.body(Meter(prompt_tokens=17, completion_tokens=15))
    theirs = orjson.loads((FIXTURES / message).read_bytes())
    assert set(ours) == set(theirs)
    assert set(ours["usage"]) <= set(theirs["usage"])
    assert [b["type"] for b in ours["content"]] == [b["type"] for b in theirs["content"]]
    assert ours["stop_reason"] == theirs["stop_reason"]
    for block in ours["content"]:
        if block["type"] == "tool_use":
            assert isinstance(block["input"], dict) and block["input"]


def test_cached_prompt_tokens_are_cache_reads() -> None:
    codec = AnthropicCodec("m")
    codec.add(Finish(0, "stop"))
    usage = codec.body(Meter(prompt_tokens=100, cached_tokens=64, completion_tokens=3))["usage"]
    assert usage == {
        "input_tokens": 36,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 64,
        "output_tokens": 3,
    }


def test_error_shapes() -> None:
    recorded = orjson.loads((FIXTURES / "error-401.json").read_bytes())
    assert recorded["type"] == "error"
    status, body = api_error_body(Overloaded("busy"))
    assert (status, body) == (
        529,
        {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
    )
    status, body = api_error_body(RateLimited("slow down"))
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert set(body) == set(recorded) - {"request_id"}
    frame = AnthropicCodec("m").render(Failed("boom", "x"))
    assert (
        frame
        == b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"boom"}}\n\n'
    )


def test_ping_is_anthropics() -> None:
    codec = AnthropicCodec("m")
    assert codec.keepalive == b'event: ping\ndata: {"type": "ping"}\n\n'
    assert codec.keepalive in (FIXTURES / "text.sse").read_bytes()
