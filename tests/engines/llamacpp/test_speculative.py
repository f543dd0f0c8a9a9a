"""Speculative decoding: n-gram drafts (pure), and the engine verifying them on the real model."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwell.engines.llamacpp import LlamaCppEngine
from tokenwell.engines.llamacpp.draft import (
    LONG,
    NGRAM_MAX,
    NGRAM_MIN,
    PRIOR,
    Drafter,
    Odds,
    Prices,
    choose,
)
from tokenwell.protocol.events import TextDelta

from .test_scheduler import request, run, with_engine


def drafter(tokens: list[int]) -> Drafter:
    return Drafter(tokens, Odds(), greedy=True)


# --------------------------------------------------------------------- drafts


def test_the_tokens_after_an_earlier_repeat_are_proposed() -> None:
    d = drafter([1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert d.propose(3) == [4, 5, 9] and d.proposed == [4, 5, 9]
    assert d.propose(10) == [4, 5, 9, 1, 2, 3]  # up to the end of what is known
    assert drafter([1, 2, 3, 4]).propose(4) == []  # nothing repeats
    assert drafter([7, 1, 7]).propose(4) == []  # one token is no evidence


def test_the_longest_match_wins_then_the_most_recent() -> None:
    # [1, 2, 3] occurred at 0 (followed by 7); only [2, 3] at 4 (followed by 8).
    assert drafter([1, 2, 3, 7, 5, 2, 3, 8, 1, 2, 3]).propose(1) == [7]
    # Two equal matches: the later one.
    assert drafter([1, 2, 5, 1, 2, 6, 1, 2]).propose(1) == [6]


def test_appending_grows_the_tokens() -> None:
    d = drafter([4, 5])
    for token in [6, 4, 5] * 40:
        d.append(token)
    assert d.n == 122 and d.tokens[-3:].tolist() == [6, 4, 5]
    assert d.propose(2) == [6, 4] and d.match == NGRAM_MAX


def _expected(tokens: list[int], limit: int) -> list[int]:
    """The proposal by brute force: the longest suffix (NGRAM_MIN..NGRAM_MAX)
    seen earlier, its most recent occurrence; what followed it."""
    n = len(tokens)
    for size in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
        if size >= n:
            continue
        suffix = tokens[n - size :]
        for end in range(n - 2, size - 2, -1):  # occurrence ending at `end` < n-1
            if tokens[end - size + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + limit]
    return []


@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 8))
def test_proposals_are_what_followed_the_longest_recent_repeat(
    tokens: list[int], limit: int
) -> None:
    assert drafter(tokens).propose(limit) == _expected(tokens, limit)


def test_observing_keeps_drafts_up_to_the_first_miss_and_learns_the_odds() -> None:
    odds = Odds()
    d = Drafter([1, 2, 3, 9, 1, 2, 3], odds, greedy=True)
    assert d.propose(3) == [9, 1, 2] and d.match == 3
    assert d.chances(3) == [PRIOR] * 3
    d.drafted = 2
    assert d.observe([9, 1, 5]) == 2  # the third was checked, never drafted
    # Matches of 3 and 4 were kept, 5 missed.
    assert odds.chance(3, True) > PRIOR and odds.chance(4, True) > PRIOR
    assert odds.chance(5, True) < PRIOR and odds.chance(3, False) == PRIOR
    assert d.proposed == [] and d.drafted == 0
    d.proposed, d.match, d.drafted = [7, 8], 2, 0
    assert d.observe([7]) == 0  # checked, not drafted: still learnt from
    assert odds.chance(2, True) > PRIOR
    assert odds.chance(100, True) == odds.chance(LONG, True)


PRICES = Prices(fixed=0.006, per_token=0.004)


def test_drafts_go_where_they_pay() -> None:
    # One stream whose drafts are nearly always right: a long draft.
    assert choose([[0.95] * 16], PRICES, 100)[0] >= 5
    # Drafts that usually miss: none.
    assert choose([[0.2] * 16], PRICES, 100) == [0]
    # Nothing to draft, or no room in the batch: none.
    assert choose([[]], PRICES, 100) == [0]
    assert choose([[0.95] * 16], PRICES, 0) == [0]
    # Many busy slots: a step already yields many tokens; the same odds buy less.
    assert sum(choose([[0.6] * 16] * 16, PRICES, 100)) == 0
    assert choose([[0.6] * 16], PRICES, 100)[0] > 0
    # The better odds get the tokens first.
    mixed = choose([[0.9] * 16, [0.5] * 16], PRICES, 100)
    assert mixed[0] > mixed[1]
    # A first position that usually misses hides what follows it.
    assert choose([[0.1] + [1.0] * 15], PRICES, 100) == [0]


@given(
    st.lists(st.lists(st.floats(0, 1), max_size=12), min_size=1, max_size=20),
    st.integers(0, 64),
    st.floats(0, 0.02),
    st.floats(0.0001, 0.02),
)
def test_choices_stay_within_their_bounds_and_pay(
    chances: list[list[float]], budget: int, fixed: float, per_token: float
) -> None:
    prices = Prices(fixed, per_token)
    taken = choose(chances, prices, budget)
    assert sum(taken) <= budget
    assert all(0 <= t <= len(c) for t, c in zip(taken, chances, strict=True))
    assert all(t == 0 for t, c in zip(taken, chances, strict=True) if c and c[0] == 0)

    def rate(counts: list[int]) -> float:  # expected tokens per second of a step
        tokens = seconds = 0.0
        for c, t in zip(chances, counts, strict=True):
            kept = 1.0
            tokens += 1
            for j in range(t):
                kept *= c[j]
                tokens += kept
            seconds += t * per_token
        return tokens / (fixed + per_token * len(chances) + seconds)

    # No single draft more or less does better than the choice.
    best = rate(taken)
    for i, c in enumerate(chances):
        for delta in (-1, 1):
            other = list(taken)
            other[i] += delta
            if 0 <= other[i] <= len(c) and sum(other) <= budget:
                assert rate(other) <= best + 1e-9


# --------------------------------------------------------------------- engine

FUNCTION = """def binary_search(items, target):
    \"\"\"Find the index of target in a sorted list, or -1.\"\"\"
    low = 0
    high = len(items) - 1
    while low <= high:
        middle = (low + high) // 2
        if items[middle] == target:
            return middle
        if items[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1"""
REWRITE = (
    "Repeat this Python code exactly, with one change: make it return None instead "
    f"of -1 when the item is missing. Answer with the code only.\n\n```python\n{FUNCTION}\n```"
)
WARM = ["Name a colour.", "Name a fruit.", "Name a city.", "Name a tree.", "Name a bird."]


async def warm(engine: LlamaCppEngine) -> None:
    """Enough steps, some reading prompts, for the step's cost to be known."""
    for prompt in WARM:
        await run(engine, prompt, max_tokens=12, temperature=0)
    assert engine.scheduler is not None and engine.scheduler.cost.fixed is not None


Token = tuple[str, float, float]  # text, log-probability, margin over the runner-up


async def tokens(engine: LlamaCppEngine, **params: Any) -> tuple[list[Token], Any]:
    """The rewrite's tokens, each with its log-probability and margin."""
    body = {"max_tokens": 96, "logprobs": True, "top_logprobs": 2, **params}
    gen = engine.submit(engine.prepare(request(REWRITE, **body)))
    got: list[Token] = []
    while not gen.exhausted:
        for event in await gen.next_batch(10):
            if isinstance(event, TextDelta) and event.logprobs:
                for entry in event.logprobs:
                    top = [t["logprob"] for t in entry["top_logprobs"]] + [-math.inf]
                    got.append((entry["token"], entry["logprob"], top[0] - top[1]))
    return got, gen


def rewrite(results: dict[str, Any], **args: Any) -> Any:
    """A test that rewrites the function once per entry of ``args`` (its sampling)."""

    async def test(engine: LlamaCppEngine) -> None:
        await warm(engine)
        for name, params in args.items():
            got, gen = await tokens(engine, **params)
            results[name] = (got, gen.meter.completion_tokens)
        results["stats"] = engine.stats()

    return test


def agree(plain: list[Token], drafted: list[Token]) -> bool:
    """The same tokens, or tokens that part at a near tie no wider than the
    float noise seen before it.

    llama.cpp's CPU kernels are not batch-invariant: a token's logits differ
    in their last bits with what else is in its step (other streams, or
    drafts), and the difference grows along a sequence (measured here with no
    drafts at all, one stream alone vs beside three others: up to ~0.16 in
    log-probability after a hundred tokens, and a greedy text that parted at
    a near tie). So a drafted run may part from a plain one only where the
    plain one's top two tokens were closer than twice that noise."""
    noise = 0.01
    for (a, lp_a, margin), (b, lp_b, _) in zip(plain, drafted, strict=False):
        if a != b:
            return margin <= 2 * noise
        noise = max(noise, abs(lp_a - lp_b))
    if len(plain) == len(drafted):
        return True
    # One ended where the other went on: its end token against the other's.
    n = min(len(plain), len(drafted))
    longer = plain if len(plain) > n else drafted
    return longer[n][2] <= 2 * noise


@pytest.mark.slow
def test_greedy_and_seeded_text_is_the_same_with_and_without_drafts() -> None:
    args = {
        "greedy": {"temperature": 0},
        "seeded": {"temperature": 0.7, "seed": 11},
        "bounded": {"temperature": 0, "max_tokens": 40},
    }
    plain: dict[str, Any] = {}
    drafted: dict[str, Any] = {}
    with_engine(rewrite(plain, **args), parallel=2, context=2048, draft_max=0)
    with_engine(rewrite(drafted, **args), parallel=2, context=2048)
    assert plain["stats"]["draft_tokens"] == 0
    stats = drafted["stats"]
    # Drafts were decoded, and kept: the answer repeats its input.
    assert stats["draft_tokens"] > 0 and stats["draft_accepted_tokens"] > 0
    # What was learnt is in the engine's stats (/health): drafts were chosen on
    # a fitted step cost, and the greedy odds moved from their prior.
    assert stats["step_cost"]["per_token_ms"] > 0
    assert any(chance != 0.5 for chance in stats["draft_odds"]["greedy"].values())
    assert set(stats["draft_odds"]["greedy"]) == {str(n) for n in range(2, 9)}
    assert "while low <= high:" in "".join(t[0] for t in drafted["greedy"][0])
    for name in args:
        assert agree(plain[name][0], drafted[name][0]), name
    # Drafts never run past max_tokens: exactly 40 made and billed.
    assert drafted["bounded"][1] == 40 and drafted["greedy"][1] > 40
