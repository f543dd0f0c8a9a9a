"""The SDK's helpers against the scripted engine: fast protocol checks."""

from __future__ import annotations

import openai
import orjson
from pydantic import BaseModel

from tests.support import Server


class Weather(BaseModel):
    city: str
    temperature: int


class GetWeather(BaseModel):
    city: str


def scripted(**script: object) -> list[dict[str, str]]:
    return [{"role": "user", "content": "!script " + orjson.dumps(script).decode()}]


def test_parse_with_a_pydantic_model(scripted_server: Server) -> None:
    done = scripted_server.client().chat.completions.parse(
        model="scripted",
        response_format=Weather,
        messages=scripted(tokens=['{"city": ', '"Oslo", ', '"temperature": ', "4}"]),
    )
    assert done.choices[0].message.parsed == Weather(city="Oslo", temperature=4)


def test_stream_helper_with_tools_and_final_completion(scripted_server: Server) -> None:
    client = scripted_server.client()
    with client.chat.completions.stream(
        model="scripted",
        tools=[openai.pydantic_function_tool(GetWeather)],
        messages=scripted(
            tool_calls=[
                {"name": "GetWeather", "chunks": ['{"ci', 'ty": "Os', 'lo"}']},
                {"name": "GetWeather", "arguments": '{"city": "Rome"}'},
            ]
        ),
    ) as stream:
        deltas = [
            e.arguments_delta for e in stream if e.type == "tool_calls.function.arguments.delta"
        ]
        final = stream.get_final_completion()
    # A call's first fragment carries "arguments": "" (CONTRACT.md): an empty delta.
    assert [d for d in deltas if d] == ['{"ci', 'ty": "Os', 'lo"}', '{"city": "Rome"}']
    calls = final.choices[0].message.tool_calls or []
    assert [c.function.parsed_arguments for c in calls] == [
        GetWeather(city="Oslo"),
        GetWeather(city="Rome"),
    ]
    assert [c.function.name for c in calls] == ["GetWeather", "GetWeather"]
    assert final.choices[0].finish_reason == "tool_calls"


def test_async_stream_with_usage(scripted_server: Server) -> None:
    import asyncio

    async def go() -> tuple[str, int]:
        client = scripted_server.async_client()
        stream = await client.chat.completions.create(
            model="scripted-64",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=10,
        )
        text, used = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            elif chunk.usage:
                used = chunk.usage.completion_tokens
        await client.close()
        return text, used

    text, used = asyncio.run(go())
    assert text == "".join(f" w{i}" for i in range(10)) and used == 10
