"""Property-based fuzzing of the API, from the OpenAPI document the server publishes.

Requests are generated from ``GET /openapi.json`` (valid bodies, then mutated:
wrong types, huge numbers, odd unicode, deep nesting, unknown and missing
keys; raw bytes that are not JSON at all) and sent to a REAL server process.

The property, for every request: the answer is a 2xx, or a 4xx in the API's
error shape ``{"error": {"message", "type", "param", "code"}}``; never a 5xx,
never a hang (the client's timeout); and afterwards the server still answers
``/health``, with its memory and file descriptors flat.

CI runs ``TOKENWELL_FUZZ_EXAMPLES`` (default 200) examples per endpoint on the
scripted engine; set it higher for a longer run. The ``slow`` test fuzzes chat
completions on the real embedded model.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import MASTER, Server

EXAMPLES = int(os.environ.get("TOKENWELL_FUZZ_EXAMPLES", "200"))
TIMEOUT = 30.0

CONFIG = """
[http]
# Longer than any pause between two examples (a kept-alive connection that the
# server closes just as the client reuses it would be the client's race).
idle_timeout = 60.0

[[models]]
name = "scripted"
engine = "scripted"
price = { prompt = 1.0, completion = 2.0 }

[[models]]
name = "scripted-64"
engine = "scripted"
reply_tokens = 64
"""
MODELS = ["scripted", "scripted-64"]


# ---------------------------------------------------------------- the server


class Fuzzed:
    """The server under fuzz, its OpenAPI document, keys, and what was sent."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.base, timeout=TIMEOUT)
        document = self.http.get("/openapi.json")
        assert document.status_code == 200
        self.openapi: dict[str, Any] = document.json()
        self.schemas: dict[str, Any] = self.openapi["components"]["schemas"]
        self.key = server.create_key(name="fuzz", models=["scripted"])
        self.counts: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.ok: dict[str, int] = {}

    def send(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
        auth: str | None = f"Bearer {MASTER}",
        fresh: bool = False,
    ) -> httpx.Response:
        headers = {"content-type": b"application/json"}
        if auth is not None:  # the header's value, as bytes: anything a client may send
            headers["authorization"] = auth.encode("utf-8", "surrogatepass")
        client = httpx.Client(base_url=self.server.base, timeout=TIMEOUT) if fresh else self.http
        try:
            response = client.request(method, path, content=body, params=params, headers=headers)
        except httpx.TimeoutException:
            pytest.fail(f"{method} {path} hung (no answer in {TIMEOUT} s): {body!r:.300}")
        finally:
            if fresh:
                client.close()
        self.counts[endpoint] = self.counts.get(endpoint, 0) + 1
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        if response.is_success:
            self.ok[endpoint] = self.ok.get(endpoint, 0) + 1
        anthropic = path == "/v1/messages" or path.startswith(("/v1/messages/", "/v1/messages?"))
        check_answer(response, f"{method} {path} {params or ''} {body!r:.500}", anthropic)
        return response


def check_answer(response: httpx.Response, what: str, anthropic: bool = False) -> None:
    assert response.status_code < 500, f"{response.status_code} for {what}: {response.text:.500}"
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            pytest.fail(f"{response.status_code} not JSON for {what}: {response.text:.300}")
        if anthropic:  # the Messages API answers in Anthropic's error shape
            assert set(body) == {"type", "error"} and body["type"] == "error", body
            assert set(body["error"]) == {"type", "message"}, body
            assert body["error"]["type"].endswith("_error") and body["error"]["message"]
            return
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)


def proc_stats(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    with Server(tmp_path_factory.mktemp("fuzz"), CONFIG) as server:
        target = Fuzzed(server)
        yield target
        target.http.close()


# ---------------------------------------------------------------- strategies

HUGE_NUMBERS = [
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    10**400,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0.1,
]

# Text, including what often breaks parsers: digits that are not ASCII,
# control characters, right-to-left marks, emoji, lone surrogates.
odd_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["", "²", "٣", "½", "\u0000", "\u202e", "🦙" * 10, "\ud800", "NaN", "-1", "1e999", " 1"]
    ),
    st.tuples(st.characters(codec="utf-8"), st.integers(1000, 5000)).map(lambda c: c[0] * c[1]),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(HUGE_NUMBERS),
    st.floats(allow_nan=False, allow_infinity=False),
    odd_text,
)


