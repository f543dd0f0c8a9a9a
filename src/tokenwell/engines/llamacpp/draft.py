"""Speculative decoding's drafts: n-gram lookup in a sequence's own tokens.

Answers that rewrite code, quote a document or fill a template repeat long
runs of their context. The drafter looks up the last few tokens of a
sequence (its prompt and what it generated) earlier in the same sequence
and proposes the tokens that followed there, with no second model. The
scheduler decodes the proposal beside the sequence's next token in the same
batched step, samples each position with the sequence's own sampler, and
keeps the tokens up to the first sample that differs from the draft: every
token kept is one the sampler drew from the model's own distribution, in the
order it would have drawn them one step at a time (same seed, same text).

Whether a draft pays is a matter of odds and prices. How often a drafted
token is the one sampled depends mostly on how long the repeat that proposed
it is (measured on code rewriting with the built-in model: ~35% after a
2-token match, ~70% after 3, ~95% from 4 on) and on whether the sequence is
greedy: ``Odds`` learns that chance per match length from every step with a
proposal, drafted or not (a proposal's first token is checked against the
token sampled anyway), shared by the scheduler's sequences. A drafted token
that is kept makes the match one token longer for the next. ``choose`` spends
a step's extra tokens only where a position's chance of being kept, times
what a step yields per second, beats what the extra token costs
(``StepCost``): with many busy slots, or drafts that miss, nothing is drafted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The longest and shortest suffix looked up (tokens): longer matches first.
NGRAM_MAX = 8
NGRAM_MIN = 2
# Earlier occurrences of the last token examined, most recent first.
CANDIDATES = 256
# The chance that a drafted token is kept: its prior, and the weight of each
# new observation, per match length (capped at LONG) and greedy or not.
PRIOR = 0.5
LEARN = 0.05
LONG = 8


class Odds:
    """How often a drafted token is the one sampled, by the length of the match
    that proposed it and whether the sequence samples greedily (learnt)."""

    def __init__(self) -> None:
        self._rate = {(n, greedy): PRIOR for n in range(NGRAM_MIN, LONG + 1) for greedy in (0, 1)}

    def chance(self, match: int, greedy: bool) -> float:
        return self._rate[(min(match, LONG), int(greedy))]

    def snapshot(self) -> dict[str, dict[str, float]]:
        """The learnt chances, by greedy or sampled and match length (``/health``)."""
        return {
            kind: {str(n): round(self._rate[(n, greedy)], 3) for n in range(NGRAM_MIN, LONG + 1)}
            for kind, greedy in (("greedy", 1), ("sampled", 0))
        }

    def learn(self, match: int, greedy: bool, hit: bool) -> None:
        key = (min(match, LONG), int(greedy))
        self._rate[key] += LEARN * (float(hit) - self._rate[key])


class Drafter:
    """One sequence's tokens (prompt, then generated), and its last proposal."""

    def __init__(self, tokens: list[int], odds: Odds, greedy: bool) -> None:
        self._buf = np.empty(max(64, 2 * len(tokens)), dtype=np.int32)
        self._buf[: len(tokens)] = tokens
        self.n = len(tokens)
        self.odds = odds
        self.greedy = greedy
        # Tokens proposed at the last step (checked against what was sampled),
        # the length of the match that proposed them, and how many were drafted.
        self.proposed: list[int] = []
        self.match = 0
        self.drafted = 0

    @property
    def tokens(self) -> np.ndarray:
        return self._buf[: self.n]

    def append(self, token: int) -> None:
        if self.n == self._buf.shape[0]:
            bigger = np.empty(2 * self.n, dtype=np.int32)
            bigger[: self.n] = self._buf
            self._buf = bigger
        self._buf[self.n] = token
        self.n += 1

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest recent repeat of this
        sequence's last ``NGRAM_MIN``..``NGRAM_MAX`` tokens (none: no repeat);
        kept in ``proposed``, the repeat's length in ``match``."""
        self.match = 0
        self.proposed = []
        n = self.n
        if limit <= 0 or n < NGRAM_MIN + 1:
            return []
        seq = self._buf[:n]
        # Positions i < n-1 whose token is the last one, most recent first.
        cand = np.flatnonzero(seq[: n - 1] == seq[n - 1])[::-1][:CANDIDATES]
        best = -1
        for k in range(1, NGRAM_MAX):
            cand = cand[cand >= k]
            if cand.size == 0:
                break
            cand = cand[seq[cand - k] == seq[n - 1 - k]]
            if cand.size == 0:
                break
            if k + 1 >= NGRAM_MIN:
                best = int(cand[0])  # the most recent of the longest match so far
                self.match = k + 1
        if best < 0:
            return []
        self.proposed = [int(t) for t in seq[best + 1 : min(best + 1 + limit, n)]]
        return self.proposed

    def chances(self, count: int) -> list[float]:
        """The chance that drafted position j is kept once all before it were:
        each kept token makes the match one longer."""
        return [self.odds.chance(self.match + j, self.greedy) for j in range(count)]

    def observe(self, sampled: list[int]) -> int:
        """After a step: ``sampled`` are the tokens this sequence got, in order.
        Returns how many drafted tokens were kept; every proposed position that
        was checked teaches the odds."""
        kept = 0
        for j, (proposed, got) in enumerate(zip(self.proposed, sampled, strict=False)):
            hit = proposed == got
            self.odds.learn(self.match + j, self.greedy, hit)
            if not hit:
                break
            kept += 1
        kept = min(kept, self.drafted)
        self.proposed = []
        self.drafted = 0
        return kept


@dataclass(frozen=True, slots=True)
class Prices:
    """What a step costs (seconds): fixed, and per token with logits."""

    fixed: float
    per_token: float


def choose(chances: list[list[float]], prices: Prices, budget: int) -> list[int]:
    """How many drafted tokens each sequence decodes in this step.

    ``chances[i][j]`` is the chance that sequence i's drafted token j is kept
    once all before it were (so it is kept with the product of the chances
    up to j). A drafted token costs ``prices.per_token`` for the whole step;
    it is taken while its expected yield per second beats the step's (tokens
    expected / seconds), best odds first, at most ``budget`` in all: the
    choice that maximises the step's expected tokens per second."""
    count = len(chances)
    taken = [0] * count
    if not count or budget <= 0:
        return taken
    seconds = prices.fixed + prices.per_token * count
    expected = float(count)
    # Each sequence's next position: the chance it is kept. Positions of one
    # sequence come in order (a product only shrinks), so the best candidate
    # is always one of these.
    odds = [c[0] if c else 0.0 for c in chances]
    for _ in range(budget):
        i = max(range(count), key=odds.__getitem__)
        p = odds[i]
        if p <= 0 or p * seconds <= prices.per_token * expected:
            break
        taken[i] += 1
        seconds += prices.per_token
        expected += p
        j = taken[i]
        odds[i] = p * chances[i][j] if j < len(chances[i]) else 0.0
    return taken
