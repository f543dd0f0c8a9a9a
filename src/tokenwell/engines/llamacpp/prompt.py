"""From a chat request to the prompt the model sees and the grammar it must follow.

| tool_choice        | response_format   | grammar                                   |
|--------------------|-------------------|-------------------------------------------|
| none / no tools    | text              | none                                      |
| none / no tools    | json_*            | the JSON (schema)                         |
| auto               | text              | tool calls, lazily: from ``<tool_call>`` on |
| auto               | json_*            | tool calls or the JSON (schema)           |
| required / a name  | any               | tool calls (of that name)                 |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenwell.engines.llamacpp.grammar import CALL_OPEN, response_grammar, tools_grammar
from tokenwell.engines.llamacpp.model import Model
from tokenwell.engines.llamacpp.toolcalls import template_messages
from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import ChatRequest, NamedToolChoice


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    grammar: str | None = None
    # A lazy grammar starts constraining once this text is generated.
    trigger: str | None = None
    # Generated text is parsed for tool calls.
    tools: bool = False


def render_prompt(model: Model, request: ChatRequest) -> Rendered:
    if isinstance(request.prompt, str):  # /v1/completions: the raw text, no template
        return Rendered(request.prompt)
    with_tools = bool(request.tools) and request.tool_choice != "none"
    messages = template_messages(request, with_tools)
    try:
        text = model.template.render(messages)
    except Exception as exc:  # a template's raise_exception() or a jinja error
        raise InvalidRequest(
            f"Invalid 'messages': the model's chat template rejected them: {exc}",
            param="messages",
            code="invalid_value",
        ) from exc
    fmt = request.response_format
    structured: tuple[str, dict[str, Any] | None] | None = None
    if fmt is not None and fmt.type != "text":
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        structured = (fmt.type, schema)
    if not with_tools:
        if structured is None:
            return Rendered(text)
        kind, schema = structured
        return Rendered(text, response_grammar(kind, schema, "response_format.json_schema.schema"))
    choice = request.tool_choice
    only = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if choice == "auto" and structured is None:
        grammar = tools_grammar(request.tools, only=None, parallel=request.parallel_tool_calls)
        return Rendered(text, grammar, trigger=CALL_OPEN.strip(), tools=True)
    grammar = tools_grammar(
        request.tools,
        only=only,
        parallel=request.parallel_tool_calls and only is None,
        text_alternative=structured if choice == "auto" else None,
    )
    return Rendered(text, grammar, tools=True)
