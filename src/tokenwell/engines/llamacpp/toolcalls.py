"""Tool calls on a model whose chat template knows nothing of tools.

The tools are described in the system prompt the way Hermes-style function
calling models are trained (``<tools>…</tools>``) and calls are written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

— the layout the grammar in ``grammar.py`` enforces. ``ToolCallParser`` reads
the generated text as it comes and turns it into events: text before a call
is content; a call's id, type and name go out once its name is complete, then
its arguments as they are generated, fragment by fragment.
"""

from __future__ import annotations

import random
from typing import Any

import orjson

from tokenwell.engines.llamacpp.grammar import CALL_CLOSE, CALL_OPEN
from tokenwell.protocol.events import Event, TextDelta, ToolCallArguments, ToolCallStart
from tokenwell.protocol.requests import ChatRequest, Message, NamedToolChoice

_ID_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def call_id() -> str:
    return "call_" + "".join(random.choices(_ID_CHARS, k=24))


def tool_system_prompt(request: ChatRequest) -> str:
    tools = "\n".join(
        orjson.dumps(
            {
                "type": "function",
                "function": tool.function.model_dump(by_alias=True, exclude_none=True),
            }
        ).decode()
        for tool in request.tools
    )
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        must = f" You must call the function {choice.function.name}."
    elif choice == "required":
        must = " You must call one or more of these functions."
    else:
        must = ""
    return (
        "You are a function calling AI model. You are provided with function signatures "
        "within <tools></tools> XML tags. You may call one or more functions to assist with "
        "the user query. Don't make assumptions about what values to plug into functions."
        f"{must} Here are the available tools: <tools>\n{tools}\n</tools>\n"
        "For each function call return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags as follows:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def render_call(name: str, arguments: str) -> str:
    """A call as the model writes one (and as the grammar makes it write one)."""
    args = arguments.strip() or "{}"
    try:
        orjson.loads(args)
    except orjson.JSONDecodeError:
        args = orjson.dumps(arguments).decode()  # not JSON: keep it, as a string
    name_json = orjson.dumps(name).decode()
    return f'{CALL_OPEN}{{"name": {name_json}, "arguments": {args}}}{CALL_CLOSE}'


def template_messages(request: ChatRequest, with_tools: bool) -> list[dict[str, Any]]:
    """The conversation for the chat template, with tools, calls and results in text."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        out.append(_message(message))
    if with_tools:
        prompt = tool_system_prompt(request)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _message(message: Message) -> dict[str, Any]:
    # Chat templates know system/user/assistant; OpenAI's newer "developer"
    # role means what "system" means to them.
    role = "system" if message.role == "developer" else message.role
    content = message.content or ""
    if message.tool_calls:
        calls = "\n".join(render_call(c.name, c.arguments) for c in message.tool_calls)
        content = f"{content}\n{calls}" if content else calls
    if message.role == "tool":
        content = f"<tool_response>\n{content}\n</tool_response>"
    return {"role": role, "content": content}


class ToolCallParser:
    """Generated text → content and tool call events, for one choice."""

    def __init__(self, choice: int) -> None:
        self.choice = choice
        self.calls = 0
        self._state = "text"
        self._buf = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str, logprobs: tuple[dict[str, Any], ...] | None = None) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        progress = True
        while progress:
            progress = getattr(self, f"_{self._state}")(events, logprobs)
            logprobs = None
        return events

    def finish(self) -> list[Event]:
        """The generation ended: what is still held is content (unless a call was made)."""
        rest, self._buf = self._buf, ""
        if self._state == "text" and rest and not (self.calls and not rest.strip()):
            return [TextDelta(self.choice, rest)]
        return []

    # -- states: each returns whether it made progress

    def _text(self, events: list[Event], logprobs: Any) -> bool:
        at = self._buf.find(CALL_OPEN.strip())
        if at < 0:
            keep = _partial_suffix(self._buf, CALL_OPEN.strip())
            out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
            if out and not (self.calls and not out.strip()):
                events.append(TextDelta(self.choice, out, logprobs))
            return False
        before = self._buf[:at]
        if before and not (self.calls and not before.strip()):
            events.append(TextDelta(self.choice, before, logprobs))
        self._buf = self._buf[at + len(CALL_OPEN.strip()) :]
        self._state = "head"
        return True

    def _head(self, events: list[Event], logprobs: Any) -> bool:
        marker = '"arguments":'
        at = self._buf.find(marker)
        if at < 0:
            return False
        head = self._buf[:at].strip().lstrip("{").strip().rstrip(",").strip()
        name = ""
        if head.startswith('"name"'):
            value = head.split(":", 1)[1].strip()
            name = orjson.loads(value) if value.startswith('"') else value
        events.append(ToolCallStart(self.choice, self.calls, call_id(), str(name)))
        self._buf = self._buf[at + len(marker) :].lstrip(" ")
        self._state = "args"
        self._depth = 0
        self._in_string = False
        self._escaped = False
        return True

    def _args(self, events: list[Event], logprobs: Any) -> bool:
        if self._depth == 0 and not self._in_string:
            self._buf = self._buf.lstrip()  # the grammar allows space before the object
        end = None
        for i, ch in enumerate(self._buf):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        if end is None:
            if self._buf:
                events.append(ToolCallArguments(self.choice, self.calls, self._buf))
            self._buf = ""
            return False
        if end:
            events.append(ToolCallArguments(self.choice, self.calls, self._buf[:end]))
        self._buf = self._buf[end:]
        self._state = "tail"
        return True

    def _tail(self, events: list[Event], logprobs: Any) -> bool:
        close = CALL_CLOSE.strip()
        at = self._buf.find(close)
        if at < 0:
            return False
        self._buf = self._buf[at + len(close) :]
        self.calls += 1
        self._state = "text"
        return True


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