def deep(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


hostile = st.one_of(
    scalars,
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
        max_leaves=12,
    ),
    st.integers(min_value=100, max_value=1500).map(deep),
    st.integers(1000, 20_000).map(lambda n: [0] * n),
)


# JSON Schemas as a client may put them in response_format or a tool's
# parameters: costly bounds, wrong-typed keywords, nesting and fan-out.
_bounds = st.one_of(
    st.integers(0, 64),
    st.sampled_from([500, 5000, 20_000, 2**31, 10**12, -1]),
    st.sampled_from(["5", [1], None, 1.5, True]),
)
_schema_leaf = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["string", "integer", "number", "boolean", "null", "object", "array"]
        )
    },
    optional={
        "maxLength": _bounds,
        "minLength": _bounds,
        "minItems": _bounds,
        "maxItems": _bounds,
        "minimum": _bounds,
        "pattern": st.sampled_from(["^a{1,50000}$", "[a-z]{3}", "(", "(a|b)*c{2,9000}", 5]),
        "enum": st.lists(scalars, max_size=40),
        "format": st.sampled_from(["date", "date-time", "email", "uuid", ["date"]]),
    },
)
_wrong_schemas = st.sampled_from(
    [
        {"type": [["object"]]},
        {"type": {}},
        {"properties": []},
        {"type": "array", "items": 5},
        {"type": "array", "prefixItems": 5},
        {"$ref": "#/nope"},
        {"$ref": "#"},
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}},
        deep(300, {"type": "string"}),
    ]
)
json_schemas = st.one_of(
    _wrong_schemas,
    st.recursive(
        _schema_leaf,
        lambda inner: st.one_of(
            st.fixed_dictionaries(
                {
                    "type": st.just("object"),
                    "properties": st.dictionaries(st.text(max_size=6), inner, max_size=5),
                },
                optional={
                    "required": st.lists(st.text(max_size=6), max_size=3),
                    "additionalProperties": st.booleans(),
                },
            ),
            st.fixed_dictionaries({"type": st.just("array"), "items": inner}),
            st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=4)}),
        ),
        max_leaves=12,
    ),
)


def from_schema(
    schema: dict[str, Any], defs: dict[str, Any], depth: int = 0
) -> st.SearchStrategy[Any]:
    """Values that a JSON Schema (as pydantic writes it) accepts, roughly."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs, depth)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = defs[part["$ref"].rsplit("/", 1)[1]] if "$ref" in part else part
            merged.update(part)
        merged.update({k: v for k, v in schema.items() if k != "allOf"})
        return from_schema(merged, defs, depth)
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return st.one_of([from_schema(s, defs, depth) for s in schema[union]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties")
        if not props or depth > 3:
            return st.dictionaries(st.text(max_size=8), scalars, max_size=3)
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, defs, depth + 1) for k, v in props.items() if k in required},
            optional={
                k: from_schema(v, defs, depth + 1) for k, v in props.items() if k not in required
            },
        )
    if kind == "array":
        low = schema.get("minItems", 0)
        high = min(schema.get("maxItems", low + 3), low + 3)
        return st.lists(
            from_schema(schema.get("items", {}), defs, depth + 1), min_size=low, max_size=high
        )
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        if schema.get("format") == "date":
            return st.dates().map(lambda d: d.isoformat())
        if schema.get("format") == "date-time":
            return st.datetimes().map(lambda d: d.isoformat())
        low = schema.get("minLength", 0)
        return st.text(min_size=low, max_size=max(low, min(schema.get("maxLength", 12), 12)))
    if kind == "integer":
        return st.integers(schema.get("minimum", -100), schema.get("maximum", 1000))
    if kind == "number":
        return st.floats(schema.get("minimum", -1000), schema.get("maximum", 1000), allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return scalars


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*prefix, i)))
    return out


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid value with a few of its parts replaced, dropped or added to."""
    value = copy.deepcopy(draw(valid))  # drawn values may be shared constants
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(value)))
        if not path:
            value = draw(hostile)
            continue
        parent = value
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(hostile)
        elif action == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(odd_text)] = draw(hostile)
        else:
            parent.append(draw(hostile))
    return value


