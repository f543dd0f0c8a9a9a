"""From a chat request to the prompt text the model sees (and its constraints)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenwell.engines.llamacpp.model import Model
from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import ChatRequest, Message


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    grammar: str | None = None


def _as_template_message(message: Message) -> dict[str, Any]:
    # Chat templates know system/user/assistant; OpenAI's newer "developer"
    # role means what "system" means to them.
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": message.content or ""}


def render_prompt(model: Model, request: ChatRequest) -> Rendered:
    if request.tools and request.tool_choice != "none":
        raise InvalidRequest(
            "Invalid 'tools': tool calls are not supported by this model yet.",
            param="tools",
            code="unsupported_parameter",
        )
    if request.response_format is not None and request.response_format.type != "text":
        raise InvalidRequest(
            "Invalid 'response_format': only 'text' is supported by this model yet.",
            param="response_format",
            code="unsupported_parameter",
        )
    messages = [_as_template_message(m) for m in request.messages]
    try:
        text = model.template.render(messages)
    except Exception as exc:  # a template's raise_exception() or a jinja error
        raise InvalidRequest(
            f"Invalid 'messages': the model's chat template rejected them: {exc}",
            param="messages",
            code="invalid_value",
        ) from exc
    return Rendered(text)
