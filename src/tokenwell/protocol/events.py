"""What an engine tells the server while it generates, and its token meter.

Engines emit these; ``protocol.render`` turns them into the wire format.
``choice`` is the index of the choice (``n`` > 1 runs several).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


@dataclass(slots=True, frozen=True)
class TextDelta:
    choice: int
    text: str
    # OpenAI logprob entries for the tokens behind ``text`` (when asked for).
    logprobs: tuple[dict[str, Any], ...] | None = None


@dataclass(slots=True, frozen=True)
class ToolCallStart:
    choice: int
    index: int
    id: str
    name: str


@dataclass(slots=True, frozen=True)
class ToolCallArguments:
    choice: int
    index: int
    fragment: str


@dataclass(slots=True, frozen=True)
class Finish:
    choice: int
    reason: FinishReason
    # The stop string that ended the choice (reason "stop"), when one did:
    # Anthropic's stop_reason "stop_sequence" names it.
    stop_sequence: str | None = None


@dataclass(slots=True, frozen=True)
class Failed:
    """The generation cannot go on; the client gets an error (event).

    Before the first byte it becomes an HTTP error with ``http_status`` (and
    ``headers``, e.g. Retry-After); after it, an error event then [DONE].
    """

    message: str
    code: str | None = None
    status: Literal["upstream_error", "server_error"] = "server_error"
    http_status: int | None = None
    headers: dict[str, str] | None = field(default=None, hash=False, compare=False)
    error_type: str | None = None

    @property
    def type(self) -> str:
        return self.error_type or "server_error"

    @property
    def http(self) -> int:
        if self.http_status is not None:
            return self.http_status
        return 502 if self.status == "upstream_error" else 500


Event = TextDelta | ToolCallStart | ToolCallArguments | Finish | Failed


class Meter:
    """Tokens a request has used so far. Billing reads this, never the stream.

    Engines only add to it. The server may hand an engine a meter whose counts
    live in the crash journal (``billing.journal``), so that what an engine
    counts is on disk, as it counts it.
    """

    __slots__ = ("cached_tokens", "completion_tokens", "estimated", "prompt_tokens")

    def __init__(
        self,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
        completion_tokens: int = 0,
        estimated: bool = False,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.completion_tokens = completion_tokens
        # True when the counts come from an estimate (an upstream that sent no usage).
        self.estimated = estimated

    def __repr__(self) -> str:
        return (
            f"Meter(prompt_tokens={self.prompt_tokens}, cached_tokens={self.cached_tokens}, "
            f"completion_tokens={self.completion_tokens}, estimated={self.estimated})"
        )

    def add_completion(self, tokens: int = 1) -> None:
        """Count generated tokens (one call, on the engines' hot path)."""
        self.completion_tokens += tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
