"""Hostile schemas and token ids: a 400 naming the part, never a 500 or a crash.

Most of these need no model: the bounds are checked before a grammar is
built. One slow test sends the schema that used to kill the server with
SIGSEGV (``maxLength: 20000``) to a real model-backed server.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import Server
from tokenwell.engines.llamacpp import grammar
from tokenwell.engines.llamacpp.grammar import check_gbnf, response_grammar, tools_grammar
from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import validate_chat_request

BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
RF = "response_format.json_schema.schema"


def with_schema(schema: Any) -> dict[str, Any]:
    return {
        **BASE,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }


def with_tool(parameters: Any) -> dict[str, Any]:
    return {
        **BASE,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}],
    }


def refused(data: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_chat_request(data)
    return info.value


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"type": [["object"]]}, f"{RF}.type"),
        ({"type": {}}, f"{RF}.type"),
        ({"type": []}, f"{RF}.type"),
        ({"format": ["date"]}, f"{RF}.format"),
        ({"properties": []}, f"{RF}.properties"),
        ({"properties": {"a": 5}}, f"{RF}.properties"),
        ({"items": 5}, f"{RF}.items"),
        ({"prefixItems": 5}, f"{RF}.prefixItems"),
        ({"anyOf": []}, f"{RF}.anyOf"),
        ({"pattern": 5}, f"{RF}.pattern"),
        ({"required": "a"}, f"{RF}.required"),
        ({"required": [1]}, f"{RF}.required"),
        ({"enum": 3}, f"{RF}.enum"),
        ({"enum": []}, f"{RF}.enum"),
        ({"minLength": -1}, f"{RF}.minLength"),
        ({"maxItems": 2.5}, f"{RF}.maxItems"),
        ({"minLength": True}, f"{RF}.minLength"),
        ({"minLength": 5, "maxLength": 2}, f"{RF}.minLength"),
        ({"$ref": 5}, f"{RF}.$ref"),
        ({"properties": {"a": {"items": {"type": "strin"}}}}, f"{RF}.properties.a.items.type"),
    ],
)
def test_schema_values_of_the_wrong_type_are_a_400(schema: dict[str, Any], param: str) -> None:
    assert refused(with_schema(schema)).param == param
    tool = refused(with_tool(schema))
    assert tool.param == param.replace(RF, "tools.[0].function.parameters")


@pytest.mark.parametrize("depth", [65, 255, 600, 1_000])
def test_deep_tool_parameters_are_a_400_before_anything_recurses(depth: int) -> None:
    error = refused(with_tool(nested(depth)))
    assert error.code == "schema_too_large"
    assert error.param is not None and error.param.startswith("tools.[0].function.parameters")
    assert refused(with_schema(nested(depth))).code == "schema_too_large"


def test_a_schema_at_the_depth_limit_passes() -> None:
    validate_chat_request(with_tool(nested(31)))  # 63 JSON levels


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"type": "string", "maxLength": 20_000}, "s.maxLength"),
        ({"type": "string", "maxLength": 1_001}, "s.maxLength"),
        ({"type": "string", "minLength": 5_000}, "s.minLength"),
        ({"type": "array", "items": {"type": "integer"}, "maxItems": 10_000}, "s.maxItems"),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 10_000}, "s.minItems"),
        ({"type": "string", "pattern": "^a{0,20000}$"}, "s.pattern"),
        ({"type": "string", "pattern": "^(a{0,100}){0,100}$"}, "s.pattern"),
        ({"type": "string", "pattern": "(" * 40 + "a" + ")" * 40}, "s.pattern"),
        ({"type": "string", "pattern": "(" * 5_000 + "a" + ")" * 5_000}, "s.pattern"),
        ({"enum": list(range(10_000))}, "s.enum"),
        ({"anyOf": [{"enum": list(range(20))} for _ in range(20)]}, "s.anyOf"),
        ({"type": "object", "properties": {f"p{i}": {} for i in range(2_000)}}, "s.properties"),
        (
            {
                "type": "object",
                "properties": {f"p{i}": {"type": "string"} for i in range(2_001)},
                "required": [f"p{i}" for i in range(2_001)],
            },
            "s.properties",
        ),
    ],
)
def test_schemas_too_costly_for_a_grammar_are_a_400_naming_the_part(
    schema: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        response_grammar("json_schema", schema, "s")
    assert info.value.param == param
    assert info.value.code == "schema_too_large"


def test_the_bounds_hold_across_all_tools_of_a_request() -> None:
    half = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(100)}}
    request = validate_chat_request(
        {
            **BASE,
            "tools": [
                {"type": "function", "function": {"name": f"f{i}", "parameters": half}}
                for i in range(3)
            ],
        }
    )
    with pytest.raises(InvalidRequest) as info:
        tools_grammar(request.tools, only=None, parallel=True)
    assert info.value.param == "tools.[2].function.parameters.properties"


def test_schemas_at_the_limits_convert() -> None:
    for schema in (
        {"type": "string", "minLength": 1_000, "maxLength": 1_000},
        {"type": "string", "maxLength": grammar.MAX_REPETITION},
        {"type": "array", "items": {"type": "integer"}, "maxItems": grammar.MAX_REPETITION},
        {"type": "string", "pattern": "^(a{0,30}){0,30}$"},
        {"enum": list(range(grammar.MAX_ALTERNATIVES))},
        {"type": "object", "properties": {f"p{i}": {} for i in range(100)}},
    ):
        check_gbnf(response_grammar("json_schema", schema, "s"), "s")


def test_generated_grammar_nesting_is_bounded() -> None:
    deep = "root ::= " + "(" * (grammar.MAX_GBNF_NESTING + 1) + '"a"' + ")" * 1201
    with pytest.raises(InvalidRequest) as info:
        check_gbnf(deep, "s")
    assert info.value.code == "schema_too_large"
    # Parentheses inside literals and character classes do not count.
    check_gbnf('root ::= "((((" [(((] ("a")', "s")


@pytest.mark.parametrize("key", ["²", "\u0661", "-1", "1.0", " 1", "", "99999999999", "2147483648"])
def test_logit_bias_keys_must_be_ascii_token_ids(key: str) -> None:
    error = refused({**BASE, "logit_bias": {key: 1}})
    assert (error.param, error.code) == ("logit_bias", "invalid_value")


def test_logit_bias_accepts_token_ids() -> None:
    assert validate_chat_request({**BASE, "logit_bias": {"42": 5}}).logit_bias == {42: 5.0}


def test_sse_retry_ignores_non_ascii_digits() -> None:
    from tokenwell.protocol.sse import SSEDecoder

    events = SSEDecoder().feed(b"retry: \xc2\xb2\ndata: x\n\n")
    assert [e.data for e in events] == ["x"]


HOSTILE = [
    ({"type": "string", "maxLength": 20_000}, f"{RF}.maxLength"),
    ({"type": "object", "properties": {f"p{i}": {} for i in range(2_000)}}, f"{RF}.properties"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("schema", "param"), HOSTILE)
def test_the_schema_that_crashed_the_server_is_a_400(
    model_server: Server, schema: dict[str, Any], param: str
) -> None:
    body = {**with_schema(schema), "model": "SmolLM2-135M-Instruct", "max_tokens": 4}
    tool_body = {
        **with_tool(schema),
        "model": "SmolLM2-135M-Instruct",
        "max_tokens": 4,
        "tool_choice": "required",
    }
    with model_server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        r = http.post("/v1/chat/completions", json=tool_body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param.replace(RF, "tools.[0].function.parameters")
        # Still serving, and still serving structured output.
        assert http.get("/health").status_code == 200
        ok = http.post(
            "/v1/chat/completions",
            json={**with_schema({"type": "string", "maxLength": 5}), "model": body["model"]},
        )
        assert ok.status_code == 200, ok.text
    assert model_server.proc is not None and model_server.proc.poll() is None


def test_deep_tool_parameters_over_http_are_a_400(scripted_server: Server) -> None:
    # Written by hand: json/orjson refuse to serialise 1,000 levels (the server parses them).
    schema = '{"type": "array", "items": ' * 1_000 + '{"type": "string"}' + "}" * 1_000
    body = (
        '{"model": "scripted", "messages": [{"role": "user", "content": "x"}], "tools": '
        '[{"type": "function", "function": {"name": "f", "parameters": ' + schema + "}}]}"
    )
    with scripted_server.http() as http:
        r = http.post("/v1/chat/completions", content=body.encode())
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "schema_too_large"
        assert http.get("/health").status_code == 200
