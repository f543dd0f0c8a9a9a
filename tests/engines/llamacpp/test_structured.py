"""Random JSON schemas: the real model's output always parses and matches."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenwell.config import ModelConfig
from tokenwell.engines.llamacpp import LlamaCppEngine
from tokenwell.protocol.events import Finish, TextDelta
from tokenwell.protocol.requests import validate_chat_request

pytestmark = pytest.mark.slow

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
leaves = st.one_of(
    st.just({"type": "integer"}),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(0, 12).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(names, min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
    st.just({"type": "string", "format": "date"}),
    st.just({"type": ["integer", "null"]}),
)


def _objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def build(props: dict[str, dict[str, Any]], data: st.DataObject) -> dict[str, Any]:
        required = data.draw(st.lists(st.sampled_from(sorted(props)), unique=True)) if props else []
        return {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }

    return st.builds(build, st.dictionaries(names, children, min_size=1, max_size=3), st.data())


schemas = st.recursive(
    leaves,
    lambda inner: st.one_of(
        _objects(inner),
        st.builds(
            lambda item, n: {"type": "array", "items": item, "maxItems": n},
            inner,
            st.integers(0, 3),
        ),
        st.lists(inner, min_size=2, max_size=3).map(lambda alts: {"anyOf": alts}),
    ),
    max_leaves=6,
).map(
    lambda s: (
        s
        if s.get("type") == "object"
        else {
            "type": "object",
            "properties": {"value": s},
            "required": ["value"],
            "additionalProperties": False,
        }
    )
)


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[LlamaCppEngine, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    eng = LlamaCppEngine(ModelConfig(name="m", parallel=2, context=2048))
    loop.run_until_complete(eng.start())
    yield eng, loop
    loop.run_until_complete(eng.stop())
    loop.close()


async def _generate(eng: LlamaCppEngine, schema: dict[str, Any], seed: int) -> tuple[str, str]:
    request = validate_chat_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Answer in JSON."}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "t", "schema": schema},
            },
            "max_tokens": 1500,
            "seed": seed,
            "temperature": 1.0,
        }
    )
    gen = eng.submit(eng.prepare(request))
    text, reason = "", ""
    while not gen.exhausted:
        for event in await gen.next_batch(30):
            if isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, Finish):
                reason = event.reason
    return text, reason


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(schema=schemas, seed=st.integers(0, 2**31))
def test_random_schemas_always_yield_valid_json(
    engine: tuple[LlamaCppEngine, asyncio.AbstractEventLoop], schema: dict[str, Any], seed: int
) -> None:
    eng, loop = engine
    text, reason = loop.run_until_complete(_generate(eng, schema, seed))
    assert reason == "stop", (schema, text)
    jsonschema.validate(orjson.loads(text), schema)
