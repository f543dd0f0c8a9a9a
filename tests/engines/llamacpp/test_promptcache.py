"""Prompts that outlive their slot: the host-memory store, and the engine using it."""

from __future__ import annotations

import asyncio
import ctypes
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwell.engines.llamacpp import LlamaCppEngine
from tokenwell.engines.llamacpp.promptcache import PromptStore, common_prefix
from tokenwell.protocol.events import TextDelta

from .test_scheduler import request, run, with_engine


def state(size: int) -> Any:
    return (ctypes.c_uint8 * size)()


def test_the_longest_shared_prefix_is_found() -> None:
    store = PromptStore(1 << 20)
    store.put([1, 2, 3, 4], state(10), 10)
    store.put([1, 2, 9], state(10), 10)
    kept, n = store.best([1, 2, 3, 7])
    assert kept is not None and kept.tokens == [1, 2, 3, 4] and n == 3
    assert store.best([5, 6]) == (None, 0)


def test_a_state_that_another_extends_is_dropped() -> None:
    store = PromptStore(1 << 20)
    store.put([1, 2], state(10), 10)
    store.put([1, 2, 3], state(20), 20)
    assert len(store) == 1 and store.bytes == 20
    assert store.covers([1, 2]) and store.covers([1, 2, 3]) and not store.covers([1, 2, 3, 4])


def test_the_least_recently_used_go_first_beyond_the_budget() -> None:
    store = PromptStore(100)
    a = store.put([1], state(40), 40)
    store.put([2], state(40), 40)
    store.used(a, 1)  # [1] is now the most recent
    store.put([3], state(40), 40)
    assert store.bytes == 80 and store.evictions == 1
    assert store.best([2])[0] is None and store.best([1])[0] is a
    assert not store.fits(101) and store.fits(100) and not PromptStore(0).enabled


@given(st.lists(st.lists(st.integers(0, 3), max_size=8), max_size=12), st.integers(1, 200))
def test_the_store_stays_within_its_budget_and_keeps_no_redundant_state(
    puts: list[list[int]], budget: int
) -> None:
    store = PromptStore(budget)
    for tokens in puts:
        size = 1 + len(tokens) * 10
        if store.fits(size):
            store.put(tokens, state(size), size)
        assert store.bytes <= budget
    kept = [k.tokens for k in store._kept.values()]
    assert store.bytes == sum(k.size for k in store._kept.values())
    for i, a in enumerate(kept):
        for j, b in enumerate(kept):
            if i != j:  # no kept state is a prefix of another
                assert common_prefix(a, b) < len(a)


LONG = " ".join(f"Rule {i}: answer politely and cite section {i * 7}." for i in range(40))


def conversation(topic: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"{topic} {LONG}"},
        {"role": "user", "content": f"Tell me about {topic}."},
    ]


@pytest.mark.slow
def test_a_conversation_evicted_from_its_slot_comes_back_from_host_memory() -> None:
    async def test(engine: LlamaCppEngine) -> None:
        args: dict[str, Any] = dict(max_tokens=16, temperature=0)
        first = conversation("Sailing")
        tokens, gen = await first_tokens(engine, first)
        text = "".join(token for token, _ in tokens)
        assert gen.meter.prompt_tokens > 400 and gen.meter.cached_tokens == 0
        # Another session takes the only slot: the first one's state is kept.
        await run(engine, conversation("Gardening"), **args)
        store = engine.scheduler.store  # type: ignore[union-attr]
        assert len(store) == 1 and store.bytes > 0
        computed = engine.scheduler.prompt_tokens_computed  # type: ignore[union-attr]
        # The first session comes back with one more turn: written back, not computed.
        longer = [
            *first,
            {"role": "assistant", "content": text},
            {"role": "user", "content": "Go on"},
        ]
        _, regen = await run(engine, longer, **args)
        assert regen.meter.cached_tokens >= gen.meter.prompt_tokens
        assert store.restores == 1 and store.restored_tokens == regen.meter.cached_tokens
        new = engine.scheduler.prompt_tokens_computed - computed  # type: ignore[union-attr]
        assert new == regen.meter.prompt_tokens - regen.meter.cached_tokens
        # The same prompt again after an eviction: the same first token, as
        # likely as at first. (Not the whole greedy text: its last token is now
        # computed alone, not in a batch of 400, which changes the last float
        # bits, and a near tie later with them.)
        await run(engine, conversation("Gardening"), **args)
        again, third = await first_tokens(engine, first)
        assert third.meter.cached_tokens == third.meter.prompt_tokens - 1
        assert again[0][0] == tokens[0][0]
        assert again[0][1] == pytest.approx(tokens[0][1], abs=0.02)
        stats = engine.stats()  # written back for turn 2, Gardening, and this
        assert stats["prompt_cache_restores"] == 3 and stats["prompt_cache_entries"] >= 1

    with_engine(test, parallel=1, context=2048)


