"""Chat-completion chunks → the final message. Pure: no I/O, no dependencies.

Works on plain dicts (parsed JSON) and on the official ``openai`` SDK's
``ChatCompletionChunk`` objects alike::

    acc = ChatAccumulator()
    for chunk in stream:
        acc.add(chunk)
    acc.result()["choices"][0]["message"]["content"]

Content is joined in order; tool calls are gathered by index, their id, type
and name taken once (the first fragment that carries them) and their argument
fragments joined; each choice keeps its finish reason; the usage chunk (with
``include_usage``) gives ``usage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _as_dict(chunk: Any) -> dict[str, Any]:
    if isinstance(chunk, dict):
        return chunk
    dump = getattr(chunk, "model_dump", None)
    if dump is not None:  # an SDK (pydantic) object
        return dump(exclude_unset=False)  # type: ignore[no-any-return]
    raise TypeError(f"expected a chunk dict or SDK object, got {type(chunk).__name__}")


@dataclass
class _Call:
    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Choice:
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    finish_reason: str | None = None
    seen_content: bool = False


class ChatAccumulator:
    """Folds ``chat.completion.chunk`` objects into one ``chat.completion``."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.system_fingerprint: str | None = None
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self._choices: dict[int, _Choice] = {}

    def add(self, chunk: Any) -> None:
        data = _as_dict(chunk)
        if "error" in data and "choices" not in data:
            raise ValueError(f"an error event, not a chunk: {data['error']}")
        self.chunks += 1
        self.id = self.id or data.get("id")
        self.model = self.model or data.get("model")
        self.created = self.created or data.get("created")
        self.system_fingerprint = self.system_fingerprint or data.get("system_fingerprint")
        if data.get("usage"):
            self.usage = data["usage"]
        for part in data.get("choices") or []:
            choice = self._choices.setdefault(part.get("index", 0), _Choice())
            delta = part.get("delta") or {}
            if delta.get("role"):
                choice.role = delta["role"]
            if delta.get("content") is not None:
                choice.seen_content = True
                choice.content.append(delta["content"])
            if delta.get("refusal"):
                choice.refusal.append(delta["refusal"])
            for fragment in delta.get("tool_calls") or []:
                call = choice.calls.setdefault(fragment.get("index", 0), _Call())
                if fragment.get("id") and call.id is None:
                    call.id = fragment["id"]
                if fragment.get("type"):
                    call.type = fragment["type"]
                function = fragment.get("function") or {}
                if function.get("name") and not call.name:
                    call.name = function["name"]
                if function.get("arguments"):
                    call.arguments.append(function["arguments"])
            if part.get("finish_reason"):
                choice.finish_reason = part["finish_reason"]

    def text(self, index: int = 0) -> str:
        choice = self._choices.get(index)
        return "".join(choice.content) if choice else ""

    @property
    def finish_reasons(self) -> dict[int, str | None]:
        return {i: c.finish_reason for i, c in sorted(self._choices.items())}

    @property
    def finished(self) -> bool:
        """Every choice seen has a finish reason."""
        return bool(self._choices) and all(c.finish_reason for c in self._choices.values())

    def result(self) -> dict[str, Any]:
        """The ``chat.completion`` object the chunks make up (as a dict)."""
        choices = []
        for index, c in sorted(self._choices.items()):
            text = "".join(c.content)
            message: dict[str, Any] = {
                "role": c.role,
                "content": text if (text or not c.calls) else None,
                "refusal": "".join(c.refusal) or None,
            }
            if c.calls:
                message["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": call.type,
                        "function": {"name": call.name, "arguments": "".join(call.arguments)},
                    }
                    for _, call in sorted(c.calls.items())
                ]
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": choices,
            "usage": self.usage,
        }
