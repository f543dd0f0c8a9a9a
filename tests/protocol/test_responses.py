"""The Responses codec (protocol/responses.py) against OpenAI's recorded streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.events import (
    Failed,
    Finish,
    Meter,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
)
from tokenwell.protocol.responses import (
    ResponsesEncoder,
    frame,
    parse_responses_request,
)
from tokenwell.protocol.sse import SSEDecoder

# ../shared/fixtures beside the checkout (see ARCHITECTURE.md).
FIXTURES = Path(__file__).resolve().parents[3] / "shared/fixtures/openai-responses-recorded"

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="no recorded fixtures here")


def recorded(name: str) -> list[tuple[str, dict[str, Any]]]:
    decoder = SSEDecoder()
    events = decoder.feed((FIXTURES / name).read_bytes())
    return [(e.event or "", orjson.loads(e.data)) for e in events]


def replay(name: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bytes]:
    """Feed the engine events behind a recording to the encoder; its events and bytes."""
    rec = recorded(name)
    req = parse_responses_request(body)
    enc = ResponsesEncoder("resp_x", req.echo)
    out = enc.start()
    calls: dict[str, int] = {}
    final = rec[-1][1]["response"]
    for kind, data in rec:
        if kind == "response.output_text.delta":
            out += enc.feed(TextDelta(0, data["delta"]))
        elif kind == "response.output_item.added" and data["item"]["type"] == "function_call":
            calls[data["item"]["id"]] = len(calls)
            item = data["item"]
            out += enc.feed(ToolCallStart(0, len(calls) - 1, item["call_id"], item["name"]))
        elif kind == "response.function_call_arguments.delta":
            out += enc.feed(ToolCallArguments(0, calls[data["item_id"]], data["delta"]))
    reason = "length" if final["status"] == "incomplete" else "stop"
    if calls:
        reason = "tool_calls"
    out += enc.feed(Finish(0, reason))
    u = final["usage"]
    out += enc.finish(Meter(u["input_tokens"], 0, u["output_tokens"]))
    return out, b"".join(frame(e) for e in out)


def shape(value: Any) -> Any:
    """Keys (sorted) and types, not values: what a parser relies on."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items()) if k != "obfuscation"}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__ if value is not None else None


@needs_fixtures
@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("text.sse", {"model": "m", "input": "What is 4200 + 42?", "stream": True}),
        ("max-output-tokens.sse", {"model": "m", "input": "states", "max_output_tokens": 50}),
        (
            "function-calls.sse",
            {
                "model": "m",
                "input": "secret",
                "tools": [
                    {
                        "type": "function",
                        "name": "secret_retrieval_tool",
                        "description": "d",
                        "parameters": {
                            "type": "object",
                            "properties": {"password": {"type": "string"}},
                        },
                        "strict": True,
                    }
                ],
            },
        ),
    ],
)
def test_replay_matches_the_recording(name: str, body: dict[str, Any]) -> None:
    ours, wire = replay(name, body)
    theirs = recorded(name)
    # Same event names in the same order, gapless numbers from 0.
    assert [e["type"] for e in ours] == [kind for kind, _ in theirs]
    assert [e["sequence_number"] for e in ours] == list(range(len(ours)))
    # Every event's fields (names and types) as OpenAI sends them; the response
    # object may carry fields newer recordings add.
    for mine, (_, data) in zip(ours, theirs, strict=True):
        if "response" in data:
            assert set(data["response"]) - set(mine["response"]) <= {
                "frequency_penalty",
                "presence_penalty",
                "prompt_cache_retention",
            }
            assert mine["response"]["status"] == data["response"]["status"]
            assert mine["response"]["incomplete_details"] == data["response"]["incomplete_details"]
            assert shape(mine["response"]["output"]) == shape(data["response"]["output"])
            assert mine["response"]["usage"] == data["response"]["usage"]
            continue
        assert shape(mine) == shape(data), mine["type"]
        for key in ("delta", "text", "arguments", "output_index", "content_index"):
            if key in data:
                assert mine[key] == data[key]
    # The framing: event name, then data, then a blank line; the name is data.type.
    decoded = SSEDecoder().feed(wire)
    assert [e.event for e in decoded] == [kind for kind, _ in theirs]
    assert all(orjson.loads(e.data)["type"] == e.event for e in decoded)
    assert b"[DONE]" not in wire


