"""The scripted engine's queue: capacity holds however requests arrive."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tokenwell.config import ModelConfig
from tokenwell.engines.scripted import ScriptedEngine
from tokenwell.errors import Overloaded
from tokenwell.protocol.requests import parse_chat_request


def _engine() -> ScriptedEngine:
    config = ModelConfig.model_validate(
        {"name": "s", "engine": "scripted", "parallel": 1, "max_queue": 1, "delay": 0.01}
    )
    return ScriptedEngine(config)


def _request() -> bytes:
    return orjson.dumps({"model": "s", "messages": [{"role": "user", "content": "hi"}]})


def test_requests_submitted_in_one_loop_iteration_respect_the_queue() -> None:
    async def go() -> None:
        engine = _engine()
        await engine.start()
        prepared = engine.prepare(parse_chat_request(_request()))
        accepted, refused = [], 0
        for _ in range(5):  # no await in between: none of their tasks ran yet
            try:
                accepted.append(engine.submit(prepared))
            except Overloaded:
                refused += 1
        assert (len(accepted), refused) == (2, 3)  # one running, one queued
        for gen in accepted:
            await asyncio.wait_for(gen.closed(), 5)
            assert gen.meter.completion_tokens > 0
        assert engine.stats()["queued"] == 0 and engine.stats()["running"] == 0
        await engine.stop()

    asyncio.run(go())


@pytest.mark.parametrize("when", ["before it starts", "while it waits for a slot"])
def test_a_cancelled_generation_is_closed_and_frees_its_place(when: str) -> None:
    async def go() -> None:
        engine = _engine()
        await engine.start()
        prepared = engine.prepare(parse_chat_request(_request()))
        first = engine.submit(prepared)
        second = engine.submit(prepared)
        if when == "while it waits for a slot":
            await asyncio.sleep(0.02)
        second.cancel()
        await asyncio.wait_for(second.closed(), 5)
        assert second.meter.completion_tokens == 0
        assert engine.stats()["queued"] == 0
        third = engine.submit(prepared)  # its place is free again
        first.cancel()
        await asyncio.wait_for(third.closed(), 5)
        assert third.meter.completion_tokens > 0
        await engine.stop()

    asyncio.run(go())