def encode(value: Any) -> bytes:
    """JSON as a client might send it: big integers kept, surrogates passed through."""
    text = json.dumps(value, ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'{"model": "scripted", "messages": [{"role": "user", "content": "x"}], "n": 1e999}',
            b'{"model": NaN}',
            b'{"model": "scripted", "model": "scripted-64", "messages": []}',
            b"[" * 5000 + b"]" * 5000,
            b'{"a":' * 3000 + b"1" + b"}" * 3000,
            b'{"model": "\xff\xfe"}',
            b'{"model": "scripted", "messages": [{"role": "user", "content": "\\ud800"}]}',
        ]
    ),
)


def bodies(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        valid.map(encode),
        valid.map(encode),
        mutated(valid).map(encode),
        hostile.map(encode),
        raw_bodies,
    )


def chat_requests(fuzzed: Fuzzed, models: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    schema = fuzzed.schemas["ChatCompletionRequest"]
    base = from_schema(schema, fuzzed.schemas)

    def settle(body: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {
                "model": st.sampled_from([*models, "nope"]),
                "max_tokens": st.integers(1, 16),
            }
        ).map(lambda fixed: {**body, **fixed, "max_completion_tokens": fixed["max_tokens"]})

    # Requests that are valid beyond the schema too (the schema allows, say, a
    # tool_choice naming no tool, which is a 400), so that answers are exercised.
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "developer"]), "content": st.text(max_size=40)}
    )
    simple = st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=1, max_size=3)},
        optional={
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0, 1),
            "n": st.integers(1, 4),
            "seed": st.integers(-(2**63), 2**63 - 1),
            "stop": st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4),
            "presence_penalty": st.floats(-2, 2),
            "user": st.text(max_size=20),
            "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=4),
        },
    ).flatmap(
        lambda body: st.sampled_from(
            [{}, {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}]
        ).map(lambda extra: {**body, **extra})
    )
    formats = json_schemas.map(
        lambda schema: {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "out", "schema": schema},
            }
        }
    )
    tools = st.tuples(json_schemas, st.sampled_from(["auto", "required", "none"])).map(
        lambda t: {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": t[0]}}],
            "tool_choice": t[1],
        }
    )
    structured = st.tuples(simple, st.one_of(formats, tools)).map(lambda t: {**t[0], **t[1]})
    return st.one_of(
        base.flatmap(settle),
        simple.flatmap(settle),
        simple.flatmap(settle),
        structured.flatmap(settle),
    )


def run(strategy: st.SearchStrategy[Any], check: Callable[[Any], None], examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def fuzz(case: Any) -> None:
        check(case)

    fuzz()


auths = st.sampled_from(["master"] * 6 + ["key", "key", "none", "junk"])


def _auth(fuzzed: Fuzzed, which: str) -> str | None:
    return {
        "master": f"Bearer {MASTER}",
        "key": f"Bearer {fuzzed.key['key']}",
        "none": None,
        "junk": "Basic \u00e9t\u00e9",
    }[which]


# ---------------------------------------------------------------- endpoints


def fuzz_chat(fuzzed: Fuzzed, examples: int, models: list[str] = MODELS) -> None:
    cases = st.tuples(bodies(chat_requests(fuzzed, models)), auths, st.booleans())

    def check(case: tuple[bytes, str, bool]) -> None:
        body, auth, fresh = case
        fuzzed.send(
            "POST /v1/chat/completions",
            "POST",
            "/v1/chat/completions",
            body=body,
            auth=_auth(fuzzed, auth),
            fresh=fresh,
        )

    run(cases, check, examples)


def responses_requests(fuzzed: Fuzzed, models: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    base = from_schema(fuzzed.schemas["ResponseCreateRequest"], fuzzed.schemas)
    part = st.fixed_dictionaries({"type": st.just("input_text"), "text": st.text(max_size=30)})
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "developer", "system"]),
            "content": st.one_of(st.text(max_size=30), st.lists(part, min_size=1, max_size=2)),
        },
        optional={"type": st.just("message"), "id": st.text(max_size=8)},
    )
    simple = st.fixed_dictionaries(
        {"input": st.one_of(st.text(max_size=40), st.lists(message, min_size=1, max_size=3))},
        optional={
            "instructions": st.text(max_size=20),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0, 1),
            "stream": st.booleans(),
            "store": st.booleans(),
            "background": st.booleans(),
            "reasoning": st.just({"summary": "auto"}),
            "include": st.just(["reasoning.encrypted_content"]),
            "prompt_cache_key": st.text(max_size=20),
            "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=4),
            "text": json_schemas.map(
                lambda schema: {"format": {"type": "json_schema", "name": "o", "schema": schema}}
            ),
            "tools": json_schemas.map(
                lambda schema: [{"type": "function", "name": "f", "parameters": schema}]
            ),
        },
    )

    def settle(body: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {"model": st.sampled_from([*models, "nope"]), "max_output_tokens": st.integers(1, 16)}
        ).map(lambda fixed: {**body, **fixed})

    return st.one_of(base.flatmap(settle), simple.flatmap(settle), simple.flatmap(settle))