@needs_fixtures
def test_the_non_streamed_object_has_every_field_of_the_recording() -> None:
    rec = orjson.loads((FIXTURES / "response.json").read_bytes())
    req = parse_responses_request({"model": "m", "input": "What is 4200 + 42?"})
    enc = ResponsesEncoder("resp_x", req.echo)
    enc.start()
    enc.feed(TextDelta(0, "4200 + 42 equals 4242."))
    enc.feed(Finish(0, "stop"))
    enc.finish(Meter(16, 0, 11))
    assert enc.final is not None
    assert set(rec) - set(enc.final) <= {
        "billing",
        "frequency_penalty",
        "presence_penalty",
        "prompt_cache_retention",
    }
    assert shape(enc.final["output"]) == shape(rec["output"])
    assert enc.final["usage"] == rec["usage"]


@needs_fixtures
def test_a_failure_mid_stream_ends_as_openai_does() -> None:
    rec = [
        orjson.loads(line)
        for line in (FIXTURES / "error-insufficient-quota.chunks.txt").read_text().splitlines()
    ]
    req = parse_responses_request({"model": "m", "input": "x", "stream": True})
    enc = ResponsesEncoder("resp_x", req.echo)
    out = enc.start()
    out += enc.feed(Failed("quota", "insufficient_quota"))
    out += enc.finish(Meter(3, 0, 0))
    assert [e["type"] for e in out] == [e["type"] for e in rec]
    assert shape(out[2]["error"]) == shape(rec[2]["error"])
    assert out[-1]["response"]["status"] == "failed"
    assert set(out[-1]["response"]["error"]) == set(rec[-1]["response"]["error"])


def test_text_then_call_closes_the_message_first() -> None:
    req = parse_responses_request({"model": "m", "input": "x"})
    enc = ResponsesEncoder("resp_x", req.echo)
    out = enc.start()
    out += enc.feed(TextDelta(0, "let me look"))
    out += enc.feed(ToolCallStart(0, 0, "call_1", "f"))
    out += enc.feed(ToolCallArguments(0, 0, "{}"))
    out += enc.feed(Finish(0, "tool_calls"))
    out += enc.finish(Meter(1, 0, 3))
    types = [e["type"] for e in out]
    assert types.index("response.output_item.done") < types.index(
        "response.function_call_arguments.delta"
    )
    final = out[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["arguments"] == "{}"
    assert final["output"][1]["call_id"] == "call_1"


# ---------------------------------------------------------------- requests


def test_items_become_chat_messages() -> None:
    req = parse_responses_request(
        {
            "model": "m",
            "instructions": "be brief",
            "input": [
                {"type": "message", "role": "developer", "id": "x1", "content": "dev"},
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "zz"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": "two"},
            ],
            "tools": [
                {"type": "function", "name": "f", "parameters": {"type": "object"}},
                {"type": "web_search"},
            ],
            "reasoning": {"summary": "auto"},
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "abc",
            "client_metadata": {"x": 1},
            "store": False,
        }
    )
    roles = [m.role for m in req.chat.messages]
    assert roles == ["system", "developer", "user", "assistant", "tool", "tool"]
    assert [c.id for c in req.chat.messages[3].tool_calls] == ["c1", "c2"]
    assert [t.function.name for t in req.chat.tools] == ["f"]  # web_search not offered
    assert req.store is False
    assert req.chat.cache_key == "abc" and req.chat.raw["prompt_cache_key"] == "abc"


def test_an_output_is_paired_with_its_call_wherever_it_stands() -> None:
    """As OpenAI pairs them, by call_id: `llm`'s OpenAI plugin sends an empty user
    message between a call and its output, which chat's ordering rule refuses."""
    req = parse_responses_request(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "shout it"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                {"role": "user", "content": ""},
                {"type": "function_call_output", "call_id": "c2", "output": "two"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
            ],
        }
    )
    messages = req.chat.messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool", "user"]
    assert [(m.tool_call_id, m.content) for m in messages[2:4]] == [("c2", "two"), ("c1", "one")]
    assert messages[4].content == ""


