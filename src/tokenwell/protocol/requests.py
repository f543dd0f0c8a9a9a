"""The ``POST /v1/chat/completions`` request: parsing and validation.

Everything that can be checked without a model is checked here, before the
first byte is sent (CONTRACT.md). Parsing is two-staged: the top level is one
strict pydantic model; each message is then validated by the model of its
role, so an error names ``messages.[i].field`` instead of a union's guesses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from annotated_types import MaxLen
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.schemas import check_schema_shape
from tokenwell.protocol.validation import first_error, json_type_name, one_of, require_object

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# A logit_bias key: a token id in ASCII digits (str.isdigit() also takes "²", which
# int() refuses), below 2**31 (llama.cpp's token ids are 32-bit).
TOKEN_ID = re.compile(r"[0-9]{1,10}")
MAX_TOKEN_ID = 2**31 - 1
ROLES = ("system", "developer", "user", "assistant", "tool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDef(_Strict):
    name: Annotated[str, Field(pattern=TOOL_NAME.pattern)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: Annotated[str, Field(pattern=TOOL_NAME.pattern)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


Stop = one_of(string=str, array=Annotated[list[str], MaxLen(4)])
ToolChoice = one_of(string=Literal["none", "auto", "required"], object=NamedToolChoice)
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


class _Body(_Strict):
    """The top level of the body; ``messages`` are checked per role afterwards."""

    model: str
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: Stop | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # OpenAI's newer names for what ``user`` did: an end user's id (budgets per
    # end user) and a key for placing requests where their prefix is cached.
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = None
    metadata: (
        Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None
    ) = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    """A message normalised for engines: content is plain text."""

    role: str
    content: str | None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            data["name"] = self.name
        if self.tool_calls:
            data["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            data["tool_call_id"] = self.tool_call_id
        return data


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat completion request, ready for an engine."""

    model: str
    messages: tuple[Message, ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    response_format: ResponseFormat | None = None
    tools: tuple[ToolDef, ...] = ()
    tool_choice: str | NamedToolChoice = "none"
    parallel_tool_calls: bool = True
    user: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # A placement hint (``prompt_cache_key``, else the end user): requests that
    # share it go where their prefix is likeliest to be cached (the slot or
    # the upstream replica the last of them used). Never changes a result.
    cache_key: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # The wire API it came in by, for the ledger row; engines never read it.
    api: str = "chat.completions"
    # A raw prompt (``/v1/completions``): text or token ids the model sees as
    # they are, with no chat template; ``messages`` is then empty.
    prompt: str | tuple[int, ...] | None = None


def decode_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}. "
            "The API expects a JSON object.",
            code="invalid_json",
        ) from exc


def decode_object(body: bytes) -> dict[str, Any]:
    """A request body: a JSON object, else a 400 in the API's error shape."""
    data = decode_json(body)
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"Invalid request body: expected a JSON object, got {json_type_name(data)}.",
            code="invalid_type",
        )
    return data


def parse_chat_request(body: bytes) -> ChatRequest:
    data = decode_object(body)
    return validate_chat_request(data)


def validate_chat_request(data: dict[str, Any], api: str = "chat.completions") -> ChatRequest:
    try:
        body = _Body.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc) from exc

    if body.stream_options is not None and not body.stream:
        raise InvalidRequest(
            "Invalid 'stream_options': only allowed when 'stream' is true.",
            param="stream_options",
            code="invalid_value",
        )
    both = body.max_tokens is not None and body.max_completion_tokens is not None
    if both and body.max_tokens != body.max_completion_tokens:
        raise InvalidRequest(
            "Invalid 'max_tokens': set either 'max_tokens' or 'max_completion_tokens', "
            "not both with different values.",
            param="max_tokens",
            code="invalid_value",
        )
    if body.top_logprobs is not None and body.top_logprobs > 0 and not body.logprobs:
        raise InvalidRequest(
            "Invalid 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is used.",
            param="top_logprobs",
            code="invalid_value",
        )
    stop = _stop(body.stop)
    logit_bias = _logit_bias(body.logit_bias)
    messages = _messages(body.messages)
    tools = tuple(body.tools or ())
    for i, tool in enumerate(tools):
        if tool.function.parameters is not None:
            check_schema_shape(tool.function.parameters, f"tools.[{i}].function.parameters")
    tool_choice = _tool_choice(body.tool_choice, tools)
    _response_format(body.response_format)

    return ChatRequest(
        model=body.model,
        messages=messages,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=stop,
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        logit_bias=logit_bias,
        response_format=body.response_format,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        user=body.safety_identifier or body.user,
        metadata=dict(body.metadata or {}),
        cache_key=body.prompt_cache_key or body.safety_identifier or body.user,
        raw=data,
        api=api,
    )


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    for i, item in enumerate(items):
        if item == "":
            param = "stop" if isinstance(stop, str) else f"stop.[{i}]"
            raise InvalidRequest(
                f"Invalid '{param}': a stop sequence cannot be empty.",
                param=param,
                code="invalid_value",
            )
    return tuple(dict.fromkeys(items))


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if TOKEN_ID.fullmatch(key) is None or int(key) > MAX_TOKEN_ID:
            raise InvalidRequest(
                "Invalid 'logit_bias': keys must be token ids as strings of ASCII digits "
                f"(0 to {MAX_TOKEN_ID}), got {key[:40]!r}.",
                param="logit_bias",
                code="invalid_value",
            )
        out[int(key)] = float(value)
    return out


