"""The OpenAI Responses API (``POST /v1/responses``): its codec. Pure: no I/O.

- ``parse_responses_request`` validates a body and turns it into the one
  internal ``ChatRequest`` engines take (through ``validate_chat_request``,
  so tools, schemas and limits are checked exactly as for chat completions),
  plus what the response object echoes back.
- ``ResponsesEncoder`` turns the engine's events into Responses events in
  OpenAI's order, numbered by ``sequence_number`` without gaps, and builds the
  response object (``output`` items, ``status``, ``usage`` from the meter).
- ``frame`` is the wire form of one event: ``event: <type>`` + ``data: <json>``.

What cannot apply to a small local model is accepted and left out in the
way that leaves the client's result unchanged (``reasoning``, ``include``,
hosted tools, which are not offered to the model; ``prompt_cache_key`` is a
placement hint, as on chat completions);
what would change the result (an image or file in the input, ``tool_choice``
naming a hosted tool, a stored prompt, a conversation object) is a 400
naming the field.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.events import (
    Event,
    Failed,
    Finish,
    Meter,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
)
from tokenwell.protocol.requests import ChatRequest, decode_object, validate_chat_request
from tokenwell.protocol.validation import first_error, json_type_name, require_object

# Tools OpenAI runs itself: tokenwell cannot, so they are not offered to the model.
HOSTED_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "code_interpreter",
        "computer_use_preview",
        "computer_use",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "custom",
        "tool_search",
        # A group of tools under one name (Codex sends one for its sub-agents):
        # how their calls are named is the client's contract with OpenAI's models.
        "namespace",
    }
)
TERMINAL = ("completed", "incomplete", "failed", "cancelled")


def new_id(prefix: str) -> str:
    """``resp_…``, ``msg_…``, ``fc_…``: an identifier, as long as OpenAI's."""
    return f"{prefix}_{secrets.token_hex(25)}"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Reasoning(_Lenient):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class _Format(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class _Text(_Lenient):
    format: _Format | None = None
    verbosity: str | None = None


Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class _ResponsesBody(_Lenient):
    model: str
    input: str | list[Any] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Probability | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: _Text | None = None
    stream: bool | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: Annotated[str, Field(max_length=128)] | None = None
    metadata: (
        Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None
    ) = None
    user: Annotated[str, Field(max_length=256)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = None
    reasoning: _Reasoning | None = None
    include: Annotated[list[str], Field(max_length=32)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    client_metadata: dict[str, Any] | None = None
    # Defined by OpenAI and refused here when set: they would change the result.
    conversation: Any = None
    prompt: Any = None
    # Defined by OpenAI, with no effect on a local model: accepted, ignored.
    background_options: Any = None
    context_management: Any = None
    prompt_cache_options: Any = None
    prewarm: Any = None
    personality: Any = None
    ttl: Any = None


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A validated Responses request: the engine's request and what the object echoes."""

    chat: ChatRequest
    # The input items of this request, normalised (``input_items`` lists them).
    input_items: list[dict[str, Any]]
    echo: dict[str, Any]
    stream: bool
    store: bool
    background: bool
    previous_response_id: str | None
    # The earlier turns this request continues (``previous_response_id``), as items.
    history: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def parse_body(body: bytes) -> dict[str, Any]:
    data = decode_object(body)
    return data


def check_request(data: dict[str, Any]) -> _ResponsesBody:
    try:
        body = _ResponsesBody.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc) from exc
    if body.conversation is not None:
        raise _unsupported(
            "conversation",
            "conversations are not supported; use 'previous_response_id' or send the whole input.",
        )
    if body.prompt is not None:
        raise _unsupported("prompt", "stored prompt templates are not supported.")
    if body.background and body.store is False:
        raise InvalidRequest(
            "Invalid 'background': background responses must be stored ('store' true).",
            param="background",
            code="invalid_value",
        )
    if body.input is None and body.previous_response_id is None:
        raise InvalidRequest(
            "Missing required parameter: 'input'.",
            param="input",
            code="missing_required_parameter",
        )
    return body


def _unsupported(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"Unsupported parameter: '{param}': {why}", param=param, code="unsupported_parameter"
    )


# ---------------------------------------------------------------- input items


def normalise_input(value: str | list[Any] | None) -> list[dict[str, Any]]:
    """The input as a list of items (a string is one user message), each checked."""
    if value is None:
        return []
    if isinstance(value, str):
        return [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": value}],
            }
        ]
    return [_item(item, f"input.[{i}]") for i, item in enumerate(value)]


def _str_field(item: dict[str, Any], name: str, where: str, required: bool = True) -> str | None:
    value = item.get(name)
    if value is None:
        if required:
            raise InvalidRequest(
                f"Missing required parameter: '{where}.{name}'.",
                param=f"{where}.{name}",
                code="missing_required_parameter",
            )
        return None
    if not isinstance(value, str):
        raise InvalidRequest(
            f"Invalid type for '{where}.{name}': expected a string, but got "
            f"{json_type_name(value)} instead.",
            param=f"{where}.{name}",
            code="invalid_type",
        )
    return value


_TEXT_PARTS = {"input_text", "output_text", "text", "summary_text", "reasoning_text"}
_REFUSED_PARTS = {"input_image", "input_file", "input_audio", "image_url", "file"}


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(
            f"Invalid type for '{where}': expected a string or an array of content parts, "
            f"but got {json_type_name(content)} instead.",
            param=where,
            code="invalid_type",
        )
    parts = []
    for j, part in enumerate(content):
        pw = f"{where}.[{j}]"
        require_object(part, pw)
        kind = part.get("type")
        if kind in _REFUSED_PARTS:
            raise InvalidRequest(
                f"Invalid '{pw}.type': {kind!r} content is not supported by this model "
                "(text only).",
                param=f"{pw}.type",
                code="unsupported_content",
            )
        if kind == "refusal":
            text = _str_field(part, "refusal", pw)
            parts.append({"type": "refusal", "refusal": text})
            continue
        if kind not in _TEXT_PARTS:
            raise InvalidRequest(
                f"Invalid value for '{pw}.type': {kind!r}. Supported values are: "
                "'input_text', 'output_text', 'refusal'.",
                param=f"{pw}.type",
                code="invalid_value",
            )
        text = _str_field(part, "text", pw)
        parts.append(
            {"type": "output_text" if kind == "output_text" else "input_text", "text": text}
        )
    return parts


_ROLES = ("user", "assistant", "system", "developer")


def _item(item: Any, where: str) -> dict[str, Any]:
    require_object(item, where)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"Invalid value for '{where}.role': {role!r}. Supported values are: "
                + ", ".join(f"'{r}'" for r in _ROLES)
                + ".",
                param=f"{where}.role",
                code="invalid_value" if "role" in item else "missing_required_parameter",
            )
        if "content" not in item:
            raise InvalidRequest(
                f"Missing required parameter: '{where}.content'.",
                param=f"{where}.content",
                code="missing_required_parameter",
            )
        parts = _parts(item["content"], f"{where}.content")
        if role == "assistant":  # what a model said is output text, as OpenAI lists it
            parts = [
                {"type": "output_text", "text": p["text"], "annotations": []}
                if p["type"] in ("input_text", "output_text")
                else p
                for p in parts
            ]
        out: dict[str, Any] = {"type": "message", "role": role, "content": parts}
        if isinstance(item.get("id"), str):
            out["id"] = item["id"]
        return out
    if kind == "function_call":
        out = {
            "type": "function_call",
            "call_id": _str_field(item, "call_id", where),
            "name": _str_field(item, "name", where),
            "arguments": _str_field(item, "arguments", where),
        }
        if isinstance(item.get("id"), str):
            out["id"] = item["id"]
        return out
    if kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, list):
            text = "\n".join(
                p.get("text") or p.get("refusal") or "" for p in _parts(output, f"{where}.output")
            )
        else:
            text = _str_field(item, "output", where)
        out = {
            "type": "function_call_output",
            "call_id": _str_field(item, "call_id", where),
            "output": text,
        }
        if isinstance(item.get("id"), str):
            out["id"] = item["id"]
        return out
    if kind == "reasoning":
        # A reasoning item from another model (Codex sends them back): nothing to
        # read for a model that does not reason; kept in the history, not prompted.
        return {"type": "reasoning", "id": item.get("id"), "summary": []}
    if kind is None:
        raise InvalidRequest(
            f"Missing required parameter: '{where}.type'.",
            param=f"{where}.type",
            code="missing_required_parameter",
        )
    raise InvalidRequest(
        f"Invalid value for '{where}.type': {str(kind)[:64]!r}: this server takes 'message', "
        "'function_call', 'function_call_output' and 'reasoning' items.",
        param=f"{where}.type",
        code="invalid_value",
    )


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items → chat completions messages (calls merged into one assistant turn).

    A ``function_call_output`` goes right after the assistant turn holding its call
    (after that turn's earlier outputs), wherever it stands in the input: OpenAI
    pairs outputs with calls by ``call_id``, not by position, and clients rely on
    it (``llm``'s OpenAI plugin sends an empty user message between a call and its
    output), while a chat template wants each call's answer next to it."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "function_call_output":
            tool = {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            messages.insert(_answer_at(messages, item["call_id"]), tool)
            continue
        kind = item["type"]
        if kind == "message":
            texts = [p.get("text") or p.get("refusal") or "" for p in item["content"]]
            messages.append({"role": item["role"], "content": "\n".join(texts)})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not _answered(messages):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return messages


def _answer_at(messages: list[dict[str, Any]], call_id: str) -> int:
    """Where the answer to ``call_id`` goes: after its call's turn and that turn's
    answers so far; at the end when no turn holds the call (checked elsewhere)."""
    for at in range(len(messages) - 1, -1, -1):
        calls = messages[at].get("tool_calls") or ()
        if any(call["id"] == call_id for call in calls):
            at += 1
            while at < len(messages) and messages[at]["role"] == "tool":
                at += 1
            return at
    return len(messages)


def _answered(messages: list[dict[str, Any]]) -> bool:
    return bool(messages) and messages[-1]["role"] == "tool"


# ---------------------------------------------------------------- the request


def _tools(tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Function tools in the chat shape; hosted tools are not offered to the model."""
    out: list[dict[str, Any]] = []
    hosted: list[str] = []
    for i, tool in enumerate(tools or []):
        where = f"tools.[{i}]"
        kind = tool.get("type")
        if kind == "function":
            fn: dict[str, Any] = {"name": _str_field(tool, "name", where)}
            for key in ("description", "parameters", "strict"):
                if tool.get(key) is not None:
                    fn[key] = tool[key]
            extra = set(tool) - {"type", "name", "description", "parameters", "strict"}
            if extra:
                bad = sorted(extra)[0]
                raise InvalidRequest(
                    f"Unknown parameter: '{where}.{bad}'.",
                    param=f"{where}.{bad}",
                    code="unknown_parameter",
                )
            out.append({"type": "function", "function": fn})
        elif isinstance(kind, str) and (kind in HOSTED_TOOLS or kind.startswith("web_search")):
            hosted.append(kind)
        else:
            raise InvalidRequest(
                f"Invalid value for '{where}.type': {str(kind)[:64]!r}.",
                param=f"{where}.type",
                code="invalid_value",
            )
    return out, hosted


def _tool_choice(choice: str | dict[str, Any] | None, tools: list[dict[str, Any]]) -> Any:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(
                f"Invalid value for 'tool_choice': {choice[:64]!r}. Supported values are: "
                "'none', 'auto', 'required'.",
                param="tool_choice",
                code="invalid_value",
            )
        return choice
    kind = choice.get("type")
    if kind == "function":
        name = _str_field(choice, "name", "tool_choice")
        return {"type": "function", "function": {"name": name}}
    if kind == "allowed_tools":
        mode = choice.get("mode", "auto")
        listed = choice.get("tools")
        listed = listed if isinstance(listed, list) else []
        allowed = {t.get("name") for t in listed if isinstance(t, dict)}
        tools[:] = [t for t in tools if t["function"]["name"] in allowed]
        return "required" if mode == "required" and tools else ("auto" if tools else "none")
    raise InvalidRequest(
        f"Invalid 'tool_choice': {str(kind)[:64]!r} requires a hosted tool this server "
        "cannot run; only function tools are available.",
        param="tool_choice",
        code="unsupported_value",
    )


def _text_format(fmt: _Format | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.name is None:
        raise InvalidRequest(
            "Missing required parameter: 'text.format.name'.",
            param="text.format.name",
            code="missing_required_parameter",
        )
    schema: dict[str, Any] = {"name": fmt.name}
    if fmt.description is not None:
        schema["description"] = fmt.description
    if fmt.schema_ is not None:
        schema["schema"] = fmt.schema_
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def to_chat(
    body: _ResponsesBody,
    history: list[dict[str, Any]],
    items: list[dict[str, Any]],
) -> ChatRequest:
    """The internal request: ``history`` (earlier turns) then this request's items."""
    _check_calls_answered([*history, *items])
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    messages.extend(items_to_messages([*history, *items]))
    if not messages or all(m["role"] in ("system", "developer") for m in messages):
        raise InvalidRequest(
            "Invalid 'input': it needs at least one message or function call output.",
            param="input",
            code="invalid_value",
        )
    tools, _hosted = _tools(body.tools)
    choice = _tool_choice(body.tool_choice, tools)
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": bool(body.stream)}
    if tools:
        chat["tools"] = tools
        if choice is not None:
            chat["tool_choice"] = choice
        if body.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = body.parallel_tool_calls
    elif isinstance(choice, dict) or choice == "required":
        raise InvalidRequest(
            "Invalid 'tool_choice': it names a function that is not in 'tools'.",
            param="tool_choice",
            code="invalid_value",
        )
    if body.stream:
        chat["stream_options"] = {"include_usage": True}
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    if "message.output_text.logprobs" in (body.include or ()):
        chat["logprobs"] = True
        chat["top_logprobs"] = body.top_logprobs or 0
    if body.temperature is not None:
        chat["temperature"] = body.temperature
    if body.top_p is not None:
        chat["top_p"] = body.top_p
    fmt = _text_format(body.text.format if body.text else None)
    if fmt is not None:
        chat["response_format"] = fmt
    user = body.safety_identifier or body.user
    if user is not None:
        chat["user"] = user
    if body.prompt_cache_key is not None:
        chat["prompt_cache_key"] = body.prompt_cache_key
    if body.metadata:  # recorded on the ledger row as the request's tags
        chat["metadata"] = body.metadata
    try:
        return validate_chat_request(chat, api="responses")
    except InvalidRequest as exc:
        exc.param = _responses_param(exc.param)
        raise


def _check_calls_answered(items: list[dict[str, Any]]) -> None:
    """Every function call has its output, and every output its call (as OpenAI checks)."""
    calls = [i["call_id"] for i in items if i["type"] == "function_call"]
    outputs = [i["call_id"] for i in items if i["type"] == "function_call_output"]
    for call_id in outputs:
        if call_id not in calls:
            raise InvalidRequest(
                f"No tool call found for function call output with call_id {call_id[:80]}.",
                param="input",
                code="invalid_value",
            )
    for call_id in calls:
        if call_id not in outputs:
            raise InvalidRequest(
                f"No tool output found for function call {call_id[:80]}.",
                param="input",
                code="invalid_value",
            )


def _responses_param(param: str | None) -> str | None:
    """A chat completions parameter name, as the Responses body names it."""
    if param is None:
        return None
    for chat, responses in (
        ("response_format.json_schema.schema", "text.format.schema"),
        ("response_format.json_schema", "text.format"),
        ("response_format", "text.format"),
        ("max_completion_tokens", "max_output_tokens"),
        ("messages", "input"),
    ):
        if param.startswith(chat):
            return responses + param[len(chat) :]
    if param.startswith("tools.") and ".function." in param:
        return param.replace(".function.", ".", 1)
    return param


def parse_responses_request(
    data: dict[str, Any], history: list[dict[str, Any]] | None = None
) -> ResponsesRequest:
    body = check_request(data)
    items = normalise_input(body.input)
    chat = to_chat(body, history or [], items)
    fmt = body.text.format if body.text and body.text.format else None
    text: dict[str, Any] = {
        "format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"},
        "verbosity": (body.text.verbosity if body.text else None) or "medium",
    }
    reasoning = {
        "effort": body.reasoning.effort if body.reasoning else None,
        "summary": body.reasoning.summary if body.reasoning else None,
    }
    tool_choice = body.tool_choice if body.tool_choice is not None else "auto"
    echo = {
        "background": bool(body.background),
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "model": body.model,
        "parallel_tool_calls": chat.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "prompt_cache_key": body.prompt_cache_key,
        "reasoning": reasoning,
        "safety_identifier": body.safety_identifier,
        "store": body.store is not False,
        "temperature": chat.temperature,
        "text": text,
        "tool_choice": tool_choice,
        "tools": list(body.tools or []),
        "top_logprobs": body.top_logprobs or 0,
        "top_p": chat.top_p,
        "truncation": body.truncation or "disabled",
        "user": body.user,
        "metadata": dict(body.metadata or {}),
    }
    return ResponsesRequest(
        chat=chat,
        input_items=items,
        echo=echo,
        stream=bool(body.stream),
        store=body.store is not False,
        background=bool(body.background),
        previous_response_id=body.previous_response_id,
        history=list(history or []),
        raw=data,
    )


# ---------------------------------------------------------------- the response


def usage(meter: Meter) -> dict[str, Any]:
    return {
        "input_tokens": meter.prompt_tokens,
        "input_tokens_details": {"cached_tokens": meter.cached_tokens},
        "output_tokens": meter.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": meter.prompt_tokens + meter.completion_tokens,
    }


def response_object(
    response_id: str,
    echo: dict[str, Any],
    *,
    status: str,
    created_at: int | None = None,
    output: list[dict[str, Any]] | None = None,
    meter: Meter | None = None,
    error: dict[str, Any] | None = None,
    incomplete: str | None = None,
    completed_at: int | None = None,
) -> dict[str, Any]:
    """The response object, its keys in the order OpenAI sends them."""
    obj: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at if created_at is not None else int(time.time()),
        "status": status,
        "background": echo["background"],
        "completed_at": completed_at,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
    }
    for key in ("instructions", "max_output_tokens", "max_tool_calls", "model"):
        obj[key] = echo[key]
    obj["output"] = output or []
    for key in (
        "parallel_tool_calls",
        "previous_response_id",
        "prompt_cache_key",
        "reasoning",
        "safety_identifier",
    ):
        obj[key] = echo[key]
    obj["service_tier"] = "default"
    for key in (
        "store",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
    ):
        obj[key] = echo[key]
    obj["usage"] = usage(meter) if meter is not None else None
    obj["user"] = echo["user"]
    obj["metadata"] = echo["metadata"]
    return obj


def output_text(output: list[dict[str, Any]]) -> str:
    return "".join(
        part.get("text", "")
        for item in output
        if item.get("type") == "message"
        for part in item.get("content", [])
        if part.get("type") == "output_text"
    )


@dataclass(slots=True)
class _Open:
    """The output item being generated."""

    index: int
    item: dict[str, Any]
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    # A message's output_text.delta bytes between sequence_number and delta.
    delta_prefix: bytes | None = None


class ResponsesEncoder:
    """Engine events → Responses events (dicts with ``sequence_number``), and the object.

    ``start`` gives ``response.created`` and ``response.in_progress``; ``feed``
    the item events for each engine event; ``finish`` closes what is open and
    gives the terminal event, whose response carries ``usage`` (always).
    Only choice 0 exists here (the Responses API has no ``n``).
    """

    def __init__(
        self, response_id: str, echo: dict[str, Any], created_at: int | None = None
    ) -> None:
        self.id = response_id
        self.echo = echo
        self.created_at = created_at if created_at is not None else int(time.time())
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.reason: str | None = None
        self.failure: Failed | None = None
        self._open: _Open | None = None
        self._calls: dict[int, _Open] = {}
        self.final: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def snapshot(self, status: str | None = None, meter: Meter | None = None) -> dict[str, Any]:
        return response_object(
            self.id,
            self.echo,
            status=status or self.status,
            created_at=self.created_at,
            output=[self._partial(item) for item in self.output],
            meter=meter,
        )

    def _partial(self, item: dict[str, Any]) -> dict[str, Any]:
        """An output item as it stands (the open one with what it has so far)."""
        out = _copy(item)
        current = self._open
        if current is not None and current.item is item:
            text = "".join(current.text)
            if item["type"] == "message":
                out["content"] = [
                    {
                        "type": "output_text",
                        "annotations": [],
                        "logprobs": list(current.logprobs),
                        "text": text,
                    }
                ]
            else:
                out["arguments"] = text
        return out

    def queued(self) -> dict[str, Any]:
        return self._event("response.queued", response=self.snapshot("queued"))

    def start(self) -> list[dict[str, Any]]:
        response = self.snapshot()  # the same object in both (serialized as it is now)
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, TextDelta):
            if event.choice != 0 or not (event.text or event.logprobs):
                return []
            out = []
            if self._open is None or self._open.item["type"] != "message":
                out.extend(self._close())
                out.extend(self._open_message())
            assert self._open is not None
            self._open.text.append(event.text)
            logprobs = list(event.logprobs or ())
            self._open.logprobs.extend(logprobs)
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self._open.item["id"],
                    output_index=self._open.index,
                    content_index=0,
                    delta=event.text,
                    logprobs=logprobs,
                )
            )
            return out
        if isinstance(event, ToolCallStart):
            if event.choice != 0:
                return []
            out = self._close()
            item = {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": event.id,
                "name": event.name,
            }
            self._open = self._calls[event.index] = _Open(len(self.output), item)
            self.output.append(item)
            out.append(
                self._event(
                    "response.output_item.added", output_index=self._open.index, item=dict(item)
                )
            )
            return out
        if isinstance(event, ToolCallArguments):
            call = self._calls.get(event.index)
            if event.choice != 0 or call is None or not event.fragment:
                return []
            call.text.append(event.fragment)
            if call is not self._open:  # a call already closed (arguments out of order)
                call.item["arguments"] = "".join(call.text)
            return [
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=call.item["id"],
                    output_index=call.index,
                    delta=event.fragment,
                )
            ]
        if isinstance(event, Finish):
            if event.choice == 0:
                self.reason = event.reason
            return []
        if isinstance(event, Failed):
            self.failure = event
        return []

    def _open_message(self) -> list[dict[str, Any]]:
        item = {
            "id": new_id("msg"),
            "type": "message",
            "status": "in_progress",
            "content": [],
            "role": "assistant",
        }
        self._open = _Open(len(self.output), item)
        self._open.delta_prefix = (
            b',"item_id":"%s","output_index":%d,"content_index":0,"delta":'
            % (
                item["id"].encode(),
                self._open.index,
            )
        )
        self.output.append(item)
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        return [
            self._event(
                "response.output_item.added", output_index=self._open.index, item=_copy(item)
            ),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=self._open.index,
                content_index=0,
                part=part,
            ),
        ]

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        current, self._open = self._open, None
        if current is None:
            return []
        item = current.item
        text = "".join(current.text)
        out = []
        if item["type"] == "message":
            logprobs = current.logprobs
            part = {"type": "output_text", "annotations": [], "logprobs": logprobs, "text": text}
            item["content"] = [part]
            item["status"] = status
            out.append(
                self._event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=current.index,
                    content_index=0,
                    text=text,
                    logprobs=list(logprobs),
                )
            )
            out.append(
                self._event(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=current.index,
                    content_index=0,
                    part=dict(part),
                )
            )
        else:
            item["arguments"] = text
            item["status"] = status
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=current.index,
                    arguments=text,
                )
            )
        out.append(
            self._event("response.output_item.done", output_index=current.index, item=_copy(item))
        )
        return out

    def finish(self, meter: Meter, status: str | None = None) -> list[dict[str, Any]]:
        """Close the open item and end: completed, incomplete, failed or cancelled.

        ``status`` forces an ending (``cancelled``; ``incomplete`` for a
        generation cut short); otherwise it follows the engine's finish.
        """
        incomplete = None
        if self.failure is not None and status is None:
            status = "failed"
        elif status is None:
            if self.reason == "length":
                status, incomplete = "incomplete", "max_output_tokens"
            elif self.reason == "content_filter":
                status, incomplete = "incomplete", "content_filter"
            else:
                status = "completed"
        elif status == "incomplete" and self.reason == "length":
            incomplete = "max_output_tokens"
        out = self._close("incomplete" if status in ("incomplete", "cancelled") else "completed")
        error = None
        if status == "failed":
            failure = self.failure or Failed("The generation failed.", "server_error")
            error = {"code": failure.code or "server_error", "message": failure.message}
            out.append(
                self._event(
                    "error",
                    error={
                        "type": failure.type,
                        "code": failure.code,
                        "message": failure.message,
                        "param": None,
                    },
                )
            )
        self.status = status
        self.final = response_object(
            self.id,
            self.echo,
            status=status,
            created_at=self.created_at,
            output=self.output,
            meter=meter,
            error=error,
            incomplete=incomplete,
            completed_at=int(time.time()) if status == "completed" else None,
        )
        kind = {
            "completed": "response.completed",
            "incomplete": "response.incomplete",
            "failed": "response.failed",
            # OpenAI defines no stream event for a cancelled response: the last
            # one says so by its status.
            "cancelled": "response.incomplete",
        }[status]
        out.append(self._event(kind, response=self.final))
        return out


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    out = dict(item)
    if "content" in out:
        out["content"] = [dict(p) for p in out["content"]]
    return out