def fuzz_responses(fuzzed: Fuzzed, examples: int, models: list[str] = MODELS) -> None:
    cases = st.tuples(
        bodies(responses_requests(fuzzed, models)),
        auths,
        st.sampled_from(["/v1/responses", "/v1/responses", "/v1/responses/input_tokens"]),
    )

    def check(case: tuple[bytes, str, str]) -> None:
        body, auth, path = case
        fuzzed.send(f"POST {path}", "POST", path, body=body, auth=_auth(fuzzed, auth))

    run(cases, check, examples)


def fuzz_response_ids(fuzzed: Fuzzed, examples: int) -> None:
    """Stored-response routes, with ids that exist (this key's, another's) and any text."""
    made = fuzzed.send(
        "POST /v1/responses",
        "POST",
        "/v1/responses",
        body=b'{"model": "scripted", "input": "x", "background": true}',
    ).json()["id"]
    ids = st.one_of(st.just(made), odd_text.filter(bool).map(lambda t: t[:500]))
    queries = st.fixed_dictionaries(
        {},
        optional={
            "stream": st.sampled_from(["true", "false", "x"]),
            "starting_after": st.one_of(
                st.integers(-3, 40).map(str),
                odd_text.map(
                    lambda t: t[:50].encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                ),
            ),
            "order": st.sampled_from(["asc", "desc", "x"]),
            "limit": st.integers(-1, 200).map(str),
            "after": st.text(max_size=10),
        },
    )
    routes = st.sampled_from(
        [
            ("GET", "/v1/responses/{}"),
            ("GET", "/v1/responses/{}/input_items"),
            ("POST", "/v1/responses/{}/cancel"),
            ("DELETE", "/v1/responses/{}"),
        ]
    )

    def check(case: tuple[tuple[str, str], str, dict[str, str], str]) -> None:
        (method, template), response_id, params, auth = case
        if method == "DELETE" and response_id == made and auth == "master":
            return  # keep it for the other routes
        raw = quote(response_id.encode("utf-8", "surrogatepass"), safe="")
        fuzzed.send(
            f"{method} {template}",
            method,
            template.format(raw),
            params=params,
            auth=_auth(fuzzed, auth),
        )

    run(st.tuples(routes, ids, queries, auths), check, examples)


def messages_requests(fuzzed: Fuzzed, models: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    base = from_schema(fuzzed.schemas["MessagesRequest"], fuzzed.schemas)
    text_block = st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text(max_size=30)},
        optional={"cache_control": st.just({"type": "ephemeral"})},
    )
    content = st.one_of(st.text(max_size=40), st.lists(text_block, min_size=1, max_size=2))
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "user", "system"]), "content": content}
    )
    simple = st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=1, max_size=3)},
        optional={
            "system": content,
            "temperature": st.floats(0, 1),
            "top_p": st.floats(0, 1),
            "top_k": st.integers(0, 500),
            "stream": st.booleans(),
            "stop_sequences": st.lists(st.text(min_size=1, max_size=5), max_size=6),
            "metadata": st.fixed_dictionaries({}, optional={"user_id": st.text(max_size=20)}),
            "thinking": st.sampled_from([{"type": "adaptive"}, {"type": "disabled"}]),
            "tools": json_schemas.map(lambda schema: [{"name": "f", "input_schema": schema}]),
            "tool_choice": st.sampled_from(
                [
                    {"type": "auto"},
                    {"type": "any"},
                    {"type": "none"},
                    {"type": "tool", "name": "f"},
                    {"type": "auto", "disable_parallel_tool_use": True},
                ]
            ),
        },
    )

    def settle(body: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {"model": st.sampled_from([*models, "nope"]), "max_tokens": st.integers(1, 100_000)}
        ).map(lambda fixed: {**body, **fixed})

    return st.one_of(base.flatmap(settle), simple.flatmap(settle), simple.flatmap(settle))


