"""The ``POST /v1/messages`` request (Anthropic Messages API) → the one ``ChatRequest``.

Parsed in two stages, as chat completions are: the body by one strict model
(an error names the field, ``messages.[0].content.[1].type``), each message's
content blocks by the model of their type. The result is the chat completion
request that means the same thing, validated as every chat request is, so
engines (and an upstream, which is sent that body) never know which API asked.

Accepted and ignored, because they cannot apply to these models and do not
change the result: ``thinking`` (no thinking blocks from a model that does not
think), ``cache_control`` (the prompt cache is automatic), ``context_management``,
``output_config``, ``service_tier``, ``top_k`` (no engine samples with it),
``thinking``/``redacted_thinking`` blocks of earlier turns. Refused with a 400
naming the field: what would change the result (``image``, ``document``,
server tools, ``container``, ``mcp_servers``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import ChatRequest, decode_object, validate_chat_request
from tokenwell.protocol.schemas import check_schema_shape
from tokenwell.protocol.validation import first_error, json_type_name, one_of


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Lenient(BaseModel):
    """Blocks and tools: fields a newer client adds (``cache_control``, ``citations``) pass."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class _MessagesMetadata(_Strict):
    user_id: Annotated[str, Field(max_length=256)] | None = None


class _MessagesToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _Tool(_Lenient):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    strict: bool | None = None


Text = one_of(string=str, array=list[dict[str, Any]])
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]

# Fields a client may send that change nothing here (see the module docstring).
IGNORED = ("thinking", "context_management", "output_config", "service_tier")
# Fields that would change the result and that tokenwell cannot honour.
REFUSED = ("container", "mcp_servers")


class _MessagesBody(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)]
    messages: list[dict[str, Any]]
    system: Text | None = None
    stop_sequences: Annotated[list[str], Field(max_length=16)] | None = None
    stream: bool = False
    temperature: Probability | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: _MessagesToolChoice | None = None
    metadata: _MessagesMetadata | None = None
    thinking: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    service_tier: str | None = None
    container: Any = None
    mcp_servers: Any = None


class _TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class _ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1, max_length=256)]
    name: str
    input: dict[str, Any]


class _ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1, max_length=256)]
    content: Text | None = None
    is_error: bool | None = None


class _Message(_Strict):
    role: Literal["user", "assistant", "system"]
    content: Text


_BLOCKS: dict[str, type[_Lenient]] = {
    "text": _TextBlock,
    "tool_use": _ToolUseBlock,
    "tool_result": _ToolResultBlock,
}
# Blocks of earlier turns that carry nothing a model without thinking can use.
_DROPPED = ("thinking", "redacted_thinking")
# Blocks that would change the result: refused by name.
_UNSUPPORTED = ("image", "document", "search_result", "container_upload")


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """A validated Messages request: the chat request it means, and what only this API says."""

    chat: ChatRequest
    max_tokens: int
    top_k: int | None = None


def _validate(model: type[BaseModel], value: Any, where: tuple[int | str, ...]) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise first_error(exc, prefix=where) from exc


def _invalid(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _blocks(content: str | list[dict[str, Any]], where: tuple[int | str, ...]) -> list[Any]:
    """Content as validated blocks (a string is one text block)."""
    if isinstance(content, str):
        return [_TextBlock(type="text", text=content)]
    out: list[Any] = []
    for j, raw in enumerate(content):
        place = (*where, j)
        param = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in place)
        if not isinstance(raw, dict):
            raise _invalid(
                param,
                f"Invalid type for '{param}': expected a content block (an object), "
                f"but got {json_type_name(raw)} instead.",
                "invalid_type",
            )
        kind = raw.get("type")
        if kind in _DROPPED:
            continue
        model = _BLOCKS.get(kind) if isinstance(kind, str) else None
        if model is None:
            why = (
                "is not supported by this server's models"
                if kind in _UNSUPPORTED
                else "is not a content block type this server accepts"
            )
            raise _invalid(
                f"{param}.type",
                f"Invalid '{param}.type': {kind!r} {why}; send text, tool_use and "
                "tool_result blocks.",
            )
        out.append(_validate(model, raw, place))
    return out


def _text_of(blocks: list[Any], param: str) -> str:
    texts = []
    for block in blocks:
        if not isinstance(block, _TextBlock):
            raise _invalid(param, f"Invalid '{param}': only text blocks are allowed here.")
        texts.append(block.text)
    return "\n".join(texts)


