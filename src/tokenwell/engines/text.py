"""From generated token pieces to the text a client may see.

Token pieces are bytes that may end inside a UTF-8 character, and a stop
string may span several tokens. ``TextAssembler`` releases only whole
characters, holds back any tail that could still become a stop string, and
never releases a stop string itself. Logprob entries travel with the text of
their token, so a client never gets the logprobs of text it was not sent.
"""

from __future__ import annotations

import codecs
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Released:
    text: str
    logprobs: list[dict[str, Any]] | None
    stopped: bool = False


class TextAssembler:
    def __init__(self, stops: tuple[str, ...] = (), logprobs: bool = False) -> None:
        self._stops = stops
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self._decoded = 0  # characters decoded so far
        self._released = 0  # characters released so far
        self._entries: deque[tuple[int, dict[str, Any]]] | None = deque() if logprobs else None
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, piece: bytes, entry: dict[str, Any] | None = None) -> Released:
        text = self._decoder.decode(piece)
        self._decoded += len(text)
        if self._entries is not None and entry is not None:
            self._entries.append((self._decoded, entry))
        self._held += text
        if not self._stops:
            return self._release(len(self._held))
        cut = self._find_stop()
        if cut is not None:
            self.stopped = True
            out = self._release(cut)
            self._held = ""
            if self._entries is not None:
                self._entries.clear()
            out.stopped = True
            return out
        return self._release(len(self._held) - self._partial_stop())

    def flush(self) -> Released:
        """The end of generation: release everything still held."""
        if self.stopped:
            return Released("", [] if self._entries is not None else None)
        # A generation cut short (max_tokens) may end inside a character: its
        # bytes are billed but never sent as a replacement character.
        pending, _ = self._decoder.getstate()
        tail = pending.decode("utf-8", errors="ignore")
        self._decoder.reset()
        self._held += tail
        self._decoded += len(tail)
        return self._release(len(self._held), everything=True)

    def _release(self, count: int, everything: bool = False) -> Released:
        text, self._held = self._held[:count], self._held[count:]
        self._released += len(text)
        entries: list[dict[str, Any]] | None = None
        if self._entries is not None:
            entries = []
            while self._entries and (everything or self._entries[0][0] <= self._released):
                entries.append(self._entries.popleft()[1])
        return Released(text, entries)

    def _find_stop(self) -> int | None:
        best: int | None = None
        for stop in self._stops:
            at = self._held.find(stop)
            if at >= 0 and (best is None or at < best):
                best = at
                self.matched = stop
        return best

    def _partial_stop(self) -> int:
        """Length of the longest tail of the held text that begins some stop string."""
        held = self._held
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(held)), longest, -1):
                if held.endswith(stop[:k]):
                    longest = k
                    break
        return longest