def fuzz_messages(fuzzed: Fuzzed, examples: int, models: list[str] = MODELS) -> None:
    paths = ["/v1/messages", "/v1/messages?beta=true", "/v1/messages/count_tokens"]
    cases = st.tuples(bodies(messages_requests(fuzzed, models)), auths, st.sampled_from(paths))

    def check(case: tuple[bytes, str, str]) -> None:
        body, auth, path = case
        fuzzed.send(f"POST {path}", "POST", path, body=body, auth=_auth(fuzzed, auth))

    run(cases, check, examples)


def completions_requests(fuzzed: Fuzzed, models: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    base = from_schema(fuzzed.schemas["CompletionRequest"], fuzzed.schemas)
    prompts = st.one_of(
        st.text(max_size=40),
        st.lists(st.text(max_size=20), min_size=1, max_size=3),
        st.lists(st.integers(0, 50000), min_size=1, max_size=8),
        st.lists(st.lists(st.integers(0, 50000), min_size=1, max_size=4), min_size=1, max_size=3),
    )
    simple = st.fixed_dictionaries(
        {"prompt": prompts},
        optional={
            "n": st.integers(1, 3),
            "echo": st.booleans(),
            "logprobs": st.integers(0, 5),
            "stop": st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4),
            "temperature": st.floats(0, 2),
            "stream": st.booleans(),
            "suffix": st.text(max_size=5),
        },
    )

    def settle(body: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {"model": st.sampled_from([*models, "nope"]), "max_tokens": st.integers(1, 16)}
        ).map(lambda fixed: {**body, **fixed})

    return st.one_of(base.flatmap(settle), simple.flatmap(settle), simple.flatmap(settle))


def embeddings_requests(fuzzed: Fuzzed, models: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    base = from_schema(fuzzed.schemas["EmbeddingRequest"], fuzzed.schemas)
    simple = st.fixed_dictionaries(
        {
            "input": st.one_of(
                st.text(min_size=1, max_size=40),
                st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4),
                st.lists(st.integers(0, 50000), min_size=1, max_size=8),
            )
        },
        optional={
            "encoding_format": st.sampled_from(["float", "base64"]),
            "dimensions": st.integers(1, 128),
        },
    )
    model = st.sampled_from([*models, "nope"])
    return st.one_of(base, simple, simple).flatmap(
        lambda body: model.map(lambda m: {**body, "model": m})
    )


def fuzz_completions_and_embeddings(
    fuzzed: Fuzzed, examples: int, models: list[str] = MODELS
) -> None:
    for path, requests in (
        ("/v1/completions", completions_requests),
        ("/v1/embeddings", embeddings_requests),
    ):
        cases = st.tuples(bodies(requests(fuzzed, models)), auths)

        def check(case: tuple[bytes, str], path: str = path) -> None:
            body, auth = case
            fuzzed.send(f"POST {path}", "POST", path, body=body, auth=_auth(fuzzed, auth))

        run(cases, check, examples)


