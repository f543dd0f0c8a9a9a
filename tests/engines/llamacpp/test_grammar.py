"""Grammars from schemas and tools: refused where they could not be enforced."""

from __future__ import annotations

from typing import Any

import pytest

from tokenwell.engines.llamacpp.grammar import check_schema, response_grammar, tools_grammar
from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import validate_chat_request


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"type": "integer", "minimum": 0}, "s.minimum"),
        ({"type": "object", "properties": {"a": {"not": {}}}}, "s.properties.a.not"),
        ({"type": "string", "format": "email"}, "s.format"),
        ({"$ref": "https://example.com/x.json"}, "s.$ref"),
        ({"type": "array", "items": {"type": "thing"}}, "s.items.type"),
        ({"type": "array", "uniqueItems": True}, "s.uniqueItems"),
        ({"anyOf": [{"type": "string"}, {"if": {}}]}, "s.anyOf.[1].if"),
    ],
)
def test_unsupported_schema_parts_are_named(schema: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_schema(schema, "s")
    assert info.value.param == param


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    from tokenwell.engines.llamacpp.model import Model, builtin_model_path

    loaded = Model(builtin_model_path())
    yield loaded
    loaded.free()


def test_grammars_are_accepted_by_llama_cpp(model) -> None:  # type: ignore[no-untyped-def]
    from tokenwell.engines.llamacpp.sampling import check_grammar

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
            "when": {"type": "string", "format": "date"},
            "kind": {"enum": ["a", "b"]},
            "maybe": {"type": ["integer", "null"]},
        },
        "required": ["name", "tags"],
        "additionalProperties": False,
        "$defs": {"tag": {"type": "string", "pattern": "^[a-z]+$"}},
    }
    check_grammar(model, response_grammar("json_schema", schema, "s"))
    check_grammar(model, response_grammar("json_object", None, "s"))
    request = validate_chat_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [
                {"type": "function", "function": {"name": "a", "parameters": schema}},
                {"type": "function", "function": {"name": "b"}},
            ],
        }
    )
    for parallel in (True, False):
        check_grammar(model, tools_grammar(request.tools, only=None, parallel=parallel))
    check_grammar(model, tools_grammar(request.tools, only="b", parallel=False))
    check_grammar(
        model,
        tools_grammar(
            request.tools, only=None, parallel=True, text_alternative=("json_schema", schema)
        ),
    )


def test_a_function_that_is_not_strict_leaves_what_cannot_be_enforced_to_the_model(
    model,  # type: ignore[no-untyped-def]
) -> None:
    from tokenwell.engines.llamacpp.sampling import check_grammar

    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
            "url": {"type": "string", "format": "uri", "maxLength": 524288},
            "not": {"not": {"type": "null"}, "type": "string"},
            "any": {"description": "any JSON value"},
        },
        "required": ["n"],
    }

    def grammar(strict: bool | None) -> str:
        function = {"name": "f", "parameters": schema}
        if strict is not None:
            function["strict"] = strict
        request = validate_chat_request(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": function}],
            }
        )
        return tools_grammar(request.tools, only=None, parallel=False)

    for strict in (None, True):
        with pytest.raises(InvalidRequest) as info:
            grammar(strict)
        assert info.value.param == "tools.[0].function.parameters.properties.n.minimum"
    check_grammar(model, grammar(False))
    assert schema["properties"]["n"]["minimum"] == 0  # the request's schema is left alone


def test_a_json_string_never_holds_a_raw_control_character(model) -> None:  # type: ignore[no-untyped-def]
    """A sampled tool call once had a raw control character in an argument (no
    JSON parser takes it): the grammar refuses it, and takes its escape."""
    from tokenwell.engines.llamacpp.sampling import SamplingParams, SeqSampler

    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    request = validate_chat_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        }
    )
    grammars = [
        response_grammar("json_schema", schema, "s"),
        tools_grammar(request.tools, only="f", parallel=False),
    ]
    starts = ['{"a": "x', '<tool_call>\n{"name": "f", "arguments": {"k": "x']
    for gbnf, start in zip(grammars, starts, strict=True):
        for after, allowed in (("\n", False), ("\t", False), ("\\n", True), ("y", True)):
            sampler = SeqSampler(model, SamplingParams(grammar=gbnf))
            try:
                for token in model.tokenize(start, special=False):
                    assert sampler.allows(token), start
                    sampler.accept(token)
                token = model.tokenize(after, special=False)[0]
                assert sampler.allows(token) is allowed, (gbnf[:40], after)
            finally:
                sampler.free()
