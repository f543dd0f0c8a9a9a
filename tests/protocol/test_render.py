from __future__ import annotations

import orjson

from tokenwell.protocol.events import (
    Failed,
    Finish,
    Meter,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
)
from tokenwell.protocol.render import CompletionBuilder, Identity, StreamRenderer
from tokenwell.protocol.sse import SSEDecoder

IDENT = Identity(model="m", system_fingerprint="fp_x", id="chatcmpl-1", created=1)


def chunks(data: bytes) -> list[dict]:
    return [orjson.loads(e.data) for e in SSEDecoder().feed(data)]


def test_text_stream_has_role_chunk_then_content_then_finish() -> None:
    r = StreamRenderer(IDENT, include_usage=False)
    out = chunks(
        r.render(TextDelta(0, "Hi")) + r.render(TextDelta(0, "!")) + r.render(Finish(0, "stop"))
    )
    assert [c["choices"][0]["delta"] for c in out] == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {"content": "!"},
        {},
    ]
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in out)
    first = out[0]
    assert list(first) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert list(first["choices"][0]) == ["index", "delta", "logprobs", "finish_reason"]


def test_include_usage_puts_null_usage_on_every_chunk_and_a_final_usage_chunk() -> None:
    r = StreamRenderer(IDENT, include_usage=True)
    body = r.render(TextDelta(0, "a")) + r.render(Finish(0, "length"))
    body += r.usage(Meter(prompt_tokens=3, cached_tokens=1, completion_tokens=2))
    out = chunks(body)
    assert all(c["usage"] is None for c in out[:-1])
    assert out[-1]["choices"] == []
    assert out[-1]["object"] == "chat.completion.chunk"
    assert out[-1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_tool_call_sends_id_type_and_name_once() -> None:
    r = StreamRenderer(IDENT, include_usage=False)
    body = r.render(ToolCallStart(0, 0, "call_1", "get_weather"))
    body += r.render(ToolCallArguments(0, 0, '{"ci'))
    body += r.render(ToolCallArguments(0, 0, 'ty": "x"}'))
    body += r.render(Finish(0, "tool_calls"))
    out = chunks(body)
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert out[1]["choices"][0]["delta"]["tool_calls"] == [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    assert out[2]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "function": {"arguments": '{"ci'}}
    ]
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_each_choice_gets_its_own_role_chunk() -> None:
    r = StreamRenderer(IDENT, include_usage=False)
    out = chunks(r.render(TextDelta(1, "b")) + r.render(TextDelta(0, "a")))
    assert [c["choices"][0]["index"] for c in out] == [1, 1, 0, 0]


def test_error_event_is_the_openai_error_shape() -> None:
    out = chunks(StreamRenderer(IDENT, False).render(Failed("boom", "x")))
    assert out == [
        {"error": {"message": "boom", "type": "server_error", "param": None, "code": "x"}}
    ]


def test_completion_builder_folds_text_calls_and_logprobs() -> None:
    b = CompletionBuilder(IDENT, n=2, logprobs=True)
    entry = {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}
    b.add(TextDelta(0, "a", (entry,)))
    b.add(Finish(0, "stop"))
    b.add(ToolCallStart(1, 0, "call_1", "f"))
    b.add(ToolCallArguments(1, 0, "{}"))
    b.add(Finish(1, "tool_calls"))
    done = b.build(Meter(1, 0, 2))
    assert done["object"] == "chat.completion"
    first, second = done["choices"]
    assert first["message"] == {"role": "assistant", "content": "a", "refusal": None}
    assert first["logprobs"]["content"] == [entry]
    assert second["message"]["content"] is None
    assert second["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert done["usage"]["total_tokens"] == 3