def fuzz_admin_keys(fuzzed: Fuzzed, examples: int) -> None:
    created = from_schema(fuzzed.schemas["KeyCreate"], fuzzed.schemas)
    fields = from_schema(fuzzed.schemas["KeyFields"], fuzzed.schemas)
    key_ids = st.one_of(st.just(fuzzed.key["id"]), odd_text.filter(bool).map(lambda t: t[:2000]))

    def create(case: tuple[bytes, str]) -> None:
        fuzzed.send(
            "POST /admin/keys", "POST", "/admin/keys", body=case[0], auth=_auth(fuzzed, case[1])
        )

    def patch(case: tuple[bytes, str]) -> None:
        body, key_id = case
        path = f"/admin/keys/{quote(key_id.encode('utf-8', 'surrogatepass'), safe='')}"
        fuzzed.send("PATCH /admin/keys/{id}", "PATCH", path, body=body)

    run(st.tuples(bodies(created), auths), create, examples)
    run(st.tuples(bodies(fields), key_ids), patch, examples)
    # Rotation, on a key of its own (the fuzz's key keeps its secret).
    own = fuzzed.send("POST /admin/keys", "POST", "/admin/keys", body=b'{"name": "rotated"}')
    rotations = from_schema(fuzzed.schemas["KeyRotation"], fuzzed.schemas)
    rotated = st.one_of(st.just(own.json()["id"]), odd_text.filter(bool).map(lambda t: t[:2000]))

    def rotate(case: tuple[bytes, str]) -> None:
        body, key_id = case
        raw = quote(key_id.encode("utf-8", "surrogatepass"), safe="")
        path = f"/admin/keys/{raw}/rotate"
        fuzzed.send("POST /admin/keys/{id}/rotate", "POST", path, body=body)

    run(st.tuples(bodies(rotations), rotated), rotate, examples)
    # Listing every key still works, whatever was stored.
    listed = fuzzed.send("GET /admin/keys", "GET", "/admin/keys")
    assert listed.status_code == 200


def _query_strategy(fuzzed: Fuzzed, path: str) -> st.SearchStrategy[dict[str, str]]:
    params = fuzzed.openapi["paths"][path]["get"]["parameters"]
    values = st.one_of(
        st.integers(-5, 2000).map(str),
        st.sampled_from(
            [
                *("key", "model", "day", "key,model,day", "2026-01-01", "9999-12-31"),
                *("end_user", "tag:team,end_user", "tag:", "csv", "key.rotate"),
            ]
        ),
        # (at most 500 characters each: httpx refuses a query over 64 KiB)
        odd_text.map(lambda t: t[:500].encode("utf-8", "surrogatepass").decode("utf-8", "replace")),
    )
    return st.fixed_dictionaries({}, optional={p["name"]: values for p in params})


def fuzz_admin_queries(fuzzed: Fuzzed, examples: int) -> None:
    for path in ("/admin/usage", "/admin/requests", "/admin/audit", "/admin/alerts", "/v1/usage"):

        def check(params: dict[str, str], path: str = path) -> None:
            fuzzed.send(f"GET {path}", "GET", path, params=params)

        run(_query_strategy(fuzzed, path), check, examples)


def fuzz_paths(fuzzed: Fuzzed, examples: int) -> None:
    """Every route with a path parameter, and the routes without a body, with any key."""
    templates = [
        ("GET", "/v1/models/{}"),
        ("GET", "/admin/keys/{}"),
        ("DELETE", "/admin/keys/{}"),
        ("GET", "/admin/requests/{}"),
        ("GET", "/v1/models"),
        ("GET", "/v1/usage"),
        ("GET", "/admin/keys"),
        ("POST", "/v1/models"),
        ("GET", "/v1/{}"),
    ]
    segments = st.one_of(st.sampled_from(MODELS), odd_text.filter(bool).map(lambda t: t[:2000]))

    def check(case: tuple[tuple[str, str], str, str]) -> None:
        (method, template), segment, auth = case
        if method == "DELETE" and segment == fuzzed.key["id"]:
            return
        raw = quote(segment.encode("utf-8", "surrogatepass"), safe="")
        fuzzed.send(f"{method} {template}", method, template.format(raw), auth=_auth(fuzzed, auth))

    run(st.tuples(st.sampled_from(templates), segments, auths), check, examples)


# ---------------------------------------------------------------- the tests


