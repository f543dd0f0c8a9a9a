"""The operator's content policy: terms, regular expressions and a classifier hook.

```toml
[content_filter]
terms = ["forbidden phrase"]          # case-insensitive unless case_sensitive = true
patterns = ['\\b\\d{3}-\\d{2}-\\d{4}\\b']
classifier = "mypackage.policy:flags"  # flags(text: str) -> bool
window = 64                            # characters held back while streaming
```

On the input, a match is a 400. On the output it is checked as the text
streams: text is held back ``window`` characters (a term's length, without
patterns or a classifier) so that a match is found before any of it is sent;
the choice then ends with ``finish_reason: "content_filter"``, the matching
text is never sent, and what the model generated is billed all the same. A
pattern should match at most ``window`` characters.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tokenwell.errors import ConfigError, InvalidRequest
from tokenwell.protocol.events import Event, Finish, TextDelta
from tokenwell.protocol.requests import ChatRequest


class ContentPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    terms: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)
    classifier: str | None = None
    case_sensitive: bool = False
    input: bool = True
    output: bool = True
    window: int = Field(default=64, ge=1, le=4096)


class ContentPolicy:
    def __init__(self, config: ContentPolicyConfig) -> None:
        self.config = config
        flags = 0 if config.case_sensitive else re.IGNORECASE
        sources = [re.escape(t) for t in config.terms if t] + list(config.patterns)
        try:
            self._regex = (
                re.compile("|".join(f"(?:{s})" for s in sources), flags) if sources else None
            )
        except re.error as exc:
            raise ConfigError(f"content_filter.patterns: {exc}") from exc
        self._classifier = _load(config.classifier) if config.classifier else None
        if config.patterns or self._classifier is not None:
            self.hold = config.window
        else:
            self.hold = max((len(t) for t in config.terms), default=1) - 1

    def find(self, text: str) -> int | None:
        """Where the first match begins, if any."""
        if self._regex is not None:
            match = self._regex.search(text)
            if match is not None:
                return match.start()
        return None

    def flags(self, text: str) -> bool:
        return self._classifier is not None and bool(self._classifier(text))

    def check_input(self, request: ChatRequest) -> None:
        if not self.config.input:
            return
        for i, message in enumerate(request.messages):
            texts = [message.content or ""] + [c.arguments for c in message.tool_calls]
            for text in texts:
                if text and (self.find(text) is not None or self.flags(text)):
                    raise InvalidRequest(
                        "Your request was rejected by the content policy of this service.",
                        param=f"messages.[{i}].content",
                        code="content_policy_violation",
                    )

    def output_filter(self, n: int) -> OutputFilter | None:
        return OutputFilter(self, n) if self.config.output else None


def _load(target: str) -> Callable[[str], Any]:
    module, _, name = target.partition(":")
    try:
        func = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"content_filter.classifier: cannot load {target!r}: {exc}") from exc
    if not callable(func):
        raise ConfigError(f"content_filter.classifier: {target!r} is not callable")
    return func  # type: ignore[no-any-return]


@dataclass
class _Choice:
    held: list[tuple[str, tuple[dict[str, Any], ...] | None]] = field(default_factory=list)
    sent: str = ""
    done: bool = False
    filtered: bool = False


class OutputFilter:
    """Holds back and checks one response's text, choice by choice."""

    def __init__(self, policy: ContentPolicy, n: int) -> None:
        self.policy = policy
        self._choices = [_Choice() for _ in range(n)]

    @property
    def filtered(self) -> bool:
        return any(c.filtered for c in self._choices)

    @property
    def all_done(self) -> bool:
        return all(c.done for c in self._choices)

    def apply(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if isinstance(event, TextDelta):
                state = self._choices[event.choice]
                if not state.done:
                    state.held.append((event.text, event.logprobs))
                    out.extend(self._check(event.choice, state, final=False))
            elif isinstance(event, Finish):
                state = self._choices[event.choice]
                if not state.done:
                    out.extend(self._check(event.choice, state, final=True))
                    if not state.done:
                        state.done = True
                        out.append(event)
            elif getattr(event, "choice", None) is not None and self._choices[event.choice].done:
                continue  # a filtered choice says nothing more
            else:
                out.append(event)
        return out

    def _check(self, choice: int, state: _Choice, final: bool) -> list[Event]:
        held = "".join(text for text, _ in state.held)
        # A match may begin in text already sent: look at its tail too.
        context = state.sent[-self.policy.config.window :]
        at = self.policy.find(context + held)
        if at is not None:
            return self._cut(choice, state, max(at - len(context), 0))
        if self.policy.flags(state.sent + held):
            return self._cut(choice, state, 0)
        release = len(held) if final else max(len(held) - self.policy.hold, 0)
        return self._release(choice, state, release)

    def _release(self, choice: int, state: _Choice, count: int) -> list[Event]:
        out: list[Event] = []
        while state.held and count > 0:
            text, logprobs = state.held[0]
            if len(text) <= count:
                state.held.pop(0)
                count -= len(text)
                state.sent += text
                out.append(TextDelta(choice, text, logprobs))
            else:
                state.held[0] = (text[count:], None)
                state.sent += text[:count]
                out.append(TextDelta(choice, text[:count], logprobs))
                count = 0
        return out

    def _cut(self, choice: int, state: _Choice, keep: int) -> list[Event]:
        out = self._release(choice, state, keep)
        state.held.clear()
        state.done = True
        state.filtered = True
        out.append(Finish(choice, "content_filter"))
        return out