def test_assistant_input_is_listed_as_output_text() -> None:
    req = parse_responses_request(
        {
            "model": "m",
            "input": [{"role": "assistant", "content": "said"}, {"role": "user", "content": "x"}],
        }
    )
    assert req.input_items[0]["content"] == [
        {"type": "output_text", "text": "said", "annotations": []}
    ]
    assert req.input_items[1]["content"] == [{"type": "input_text", "text": "x"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.[0].content.[0].type",
        ),
        ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "nonsense": 1}, "nonsense"),
        ({}, "input"),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": ""}]},
            "input",
        ),
        ({"input": "x", "background": True, "store": False}, "background"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
            "text.format.name",
        ),
    ],
)
def test_refusals_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_responses_request({"model": "m", **body})
    assert err.value.param == param


def test_text_format_becomes_a_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = parse_responses_request(
        {
            "model": "m",
            "input": "x",
            "text": {
                "format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}
            },
        }
    )
    assert req.chat.response_format is not None
    assert req.chat.response_format.type == "json_schema"
    assert req.echo["text"]["format"]["schema"] == schema


def test_a_log_reader_that_cannot_finish_ends_with_an_error_event() -> None:
    import asyncio

    from tokenwell.server.requestlog import RequestLog
    from tokenwell.server.responses_api import ResponsesLogReader

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    reader = ResponsesLogReader(RequestLog("r", True, 100), after=6, replayed=False, keepalive=1)
    asyncio.run(reader._end(send, "gone"))
    (event,) = SSEDecoder().feed(sent[0]["body"])
    assert event.event == "error" and event.id == "7"
    data = orjson.loads(event.data)
    assert data["sequence_number"] == 7 and data["error"]["code"] == "interrupted"
    assert sent[0]["more_body"] is False


def test_a_poll_sees_the_text_so_far_and_late_arguments_are_kept() -> None:
    req = parse_responses_request({"model": "m", "input": "x"})
    enc = ResponsesEncoder("resp_x", req.echo)
    enc.start()
    enc.feed(TextDelta(0, "so "))
    enc.feed(TextDelta(0, "far"))
    assert enc.snapshot()["output"][0]["content"][0]["text"] == "so far"
    enc.feed(ToolCallStart(0, 0, "c0", "f"))
    enc.feed(ToolCallStart(0, 1, "c1", "f"))
    enc.feed(ToolCallArguments(0, 0, '{"a": 1}'))  # for the call already closed
    enc.feed(ToolCallArguments(0, 1, "{}"))
    enc.feed(Finish(0, "tool_calls"))
    enc.finish(Meter(1, 0, 4))
    assert enc.final is not None
    assert [i.get("arguments") for i in enc.final["output"]] == [None, '{"a": 1}', "{}"]


def test_logprobs_when_included() -> None:
    req = parse_responses_request(
        {
            "model": "m",
            "input": "x",
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
        }
    )
    assert req.chat.logprobs is True and req.chat.top_logprobs == 2
    enc = ResponsesEncoder("resp_x", req.echo)
    enc.start()
    entry = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
    (_, _, delta) = enc.feed(TextDelta(0, "a", (entry,)))
    assert delta["logprobs"] == [entry]
    enc.feed(Finish(0, "stop"))
    enc.finish(Meter(1, 0, 1))
    assert enc.final is not None
    assert enc.final["output"][0]["content"][0]["logprobs"] == [entry]