def test_openapi_document_describes_the_api(fuzzed: Fuzzed) -> None:
    doc = fuzzed.openapi
    assert doc["openapi"].startswith("3.1")
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/models",
        "/v1/usage",
        "/admin/keys",
        "/admin/keys/{key_id}",
        "/admin/usage",
        "/admin/requests",
        "/admin/keys/{key_id}/rotate",
        "/admin/audit",
        "/admin/alerts",
        "/health",
    ):
        assert path in doc["paths"], path
    request = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages", "stream", "tools", "response_format"} <= set(request["properties"])
    assert request["additionalProperties"] is False
    # Every reference resolves.
    text = json.dumps(doc)
    for ref in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
        assert ref in doc["components"]["schemas"], ref
    jsonschema = pytest.importorskip("jsonschema")
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_fuzz_chat_completions(fuzzed: Fuzzed) -> None:
    fuzz_chat(fuzzed, EXAMPLES)
    assert fuzzed.counts["POST /v1/chat/completions"] >= EXAMPLES
    # Not only refusals: valid requests were generated and answered too.
    assert fuzzed.ok.get("POST /v1/chat/completions", 0) >= EXAMPLES // 20, fuzzed.ok


def test_fuzz_responses(fuzzed: Fuzzed) -> None:
    fuzz_responses(fuzzed, EXAMPLES)
    assert fuzzed.ok.get("POST /v1/responses", 0) >= EXAMPLES // 20, fuzzed.ok
    fuzz_response_ids(fuzzed, EXAMPLES)


def test_fuzz_messages(fuzzed: Fuzzed) -> None:
    fuzz_messages(fuzzed, EXAMPLES)
    assert fuzzed.ok.get("POST /v1/messages", 0) >= EXAMPLES // 20, fuzzed.ok


def test_fuzz_completions_and_embeddings(fuzzed: Fuzzed) -> None:
    fuzz_completions_and_embeddings(fuzzed, EXAMPLES)
    for endpoint in ("POST /v1/completions", "POST /v1/embeddings"):
        assert fuzzed.ok.get(endpoint, 0) >= EXAMPLES // 20, fuzzed.ok


def test_fuzz_admin_keys(fuzzed: Fuzzed) -> None:
    fuzz_admin_keys(fuzzed, EXAMPLES)
    # Some generated bodies must be valid, or the fuzz proves nothing about the
    # success path (typically 5-10% are; 1% keeps the check from being flaky).
    assert fuzzed.ok.get("POST /admin/keys", 0) >= max(EXAMPLES // 100, 1), fuzzed.ok


def test_fuzz_admin_queries(fuzzed: Fuzzed) -> None:
    fuzz_admin_queries(fuzzed, EXAMPLES)


def test_fuzz_paths_and_keys(fuzzed: Fuzzed) -> None:
    fuzz_paths(fuzzed, EXAMPLES)


def test_after_the_fuzz_the_server_is_healthy_and_flat(fuzzed: Fuzzed) -> None:
    """Another round of everything: memory and descriptors do not grow with it."""
    pid = fuzzed.server.proc.pid  # type: ignore[union-attr]

    def settled() -> tuple[int, int]:
        fuzzed.http.close()
        fuzzed.http = httpx.Client(base_url=fuzzed.server.base, timeout=TIMEOUT)
        time.sleep(1.0)  # the server sees the client's connections close
        return proc_stats(pid)

    rounds = max(EXAMPLES // 2, 50)
    fuzz_chat(fuzzed, rounds)  # warm: every path taken once more
    rss_before, fds_before = settled()
    fuzz_chat(fuzzed, rounds)
    fuzz_responses(fuzzed, rounds)
    fuzz_admin_keys(fuzzed, rounds)
    fuzz_admin_queries(fuzzed, rounds)
    fuzz_paths(fuzzed, rounds)
    rss_after, fds_after = settled()
    health = httpx.get(f"{fuzzed.server.base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert fds_after <= fds_before + 2, (fds_before, fds_after)
    assert rss_after - rss_before < 24 * 1024, (rss_before, rss_after)
    print(f"\nfuzz requests by endpoint: {fuzzed.counts}")
    print(f"by status: {dict(sorted(fuzzed.statuses.items()))}; 2xx by endpoint: {fuzzed.ok}")
    print(f"server RSS {rss_before} -> {rss_after} KiB, fds {fds_before} -> {fds_after}")


@pytest.mark.slow
def test_fuzz_chat_completions_on_the_real_model(model_server: Server) -> None:
    target = Fuzzed(model_server)
    try:
        fuzz_chat(target, max(EXAMPLES // 4, 25), models=["SmolLM2-135M-Instruct"])
        health = httpx.get(f"{model_server.base}/health", timeout=10)
        assert health.status_code == 200
    finally:
        target.http.close()
