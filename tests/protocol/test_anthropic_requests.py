"""The Messages request → the one ChatRequest (protocol.anthropic)."""

from __future__ import annotations

from typing import Any

import pytest

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.anthropic import validate_messages_request


def body(**fields: Any) -> dict[str, Any]:
    fields.setdefault("model", "m")
    fields.setdefault("max_tokens", 100)
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return fields


def test_system_blocks_tools_and_turns() -> None:
    parsed = validate_messages_request(
        body(
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            tools=[{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            stop_sequences=["\n\nHuman:"],
            metadata={"user_id": "u1"},
            top_k=5,
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "go"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "…", "signature": "s"},
                        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "no"}],
                            "is_error": True,
                        },
                        {"type": "text", "text": "again"},
                    ],
                },
            ],
        )
    )
    chat = parsed.chat
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool", "user"]
    assert chat.messages[0].content == "Be brief."
    assert chat.messages[2].tool_calls[0].arguments == '{"a":1}'
    assert chat.messages[3].content == "Error: no"
    assert chat.messages[3].tool_call_id == "toolu_1"
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.stop == ("\n\nHuman:",) and chat.user == "u1"
    assert chat.max_tokens == 100 and parsed.top_k == 5


def test_tool_choice_by_name_and_none() -> None:
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    named = validate_messages_request(body(tools=tools, tool_choice={"type": "tool", "name": "f"}))
    assert named.chat.tool_choice.function.name == "f"  # type: ignore[union-attr]
    none = validate_messages_request(body(tools=tools, tool_choice={"type": "none"}))
    assert none.chat.tool_choice == "none"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages.[0].content.[0].type",
        ),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools.[0].type"),
        ({"tool_choice": {"type": "tool", "name": "g"}}, "tool_choice.name"),
        ({"messages": []}, "messages"),
        ({"mcp_servers": [{}]}, "mcp_servers"),
        ({"temperature": 1.5}, "temperature"),
        ({"tools": [{"name": "f", "input_schema": []}]}, "tools.[0].input_schema"),
    ],
)
def test_refused_naming_the_field(fields: dict[str, Any], param: str) -> None:
    data = body(**fields)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(InvalidRequest) as info:
        validate_messages_request(data)
    assert info.value.param == param
