"""Prompts that outlive their slot: KV state kept in host memory.

A slot keeps its KV cells after a request ends, but only until another
request needs the slot. With more sessions than slots (coding agents resend
their whole conversation each turn), a session's history is evicted between
its turns and computed again from its first token. Here, before a slot is
given to a prompt that keeps little of what it holds, the sequence's state
(``llama_state_seq_get_data``) is copied into host memory under its tokens;
a later prompt that shares a longer prefix with a kept state than with any
free slot gets that state written back into a slot
(``llama_state_seq_set_data``), cut to the shared prefix, and only the rest
of its prompt is computed. A prefix shared by many sessions (a system prompt
and tool list) is found in any kept state that starts with it.

The store is bounded by bytes, least recently used out first. A state whose
tokens are a prefix of another kept state's is dropped: the longer one serves
every prompt the shorter one would. ``PromptStore`` is the bookkeeping alone
(no llama.cpp), the scheduler does the copies on its thread.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix, by bisection over C-speed slice compares."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(eq=False)
class Kept:
    """One sequence's state: the tokens its cells hold, and llama.cpp's bytes."""

    tokens: list[int]
    data: ctypes.Array[ctypes.c_uint8]
    size: int


class PromptStore:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._kept: OrderedDict[int, Kept] = OrderedDict()  # least recently used first
        self.bytes = 0
        # Counters, for /metrics and the benchmarks.
        self.saves = 0
        self.restores = 0
        self.restored_tokens = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def best(self, prompt: list[int]) -> tuple[Kept | None, int]:
        """The kept state sharing the longest prefix with ``prompt``, and its length."""
        found, length = None, 0
        for kept in self._kept.values():
            n = common_prefix(kept.tokens, prompt)
            if n > length:
                found, length = kept, n
        return found, length

    def covers(self, tokens: list[int]) -> bool:
        """Whether a kept state already starts with all of ``tokens``."""
        return self._covering(tokens) is not None

    def _covering(self, tokens: list[int]) -> Kept | None:
        n = len(tokens)
        for kept in self._kept.values():
            if len(kept.tokens) >= n and kept.tokens[:n] == tokens:
                return kept
        return None

    def fits(self, size: int) -> bool:
        return 0 < size <= self.budget

    def put(self, tokens: list[int], data: ctypes.Array[ctypes.c_uint8], size: int) -> Kept:
        """Keep a state; states it makes redundant and the least recently used
        ones beyond the budget go. A state that a kept one covers is not kept
        again: the covering one is returned."""
        covering = self._covering(tokens)
        if covering is not None:
            return covering
        for key, kept in list(self._kept.items()):
            if len(kept.tokens) <= len(tokens) and tokens[: len(kept.tokens)] == kept.tokens:
                self._drop(key)
        new = Kept(list(tokens), data, size)
        self._kept[id(new)] = new
        self.bytes += size
        self.saves += 1
        while self.bytes > self.budget and len(self._kept) > 1:
            self._drop(next(iter(self._kept)))
            self.evictions += 1
        return new

    def used(self, kept: Kept, tokens: int) -> None:
        """A state was written back into a slot: it is now the most recently used
        (if it is still kept: making room for another may have dropped it)."""
        if id(kept) in self._kept:
            self._kept.move_to_end(id(kept))
        self.restores += 1
        self.restored_tokens += tokens

    def _drop(self, key: int) -> None:
        kept = self._kept.pop(key)
        self.bytes -= kept.size