def _tool_choice(
    choice: str | NamedToolChoice | None, tools: tuple[ToolDef, ...]
) -> str | NamedToolChoice:
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest(
            "Invalid 'tools': function names must be unique.", param="tools", code="invalid_value"
        )
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequest(
                f"Invalid 'tool_choice': function '{choice.function.name}' is not in 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
    elif choice == "required" and not tools:
        raise InvalidRequest(
            "Invalid 'tool_choice': 'required' needs at least one tool in 'tools'.",
            param="tool_choice",
            code="invalid_value",
        )
    return choice


def _response_format(fmt: ResponseFormat | None) -> None:
    if fmt is None:
        return
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise InvalidRequest(
            "Missing required parameter: 'response_format.json_schema'.",
            param="response_format.json_schema",
            code="missing_required_parameter",
        )
    if fmt.type != "json_schema" and fmt.json_schema is not None:
        raise InvalidRequest(
            "Invalid 'response_format.json_schema': only allowed when type is 'json_schema'.",
            param="response_format.json_schema",
            code="invalid_value",
        )
    if fmt.json_schema is not None and fmt.json_schema.schema_ is not None:
        check_schema_shape(fmt.json_schema.schema_, "response_format.json_schema.schema")


# ---------------------------------------------------------------- messages


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _FunctionCall(_Strict):
    name: str
    arguments: str


class _ToolCallIn(_Strict):
    id: str
    type: Literal["function"]
    function: _FunctionCall


Content = one_of(string=str, array=list[dict[str, Any]])


class _SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class _UserMessage(_Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class _AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCallIn] | None = None


class _ToolMessage(_Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


_ROLE_MODELS: dict[str, type[_Strict]] = {
    "system": _SystemMessage,
    "developer": _SystemMessage,
    "user": _UserMessage,
    "assistant": _AssistantMessage,
    "tool": _ToolMessage,
}


def _content_text(content: str | list[dict[str, Any]] | None, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        part_where = f"{where}.[{j}]"
        kind = part.get("type")
        if kind != "text":
            raise InvalidRequest(
                f"Invalid '{part_where}.type': only text content parts are supported, "
                f"got {kind!r}.",
                param=f"{part_where}.type",
                code="invalid_value",
            )
        try:
            texts.append(_TextPart.model_validate(part).text)
        except ValidationError as exc:
            raise first_error(exc, prefix=(*_split(where), j)) from exc
    return "\n".join(texts)


def _split(where: str) -> list[int | str]:
    out: list[int | str] = []
    for item in where.split("."):
        out.append(int(item[1:-1]) if item.startswith("[") else item)
    return out


def _messages(raw: list[dict[str, Any]]) -> tuple[Message, ...]:
    messages: list[Message] = []
    # As OpenAI does: the calls of an assistant message must each be answered by
    # a tool message before the conversation moves on, and a tool message must
    # answer one of them.
    pending: dict[str, int] = {}
    pending_from = -1
    for i, item in enumerate(raw):
        where = f"messages.[{i}]"
        msg = _message(item, i)
        if not isinstance(msg, _ToolMessage) and pending:
            _unanswered(pending, pending_from)
        content = _content_text(getattr(msg, "content", None), f"{where}.content")
        if isinstance(msg, _AssistantMessage):
            calls = tuple(
                ToolCall(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls or ()
            )
            if content is None and not calls:
                raise InvalidRequest(
                    f"Invalid '{where}': an assistant message needs 'content' or 'tool_calls'.",
                    param=where,
                    code="invalid_value",
                )
            pending = {call.id: i for call in calls}
            pending_from = i
            messages.append(Message("assistant", content, msg.name, tool_calls=calls))
        elif isinstance(msg, _ToolMessage):
            if pending.pop(msg.tool_call_id, None) is None:
                raise InvalidRequest(
                    f"Invalid parameter: messages with role 'tool' must be a response to a "
                    f"preceding message with 'tool_calls'; '{where}.tool_call_id' "
                    f"{msg.tool_call_id!r} answers no earlier call.",
                    param=where,
                    code="invalid_value",
                )
            messages.append(Message("tool", content, tool_call_id=msg.tool_call_id))
        else:
            name = getattr(msg, "name", None)
            messages.append(Message(msg.role, content, name))  # type: ignore[attr-defined]
    if pending:
        _unanswered(pending, pending_from)
    return tuple(messages)


def _unanswered(pending: dict[str, int], index: int) -> None:
    ids = ", ".join(pending)
    raise InvalidRequest(
        f"An assistant message with 'tool_calls' must be followed by tool messages responding "
        f"to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        f"{ids}",
        param=f"messages.[{index}]",
        code="invalid_value",
    )


def _message(item: Any, i: int) -> _Strict:
    where = f"messages.[{i}]"
    require_object(item, where)
    role = item.get("role")
    model = _ROLE_MODELS.get(role) if isinstance(role, str) else None
    if model is None:
        if "role" not in item:
            raise InvalidRequest(
                f"Missing required parameter: '{where}.role'.",
                param=f"{where}.role",
                code="missing_required_parameter",
            )
        raise InvalidRequest(
            f"Invalid value for '{where}.role': {role!r}. Supported values are: "
            + ", ".join(f"'{r}'" for r in ROLES)
            + ".",
            param=f"{where}.role",
            code="invalid_value",
        )
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        raise first_error(exc, prefix=("messages", i)) from exc
