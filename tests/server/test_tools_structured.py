"""Tool calls and structured output on the real embedded model, through the SDK."""

from __future__ import annotations

import openai
import orjson
import pytest
from pydantic import BaseModel, Field

from tests.support import Server, sse_events

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    city: str = Field(max_length=20)
    temperature: int
    sunny: bool


# A call of bounded length, so that a sampled call always ends within
# max_tokens (a free-form object let the model add keys until it ran out).
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 40}},
    "required": ["timezone"],
    "additionalProperties": False,
}


class GetWeather(BaseModel):
    """Get the current weather for a city."""

    city: str = Field(max_length=30)
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


def test_parse_with_a_pydantic_response_format(model_server: Server) -> None:
    done = model_server.client().chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Weather, max_tokens=200, seed=1
    )
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, Weather) and len(parsed.city) <= 20
    assert done.choices[0].finish_reason == "stop"


def test_json_object_mode_gives_a_json_object(model_server: Server) -> None:
    # A free-form object from a sampled 135M model sometimes runs to max_tokens
    # (1 seed in 20 at 600 tokens, measured): then it is cut, as OpenAI's is.
    # Every answer that ends is a JSON object, and most end.
    stopped = 0
    for seed in (2, 3, 4):
        done = model_server.client().chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={"type": "json_object"},
            max_tokens=600,
            seed=seed,
        )
        choice = done.choices[0]
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            stopped += 1
            assert isinstance(orjson.loads(choice.message.content or ""), dict)
    assert stopped >= 2


def test_required_tool_calls_stream_through_the_sdk_helper(model_server: Server) -> None:
    client = model_server.client()
    tool = openai.pydantic_function_tool(GetWeather)
    with client.chat.completions.stream(
        model=MODEL,
        messages=ASK,
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,  # one call, of bounded length: it always ends
        max_tokens=200,
        seed=3,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in kinds
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.function.name == "GetWeather"
        assert isinstance(call.function.parsed_arguments, GetWeather)


def test_a_named_tool_choice_calls_exactly_that_function(model_server: Server) -> None:
    tools = [
        {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
        openai.pydantic_function_tool(GetWeather),
    ]
    done = model_server.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=tools,
        max_tokens=200,
        seed=4,
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    calls = done.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]
    assert isinstance(orjson.loads(calls[0].function.arguments), dict)
    assert done.choices[0].finish_reason == "tool_calls"


def test_auto_lets_a_started_call_be_constrained(model_server: Server) -> None:
    # SmolLM2-135M never starts a Hermes call on its own: nudge it toward the
    # tokens of "<tool_call>"; from there the grammar alone must keep it valid.
    nudge = {"44": 20, "19324": 20, "79": 20, "4350": 20, "46": 20}
    done = model_server.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="auto",
        logit_bias=nudge,
        max_tokens=400,
        seed=1,
        parallel_tool_calls=False,
    )
    calls = done.choices[0].message.tool_calls or []
    assert calls and done.choices[0].finish_reason == "tool_calls"
    GetWeather.model_validate_json(calls[0].function.arguments)
    plain = model_server.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="auto",
        max_tokens=20,
        seed=1,
    )  # without the nudge this model answers in text
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_raw_fragment_order_of_streamed_calls(model_server: Server) -> None:
    with model_server.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": ASK,
                "stream": True,
                "max_tokens": 200,
                "seed": 5,
                "tools": [openai.pydantic_function_tool(GetWeather)],
                "tool_choice": "required",
                "parallel_tool_calls": False,
            },
        )
    chunks = [orjson.loads(p) for p in sse_events(r.content)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert all(len(c) == 1 for c in calls)  # one entry per chunk
    first, rest = calls[0][0], [c[0] for c in calls[1:]]
    assert set(first) == {"index", "id", "type", "function"}
    assert first["function"] == {"name": "GetWeather", "arguments": ""}
    assert rest and all(set(c) == {"index", "function"} for c in rest)
    assert all(set(c["function"]) == {"arguments"} for c in rest)
    arguments = "".join(c["function"]["arguments"] for c in rest)
    GetWeather.model_validate_json(arguments)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_multi_turn_conversation_with_tool_results(model_server: Server) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "GetWeather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    done = model_server.client().chat.completions.create(
        model=MODEL,
        max_tokens=30,
        seed=6,
        tools=[openai.pydantic_function_tool(GetWeather)],
        messages=[
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        ],
    )
    assert done.choices[0].message.content or done.choices[0].message.tool_calls


def test_unsupported_schema_is_a_400_naming_the_part(model_server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        model_server.client().chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {
                        "type": "object",
                        "properties": {"n": {"type": "integer", "minimum": 1}},
                    },
                },
            },
        )
    assert info.value.param == "response_format.json_schema.schema.properties.n.minimum"
    with pytest.raises(openai.BadRequestError) as info:
        model_server.client().chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "patternProperties": {}},
                    },
                }
            ],
        )
    assert info.value.param == "tools.[0].function.parameters.patternProperties"