@pytest.mark.slow
def test_without_host_memory_an_evicted_conversation_is_computed_again() -> None:
    async def test(engine: LlamaCppEngine) -> None:
        args: dict[str, Any] = dict(max_tokens=4, temperature=0)
        _, gen = await run(engine, conversation("Sailing"), **args)
        await run(engine, conversation("Gardening"), **args)
        _, again = await run(engine, conversation("Sailing"), **args)
        assert again.meter.cached_tokens < 50 < gen.meter.prompt_tokens
        assert len(engine.scheduler.store) == 0  # type: ignore[union-attr]

    with_engine(test, parallel=1, context=2048, cache_ram=0)


async def first_tokens(engine: LlamaCppEngine, prompt: Any) -> tuple[list[tuple[str, float]], Any]:
    """The first tokens' text and log-probability, greedy; and the generation."""
    gen = engine.submit(engine.prepare(request(prompt, max_tokens=4, temperature=0, logprobs=True)))
    got: list[tuple[str, float]] = []
    while not gen.exhausted:
        for event in await gen.next_batch(10):
            if isinstance(event, TextDelta) and event.logprobs:
                got.extend((e["token"], e["logprob"]) for e in event.logprobs)
    return got, gen


@pytest.mark.slow
def test_sessions_that_start_together_compute_their_shared_prefix_once() -> None:
    questions = ["the sea", "the sky", "a forest", "a desert"]
    prompts = [
        [{"role": "system", "content": LONG}, {"role": "user", "content": f"Describe {q}."}]
        for q in questions
    ]
    alone: list[list[tuple[str, float]]] = []
    billed: list[int] = []

    async def one_by_one(engine: LlamaCppEngine) -> None:
        for prompt in prompts:
            tokens, gen = await first_tokens(engine, prompt)
            alone.append(tokens)
            billed.append(gen.meter.prompt_tokens)

    async def together(engine: LlamaCppEngine) -> None:
        scheduler = engine.scheduler
        assert scheduler is not None
        results = await asyncio.gather(*(first_tokens(engine, p) for p in prompts))
        # The same first tokens, as likely, as each prompt computed in a fresh
        # engine: the copied cells are the system prompt's. (Not the whole
        # greedy text: a step's other rows change the last float bits, and a
        # near tie later with them, with or without a copy.)
        for (tokens, _), expected in zip(results, alone, strict=True):
            assert tokens[0][0] == expected[0][0]
            assert tokens[0][1] == pytest.approx(expected[0][1], abs=0.02)
        # The system prompt computed once: the others copied it.
        ids = [engine.prepare(request(p)).payload[0] for p in prompts[:2]]
        shared = common_prefix(ids[0], ids[1])
        assert shared > 400
        assert scheduler.prompt_tokens_computed <= sum(billed) - 3 * shared + 3 * 32
        assert scheduler.slot_copies >= 1
        cached = sum(gen.meter.cached_tokens for _, gen in results)
        assert scheduler.prompt_tokens_computed == sum(billed) - cached

    with_engine(one_by_one, parallel=1, context=2048, cache_ram=0)
    with_engine(together, parallel=4, context=2048)


@pytest.mark.slow
def test_a_placement_hint_keeps_other_sessions_cells() -> None:
    """Two slots, no host memory. Sessions B then A ask; then A asks something
    that shares nothing with either slot. With no hint it takes the least
    recently used slot, B's, and B's next turn is computed again; with hints
    (prompt_cache_key) it takes its own session's slot and B's stays."""
    args: dict[str, Any] = dict(max_tokens=2, temperature=0)

    def scenario(hinted: bool) -> list[int]:
        cached: list[int] = []

        def key(name: str) -> dict[str, Any]:
            return {"prompt_cache_key": name} if hinted else {}

        async def test(engine: LlamaCppEngine) -> None:
            await run(engine, conversation("Gardening"), **args, **key("b"))
            await run(engine, conversation("Sailing"), **args, **key("a"))
            await run(engine, conversation("Cooking"), **args, **key("a"))
            _, again = await run(engine, conversation("Gardening"), **args, **key("b"))
            cached.extend((again.meter.cached_tokens, again.meter.prompt_tokens))

        with_engine(test, parallel=2, context=2048, cache_ram=0)
        return cached

    cached, prompt = scenario(hinted=True)
    assert cached == prompt - 1  # all but the last token, whose logits are needed
    cached, prompt = scenario(hinted=False)
    assert cached < 50 < prompt