def _messages(body: _MessagesBody) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if body.system is not None:
        system = _text_of(_blocks(body.system, ("system",)), "system")
        out.append({"role": "system", "content": system})
    if not body.messages:
        raise _invalid("messages", "Invalid 'messages': at least one message is required.")
    for i, raw in enumerate(body.messages):
        msg: _Message = _validate(_Message, raw, ("messages", i))
        where = ("messages", i, "content")
        param = f"messages.[{i}].content"
        blocks = _blocks(msg.content, where)
        if msg.role == "system":  # Claude Code sends its reminders so
            out.append({"role": "system", "content": _text_of(blocks, param)})
            continue
        texts = [b.text for b in blocks if isinstance(b, _TextBlock)]
        if msg.role == "assistant":
            calls = [
                {
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": orjson.dumps(b.input).decode()},
                }
                for b in blocks
                if isinstance(b, _ToolUseBlock)
            ]
            if any(isinstance(b, _ToolResultBlock) for b in blocks):
                raise _invalid(
                    param, f"Invalid '{param}': tool_result blocks belong to user turns."
                )
            message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
            if calls:
                message["tool_calls"] = calls
                if not texts:
                    message["content"] = None
            out.append(message)
            continue
        if any(isinstance(b, _ToolUseBlock) for b in blocks):
            raise _invalid(param, f"Invalid '{param}': tool_use blocks belong to assistant turns.")
        for j, block in enumerate(blocks):
            if isinstance(block, _ToolResultBlock):
                result = block.content if block.content is not None else ""
                text = _text_of(_blocks(result, (*where, j, "content")), f"{param}.[{j}].content")
                if block.is_error:
                    text = "Error: " + text
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text})
        if texts or not any(isinstance(b, _ToolResultBlock) for b in blocks):
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _tools(body: _MessagesBody) -> list[dict[str, Any]]:
    tools = []
    for i, raw in enumerate(body.tools or ()):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in (None, "custom"):
            raise _invalid(
                f"tools.[{i}].type",
                f"Invalid 'tools.[{i}].type': {kind!r} is a server tool, which this server "
                "does not run; send client tools (name, description, input_schema).",
            )
        tool: _Tool = _validate(_Tool, raw, ("tools", i))
        check_schema_shape(tool.input_schema, f"tools.[{i}].input_schema")
        # Not strict unless asked: keywords the engine cannot enforce are guidance.
        function: dict[str, Any] = {
            "name": tool.name,
            "parameters": tool.input_schema,
            "strict": bool(tool.strict),
        }
        if tool.description is not None:
            function["description"] = tool.description
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(body: _MessagesBody, tools: list[dict[str, Any]]) -> tuple[Any, bool | None]:
    choice = body.tool_choice
    if choice is None:
        return None, None
    parallel = (
        None if choice.disable_parallel_tool_use is None else not choice.disable_parallel_tool_use
    )
    if choice.type == "tool":
        names = {t["function"]["name"] for t in tools}
        if choice.name is None:
            raise _invalid(
                "tool_choice.name",
                "Missing required parameter: 'tool_choice.name'.",
                "missing_required_parameter",
            )
        if choice.name not in names:
            raise _invalid(
                "tool_choice.name",
                f"Invalid 'tool_choice.name': tool {choice.name!r} is not in 'tools'.",
            )
        return {"type": "function", "function": {"name": choice.name}}, parallel
    if choice.name is not None:
        raise _invalid(
            "tool_choice.name", "Invalid 'tool_choice.name': only allowed with type 'tool'."
        )
    if choice.type == "any" and not tools:
        raise _invalid("tool_choice", "Invalid 'tool_choice': 'any' needs at least one tool.")
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel


_TOOL_SCHEMA = re.compile(r"tools\.\[(\d+)\]\.function\.parameters")


def rename_fields(error: InvalidRequest) -> InvalidRequest:
    """An engine's 400 names the chat completion's fields; name this API's instead."""
    error.message = _TOOL_SCHEMA.sub(r"tools.[\1].input_schema", error.message)
    if error.param is not None:
        error.param = _TOOL_SCHEMA.sub(r"tools.[\1].input_schema", error.param)
    return error


def parse_messages_request(body: bytes, *, counting: bool = False) -> MessagesRequest:
    """``counting``: a ``count_tokens`` body, which has no ``max_tokens``."""
    data = decode_object(body)
    if counting:
        data = {**data, "max_tokens": data.get("max_tokens", 1), "stream": False}
    return validate_messages_request(data)


def validate_messages_request(data: dict[str, Any]) -> MessagesRequest:
    body: _MessagesBody = _validate(_MessagesBody, data, ())
    for name in REFUSED:
        if getattr(body, name) is not None:
            raise _invalid(name, f"Invalid '{name}': not supported by this server.")
    stops = body.stop_sequences or []
    for i, stop in enumerate(stops):
        if stop == "":
            raise _invalid(f"stop_sequences.[{i}]", "A stop sequence cannot be empty.")
    messages = _messages(body)
    tools = _tools(body)
    tool_choice, parallel = _tool_choice(body, tools)
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "stream": body.stream,
        "max_tokens": body.max_tokens,
    }
    if stops:
        # Chat completions allow 4 stop strings; engines take any number.
        chat["stop"] = stops[:4]
    if body.temperature is not None:
        chat["temperature"] = body.temperature
    if body.top_p is not None:
        chat["top_p"] = body.top_p
    if tools:
        chat["tools"] = tools
    if tool_choice is not None and (tools or tool_choice == "none"):
        chat["tool_choice"] = tool_choice
    if parallel is not None and tools:
        chat["parallel_tool_calls"] = parallel
    if body.metadata is not None and body.metadata.user_id is not None:
        chat["user"] = body.metadata.user_id
    try:
        request = validate_chat_request(chat)
    except InvalidRequest as exc:
        raise rename_fields(exc) from None
    if len(stops) > 4:
        request = _with_stops(request, tuple(dict.fromkeys(stops)))
    return MessagesRequest(replace(request, api="messages"), body.max_tokens, body.top_k)


def _with_stops(request: ChatRequest, stops: tuple[str, ...]) -> ChatRequest:
    raw = {**request.raw, "stop": list(stops)}
    return replace(request, stop=stops, raw=raw)
