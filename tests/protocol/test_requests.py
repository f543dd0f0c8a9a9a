from __future__ import annotations

from typing import Any

import orjson
import pytest

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import parse_chat_request, validate_chat_request

USER = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER, **fields}


def error(data: Any) -> InvalidRequest:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(raw)
    return info.value


def test_minimal_request_gets_openai_defaults() -> None:
    req = validate_chat_request(body())
    assert (req.n, req.temperature, req.top_p, req.stream, req.include_usage) == (
        1,
        1.0,
        1.0,
        False,
        False,
    )
    assert req.messages[0].content == "hi"


def test_text_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = validate_chat_request(body(messages=[{"role": "user", "content": parts}]))
    assert req.messages[0].content == "a\nb"


@pytest.mark.parametrize(
    ("data", "param", "code", "words"),
    [
        (b"{not json", None, "invalid_json", "parse the JSON"),
        (b"[1]", None, "invalid_type", "expected a JSON object"),
        ({"messages": USER}, "model", "missing_required_parameter", "Missing required"),
        (body(temperature=200), "temperature", "decimal_above_max_value", "<= 2, got 200"),
        (body(temperature="hot"), "temperature", "invalid_type", "expected a number"),
        (body(top_p=-0.5), "top_p", "decimal_below_min_value", ">= 0"),
        (body(n=0), "n", "integer_below_min_value", ">= 1"),
        (body(max_tokens=1.5), "max_tokens", "invalid_type", "an integer"),
        (body(max_completion_tokens=0), "max_completion_tokens", "integer_below_min_value", ">= 1"),
        (body(top_logprobs=21, logprobs=True), "top_logprobs", "integer_above_max_value", "<= 20"),
        (body(top_logprobs=2), "top_logprobs", "invalid_value", "logprobs"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length", "at most 4"),
        (body(stop=""), "stop", "invalid_value", "cannot be empty"),
        (body(foo=1), "foo", "unknown_parameter", "Unrecognized request argument"),
        (body(messages=[]), "messages", "empty_array", "empty array"),
        (body(stream_options={"include_usage": True}), "stream_options", "invalid_value", "stream"),
        (body(stream=True, stream_options={"x": 1}), "stream_options.x", "unknown_parameter", ""),
        (
            body(messages=[{"role": "robot", "content": "x"}]),
            "messages.[0].role",
            "invalid_value",
            "robot",
        ),
        (body(messages=[{"content": "x"}]), "messages.[0].role", "missing_required_parameter", ""),
        (
            body(messages=[{"role": "user"}]),
            "messages.[0].content",
            "missing_required_parameter",
            "",
        ),
        (
            body(messages=[{"role": "user", "content": 5}]),
            "messages.[0].content",
            "invalid_type",
            "",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages.[0].content.[0].type",
            "invalid_value",
            "only text",
        ),
        (body(messages=["hi"]), "messages.[0]", "invalid_type", "an object"),
        (body(metadata={"k": 1}), "metadata.k", "invalid_type", "a string"),
        (body(logit_bias={"x": 1}), "logit_bias", "invalid_value", "token ids"),
        (body(logit_bias={"5": 101}), "logit_bias.5", "decimal_above_max_value", "<= 100"),
        (body(max_tokens=5, max_completion_tokens=6), "max_tokens", "invalid_value", "either"),
        (body(tool_choice="required"), "tool_choice", "invalid_value", "at least one tool"),
        (body(response_format={"type": "xml"}), "response_format.type", "invalid_value", "xml"),
    ],
)
def test_bad_input_names_the_parameter(data: Any, param: str | None, code: str, words: str) -> None:
    err = error(data)
    assert err.status == 400
    assert err.param == param
    assert err.code == code
    assert words in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_tool_message_must_answer_an_earlier_call() -> None:
    err = error(body(messages=[*USER, {"role": "tool", "tool_call_id": "x", "content": "r"}]))
    assert err.param == "messages.[1]"


def test_tool_calls_must_all_be_answered_before_moving_on() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [*USER, {"role": "assistant", "tool_calls": [call]}, *USER]
    err = error(body(messages=messages))
    assert err.param == "messages.[1]" and "c1" in err.message
    answered = [*messages[:2], {"role": "tool", "tool_call_id": "c1", "content": "ok"}, *USER]
    assert len(validate_chat_request(body(messages=answered)).messages) == 4


def test_tool_names_are_checked() -> None:
    tools = [{"type": "function", "function": {"name": "bad name!"}}]
    assert error(body(tools=tools)).param == "tools.[0].function.name"
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    assert error(body(tools=many)).code == "array_above_max_length"


def test_named_tool_choice_must_exist() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    choice = {"type": "function", "function": {"name": "g"}}
    assert error(body(tools=tools, tool_choice=choice)).param == "tool_choice"


def test_stop_duplicates_are_dropped_and_kept_in_order() -> None:
    assert validate_chat_request(body(stop=["b", "a", "b"])).stop == ("b", "a")


def test_the_placement_hint_is_the_cache_key_else_the_end_user() -> None:
    base: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert validate_chat_request(base).cache_key is None
    alice = validate_chat_request({**base, "user": "alice"})
    assert alice.cache_key == "alice" and alice.user == "alice"
    # safety_identifier is OpenAI's newer name for the end user.
    both = validate_chat_request({**base, "user": "alice", "safety_identifier": "bob"})
    assert both.user == "bob" and both.cache_key == "bob"
    keyed = validate_chat_request({**base, "user": "alice", "prompt_cache_key": "conv-1"})
    assert keyed.cache_key == "conv-1" and keyed.user == "alice"
    with pytest.raises(InvalidRequest) as info:
        validate_chat_request({**base, "prompt_cache_key": "k" * 1025})
    assert info.value.param == "prompt_cache_key"
    with pytest.raises(InvalidRequest) as info:
        validate_chat_request({**base, "safety_identifier": 7})
    assert info.value.param == "safety_identifier"
