"""The openai SDK's Responses methods on the real embedded model (SmolLM2-135M)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from tests.support import Server, ledger_row

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


class City(BaseModel):
    name: str
    population: int


def test_create_stream_and_background(model_server: Server) -> None:
    client = model_server.client()
    plain = client.responses.create(
        model=MODEL, input="Say hello.", max_output_tokens=200, temperature=0
    )
    assert plain.status == "completed"  # (the helper needs response.completed)
    assert plain.output_text
    assert plain.usage is not None and 0 < plain.usage.output_tokens <= 200
    # Streamed with the same seedless greedy settings: the same text, usage at the end.
    with client.responses.stream(
        model=MODEL, input="Say hello.", max_output_tokens=200, temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == plain.output_text
    assert final.usage is not None and final.usage.output_tokens == plain.usage.output_tokens
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="Count to five.", max_output_tokens=16, background=True
    )
    started = raw.parse()
    assert started.status == "queued"
    events = list(client.responses.retrieve(started.id, stream=True, starting_after=0))
    assert events[0].sequence_number == 1
    assert events[-1].type in ("response.completed", "response.incomplete")
    done = client.responses.retrieve(started.id)
    assert done.usage is not None
    row = ledger_row(model_server, raw.headers["x-request-id"])
    assert row["completion_tokens"] == done.usage.output_tokens


def test_logprobs_when_included(model_server: Server) -> None:
    response = model_server.client().responses.create(
        model=MODEL,
        input="Say yes.",
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        max_output_tokens=5,
    )
    (part,) = response.output[0].content  # type: ignore[union-attr]
    assert response.usage is not None
    # Every text token has its logprobs; a response that ended by itself also
    # generated (and is billed for) the end token, which has no text.
    ended = 1 if response.status == "completed" else 0
    assert len(part.logprobs) == response.usage.output_tokens - ended  # type: ignore[union-attr]
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)  # type: ignore[union-attr]


def test_parse_with_a_pydantic_text_format(model_server: Server) -> None:
    parsed = model_server.client().responses.parse(
        model=MODEL,
        input="Name one big city and its population.",
        text_format=City,
        max_output_tokens=60,
        temperature=0,
    )
    # Grammar-enforced: whatever the tiny model says, it is a City.
    assert isinstance(parsed.output_parsed, City)


def test_function_call_then_answer_with_previous_response_id(model_server: Server) -> None:
    client = model_server.client()
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
    first = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[tool],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[  # every call answered (it may have made several)
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}
            for call in calls
        ],
        tools=[tool],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=24,
        temperature=0,
    )
    assert second.output_text
    assert second.usage is not None
    # The earlier turns went in: counted the same way, the input alone is shorter.
    answers = [
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}
        for call in calls
    ]
    counted = client.responses.input_tokens.count(
        model=MODEL,
        previous_response_id=first.id,
        input=answers,  # type: ignore[arg-type]
        tools=[tool],  # type: ignore[list-item]
        tool_choice="none",
    )
    assert counted.input_tokens == second.usage.input_tokens
    alone = client.responses.input_tokens.count(
        model=MODEL,
        input="Sunny",
        tools=[tool],  # type: ignore[list-item]
        tool_choice="none",
    )
    assert alone.input_tokens < counted.input_tokens
