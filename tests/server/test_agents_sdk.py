"""The OpenAI Agents SDK (``openai-agents``): its Runner on tokenwell's Responses API.

Tracing is off (it would post traces to OpenAI). On the scripted engine the
model's turn is scripted (a function call the Runner executes); on the real
model (``slow``) the agent calls its tool and answers with the tool's result.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.support import Server

agents = pytest.importorskip("agents")

from agents import (  # noqa: E402
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)

set_tracing_disabled(True)

CALLS: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    CALLS.append(city)
    return f"It is sunny in {city}."


def run(server: Server, model: str, prompt: str, **agent: Any) -> Any:
    client = server.async_client()
    agent_model = OpenAIResponsesModel(model=model, openai_client=client)

    async def go() -> Any:
        try:
            return await Runner.run(
                Agent(name="weather", model=agent_model, tools=[get_weather], **agent),
                prompt,
                max_turns=4,
                run_config=RunConfig(tracing_disabled=True),
            )
        finally:
            await client.close()

    return asyncio.run(go())


def test_runner_calls_a_function_tool_on_the_scripted_engine(scripted_server: Server) -> None:
    CALLS.clear()
    script = {"tool_calls": [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]}
    result = run(
        scripted_server,
        "scripted",
        "!script " + orjson.dumps(script).decode(),
        tool_use_behavior="stop_on_first_tool",
    )
    assert CALLS == ["Oslo"]
    assert result.final_output == "It is sunny in Oslo."
    (response,) = result.raw_responses
    assert response.usage.output_tokens > 0
    assert response.usage.input_tokens > 0


@pytest.mark.slow
def test_runner_with_a_function_tool_on_the_real_model(model_server: Server) -> None:
    CALLS.clear()
    result = run(
        model_server,
        "SmolLM2-135M-Instruct",
        "What is the weather in Paris?",
        instructions="Use the get_weather tool, then tell the user what it said.",
        # The first turn must call the tool; the SDK lets the model answer after.
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=256),
    )
    assert CALLS, "the tool was called"
    assert isinstance(result.final_output, str) and result.final_output
    assert len(result.raw_responses) >= 2  # a call, then (after its output) an answer
