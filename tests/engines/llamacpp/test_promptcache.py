"""Prompts that outlive their slot: the host-memory store, and the engine using it."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwell.engines.llamacpp import LlamaCppEngine
from tokenwell.engines.llamacpp.promptcache import PromptStore, common_prefix

from .test_scheduler import run, with_engine


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
        text, gen = await run(engine, first, **args)
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
        # The same prompt again after an eviction gives the same text as at first.
        await run(engine, conversation("Gardening"), **args)
        same, third = await run(engine, first, **args)
        assert third.meter.cached_tokens == third.meter.prompt_tokens - 1
        assert same == text
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
