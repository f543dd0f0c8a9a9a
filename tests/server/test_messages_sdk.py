"""The official anthropic SDK against a real server: the scripted engine, and a few
tests on the real embedded model (``slow``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import anthropic
import orjson
import pytest

from tests.support import MASTER, Server, ledger_row


def client(server: Server, key: str = MASTER, bearer: bool = False) -> anthropic.Anthropic:
    if bearer:  # what SDK 2.x does with auth_token
        return anthropic.Anthropic(base_url=server.base, auth_token=key, max_retries=0)
    return anthropic.Anthropic(base_url=server.base, api_key=key, max_retries=0)


def script(**plan: object) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "!script " + orjson.dumps(plan).decode()}]


WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def test_create(scripted_server: Server) -> None:
    message = client(scripted_server).messages.create(
        model="scripted", max_tokens=32, messages=[{"role": "user", "content": "Hello there"}]
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == "You said: Hello there"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 8 and message.usage.output_tokens == 4


def test_create_with_bearer_auth(scripted_server: Server) -> None:
    message = client(scripted_server, bearer=True).messages.create(
        model="scripted", max_tokens=8, messages=[{"role": "user", "content": "x"}]
    )
    assert message.stop_reason == "end_turn"


def test_create_stream_true(scripted_server: Server) -> None:
    stream = client(scripted_server).messages.create(
        model="scripted",
        max_tokens=32,
        messages=[{"role": "user", "content": "Hello there"}],
        stream=True,
    )
    kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds


def test_stream_helper_text_and_final_message(scripted_server: Server) -> None:
    with client(scripted_server).messages.stream(
        model="scripted",
        max_tokens=32,
        system="Be brief.",
        messages=script(tokens=["Ni", "ce ", "to ", "meet ", "you."]),
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Nice to meet you."
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.output_tokens == 5
    assert final.stop_reason == "end_turn"


def test_stop_sequence(scripted_server: Server) -> None:
    message = client(scripted_server).messages.create(
        model="scripted",
        max_tokens=32,
        stop_sequences=["END", "five"],
        messages=script(text="one two three four five six"),
    )
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "five"
    assert message.content[0].text == "one two three four "  # type: ignore[union-attr]


def test_tool_use_over_two_turns(scripted_server: Server) -> None:
    sdk = client(scripted_server)
    with sdk.messages.stream(
        model="scripted",
        max_tokens=64,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        messages=script(
            text="Checking.",
            tool_calls=[{"name": "get_weather", "chunks": ['{"ci', 'ty": "Os', 'lo"}']}],
        ),
    ) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    call = first.content[-1]
    assert call.type == "tool_use" and call.input == {"city": "Oslo"}
    second = sdk.messages.create(
        model="scripted",
        max_tokens=64,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            *script(text="x", tool_calls=[{"name": "get_weather", "arguments": "{}"}]),
            {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "4 degrees"},
                    {"type": "text", "text": "And now?"},
                ],
            },
        ],
    )
    assert second.content[0].text == "You said: And now?"  # type: ignore[union-attr]


def test_count_tokens(scripted_server: Server) -> None:
    counted = client(scripted_server).messages.count_tokens(
        model="scripted", messages=[{"role": "user", "content": "Hello there"}]
    )
    assert counted.input_tokens == 8


def test_ledger_row_and_usage_agree(scripted_server: Server) -> None:
    raw = client(scripted_server).messages.with_raw_response.create(
        model="scripted", max_tokens=32, messages=[{"role": "user", "content": "Hello there"}]
    )
    message = raw.parse()
    row = ledger_row(scripted_server, raw.headers["x-request-id"])
    assert row["status"] == "completed"
    assert row["prompt_tokens"] == message.usage.input_tokens
    assert row["completion_tokens"] == message.usage.output_tokens


# ---------------------------------------------------------------- every error type


def test_bad_request(scripted_server: Server) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client(scripted_server).messages.create(
            model="scripted",
            max_tokens=0,
            messages=[{"role": "user", "content": "x"}],
        )
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_authentication(scripted_server: Server) -> None:
    with pytest.raises(anthropic.AuthenticationError) as info:
        client(scripted_server, key="sk-wrong").messages.create(
            model="scripted", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_permission(scripted_server: Server) -> None:
    key = scripted_server.create_key(models=["scripted-64"])["key"]
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        client(scripted_server, key=key).messages.create(
            model="scripted", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.body["error"]["type"] == "permission_error"  # type: ignore[index]


def test_not_found(scripted_server: Server) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client(scripted_server).messages.create(
            model="claude-nope", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_request_too_large(scripted_server: Server) -> None:
    with pytest.raises(anthropic.APIStatusError) as info:
        client(scripted_server).messages.create(
            model="scripted",
            max_tokens=5,
            messages=[{"role": "user", "content": "x" * (9 * 1024 * 1024)}],
        )
    assert info.value.status_code == 413
    assert info.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]


def test_rate_limit_with_retry_after(scripted_server: Server) -> None:
    sdk = client(scripted_server, key=scripted_server.create_key(rpm=1)["key"])
    sdk.messages.create(model="scripted", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.RateLimitError) as info:
        sdk.messages.create(
            model="scripted", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_overloaded(scripted_server: Server) -> None:
    # scripted-tiny runs one request and queues one: with both taken, the next is a 529.
    sdk = client(scripted_server)
    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            try:
                sdk.messages.create(
                    model="scripted-tiny",
                    max_tokens=40,
                    messages=[{"role": "user", "content": "x"}],
                )
            except anthropic.OverloadedError:
                time.sleep(0.01)

    busy = [threading.Thread(target=keep_busy) for _ in range(3)]
    for thread in busy:
        thread.start()
    try:
        with pytest.raises(anthropic.OverloadedError) as info:
            for _ in range(200):
                sdk.messages.create(
                    model="scripted-tiny", max_tokens=1, messages=[{"role": "user", "content": "x"}]
                )
                time.sleep(0.02)
    finally:
        stop.set()
        for thread in busy:
            thread.join()
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert info.value.response.headers["retry-after"]


def test_api_error(scripted_server: Server) -> None:
    with pytest.raises(anthropic.InternalServerError) as info:
        client(scripted_server).messages.create(
            model="scripted", max_tokens=5, messages=script(crash=True)
        )
    assert info.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_error_event_mid_stream(scripted_server: Server) -> None:
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client(scripted_server).messages.stream(
            model="scripted", max_tokens=32, messages=script(text="a b c d", fail_after=2)
        ) as stream,
    ):
        for _ in stream.text_stream:
            pass
    assert "failed mid-stream" in str(info.value)


# ---------------------------------------------------------------- the real model

MODEL = "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_real_model_create_and_stream(model_server: Server) -> None:
    sdk = client(model_server)
    args: dict[str, Any] = dict(
        model=MODEL,
        max_tokens=16,
        extra_body={"temperature": 0},  # not a parameter of SDK 2.x's create
        messages=[{"role": "user", "content": "Count to five."}],
    )
    message = sdk.messages.create(**args)
    assert message.stop_reason in ("end_turn", "max_tokens")
    with sdk.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (  # type: ignore[operator]
        message.usage.input_tokens + message.usage.cache_read_input_tokens  # type: ignore[operator]
    )
    counted = sdk.messages.count_tokens(model=MODEL, messages=args["messages"])
    assert counted.input_tokens == (
        message.usage.input_tokens + message.usage.cache_read_input_tokens  # type: ignore[operator]
    )


@pytest.mark.slow
def test_real_model_tool_use_over_two_turns(model_server: Server) -> None:
    sdk = client(model_server)
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = sdk.messages.create(
        model=MODEL,
        max_tokens=64,
        extra_body={"temperature": 0},  # not a parameter of SDK 2.x's create
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=ask,  # type: ignore[arg-type]
    )
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert isinstance(call.input, dict) and isinstance(call.input.get("city"), str)
    second = sdk.messages.create(
        model=MODEL,
        max_tokens=24,
        extra_body={"temperature": 0},  # not a parameter of SDK 2.x's create
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "none"},
        messages=[
            *ask,  # type: ignore[list-item]
            {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "4 °C"}],
            },
        ],
    )
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert second.content and second.content[0].type == "text"
