"""A long prompt is read in chunks that keep the running streams flowing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tokenwell.engines.llamacpp import LlamaCppEngine
from tokenwell.engines.llamacpp.stepcost import MIN_CHUNK

from .test_scheduler import request, run, with_engine

pytestmark = pytest.mark.slow

LONG = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(90))


async def tokens_while_read(engine: LlamaCppEngine) -> tuple[int, int]:
    """How many tokens a running stream makes while a long prompt is read; and
    that prompt's length in tokens."""
    scheduler = engine.scheduler
    assert scheduler is not None
    # Enough steps, some with prompts, for the step cost to be learnt.
    for i in range(8):
        await run(engine, f"Say hello {i} times.", max_tokens=8)
    assert scheduler.cost.fixed is not None
    stream = engine.submit(
        engine.prepare(
            request("Write a long story.", max_tokens=1500, logit_bias={"0": -100, "2": -100})
        )
    )
    while stream.meter.completion_tokens < 4:
        await asyncio.sleep(0.005)
    long = engine.submit(engine.prepare(request(LONG, max_tokens=1)))
    before = stream.meter.completion_tokens
    while long.meter.completion_tokens < 1:
        await asyncio.sleep(0.001)
    made = stream.meter.completion_tokens - before
    stream.cancel()
    await stream.closed()
    return made, long.meter.prompt_tokens


@pytest.mark.parametrize("step_ms", [0.001, 0])
def test_a_long_prompt_is_read_in_bounded_chunks_beside_a_stream(step_ms: float) -> None:
    result: dict[str, Any] = {}

    async def test(engine: LlamaCppEngine) -> None:
        result["made"], result["prompt"] = await tokens_while_read(engine)

    with_engine(test, parallel=2, context=2048, prefill_chunk=512, step_ms=step_ms)
    steps = -(-result["prompt"] // (MIN_CHUNK if step_ms else 512))
    assert result["prompt"] > 4 * MIN_CHUNK
    # One token for the stream in each step that read a chunk of the prompt
    # (give or take the step it arrived in and the one that hands it over).
    assert steps - 1 <= result["made"] <= steps + 2, result