_DELTA_HEAD = (
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":'
)
_DELTA_TAIL = b',"logprobs":[]}\n\n'


def frame(event: dict[str, Any]) -> bytes:
    """One event on the wire: ``event: <type>`` then ``data: <json>``."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def output_items_as_input(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output, as input items of the next turn (``previous_response_id``)."""
    items: list[dict[str, Any]] = []
    for item in output:
        if item["type"] == "message":
            items.append(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [
                        {"type": "output_text", "text": p.get("text", "")}
                        for p in item.get("content", [])
                    ],
                }
            )
        elif item["type"] == "function_call":
            items.append(
                {
                    "type": "function_call",
                    "call_id": item["call_id"],
                    "name": item["name"],
                    "arguments": item["arguments"],
                }
            )
    return items


def input_item_objects(items: list[dict[str, Any]], response_id: str) -> list[dict[str, Any]]:
    """Stored input items as ``input_items`` lists them: each with an id and a status."""
    out = []
    for i, item in enumerate(items):
        if item["type"] == "reasoning":
            continue
        obj = dict(item)
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
        obj.setdefault("id", f"{prefix[item['type']]}_{response_id[5:29]}{i:04d}")
        obj.setdefault("status", "completed")
        out.append(obj)
    return out


class ResponsesCodec:
    """``/v1/responses`` as a ``protocol.codec.Codec``: events with ``event:`` lines.

    A stream opens with ``response.created`` and ``response.in_progress`` and
    ends with the terminal event, whose response carries ``usage``; there is no
    ``[DONE]``. A stream the server cuts short ends ``response.failed`` (or,
    when ``cancelled`` was set first, with the response ``cancelled``).
    """

    media_type = b"text/event-stream; charset=utf-8"
    keepalive = b": keep-alive\n\n"

    def __init__(self, encoder: ResponsesEncoder, *, opened: bool = False) -> None:
        self.encoder = encoder
        # A background response's log already holds created/in_progress.
        self._opened = opened
        self._meter: Meter | None = None
        self.cancelled = False

    @property
    def id(self) -> str:
        return self.encoder.id

    @property
    def final(self) -> dict[str, Any] | None:
        return self.encoder.final

    def head(self, meter: Meter) -> bytes:
        self._meter = meter
        if self._opened:
            return b""
        self._opened = True
        return b"".join(frame(e) for e in self.encoder.start())

    def render(self, event: Event) -> bytes:
        enc = self.encoder
        current = enc._open
        if (
            type(event) is TextDelta
            and current is not None
            and current.delta_prefix is not None
            and event.choice == 0
            and event.text
            and not event.logprobs
        ):
            # The hot path, a token of text: the bytes of the event ``feed`` would
            # make (same keys, same order), without a dict per token.
            current.text.append(event.text)
            seq = enc.seq
            enc.seq = seq + 1
            return (
                _DELTA_HEAD
                + str(seq).encode()
                + current.delta_prefix
                + orjson.dumps(event.text)
                + _DELTA_TAIL
            )
        return b"".join(frame(e) for e in enc.feed(event))

    def end(self, meter: Meter) -> bytes:
        return b"".join(frame(e) for e in self.encoder.finish(meter))

    def after_failure(self) -> bytes:
        return b"".join(frame(e) for e in self.encoder.finish(self._meter or Meter()))

    def error(self, message: str, code: str) -> bytes:
        meter = self._meter or Meter()
        if self.cancelled:
            return b"".join(frame(e) for e in self.encoder.finish(meter, "cancelled"))
        self.encoder.failure = Failed(message, code)
        return b"".join(frame(e) for e in self.encoder.finish(meter, "failed"))

    def add(self, event: Event) -> None:
        self.encoder.feed(event)

    def body(self, meter: Meter) -> dict[str, Any]:
        self.encoder.finish(meter)
        assert self.encoder.final is not None
        return self.encoder.final

    def error_body(self, failure: Failed) -> tuple[int, dict[str, Any]]:
        return failure.http, {
            "error": {
                "message": failure.message,
                "type": failure.type,
                "param": None,
                "code": failure.code,
            }
        }
