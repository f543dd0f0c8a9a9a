"""Grammars (llama.cpp GBNF) that make the output match what was asked.

- ``response_format: json_object`` → any JSON object;
  ``json_schema`` → JSON matching the schema;
- tool calls → ``<tool_call>\\n{"name": "<one of the tools>", "arguments":
  <that tool's parameters>}\\n</tool_call>``, one or (with parallel calls)
  several.

Schemas are converted by llama-cpp-python's ``SchemaConverter``, which ignores
keywords it does not implement; ignoring one would break the promise that the
output matches the schema, so such keywords are refused here with a 400 that
names where they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import ToolDef

# What the converter turns into grammar (and so what the output is held to).
_SUPPORTED = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    # annotations: no effect on what is valid
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
}
_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"


def check_schema(schema: Any, where: str) -> None:
    """Raise InvalidRequest for anything the grammar could not enforce."""
    for path, node in _walk(schema, where):
        if not isinstance(node, dict):
            raise InvalidRequest(
                f"Invalid '{path}': a JSON schema must be an object.",
                param=path,
                code="invalid_schema",
            )
        for key, value in node.items():
            if key not in _SUPPORTED:
                raise InvalidRequest(
                    f"Invalid '{path}': the schema keyword '{key}' is not supported "
                    "(the output could not be guaranteed to match it).",
                    param=f"{path}.{key}",
                    code="unsupported_schema",
                )
            if key == "format" and value not in _FORMATS:
                raise InvalidRequest(
                    f"Invalid '{path}.format': '{value}' is not supported; supported formats "
                    f"are {', '.join(sorted(_FORMATS))}.",
                    param=f"{path}.format",
                    code="unsupported_schema",
                )
            if key == "$ref" and not str(value).startswith("#/"):
                raise InvalidRequest(
                    f"Invalid '{path}.$ref': only references inside the schema (#/...) "
                    "are supported.",
                    param=f"{path}.$ref",
                    code="unsupported_schema",
                )
            if key == "type":
                kinds = value if isinstance(value, list) else [value]
                if not kinds or any(k not in _TYPES for k in kinds):
                    raise InvalidRequest(
                        f"Invalid '{path}.type': {value!r} is not a JSON schema type.",
                        param=f"{path}.type",
                        code="invalid_schema",
                    )


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, node
    if not isinstance(node, dict):
        return
    for key in ("properties", "$defs", "definitions"):
        children = node.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                yield from _walk(child, f"{path}.{key}.{name}")
    for key in ("items", "additionalProperties"):
        child = node.get(key)
        if isinstance(child, dict):
            yield from _walk(child, f"{path}.{key}")
        elif isinstance(child, list):
            for i, item in enumerate(child):
                yield from _walk(item, f"{path}.{key}.[{i}]")
    for key in ("prefixItems", "anyOf", "oneOf", "allOf"):
        children = node.get(key)
        if isinstance(children, list):
            for i, child in enumerate(children):
                yield from _walk(child, f"{path}.{key}.[{i}]")


def _converter() -> SchemaConverter:
    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _visit(converter: SchemaConverter, schema: dict[str, Any], name: str, where: str) -> str:
    try:
        # resolve_refs rewrites the schema it is given: hand it a copy.
        resolved = converter.resolve_refs(orjson.loads(orjson.dumps(schema)), "request")
        return str(converter.visit(resolved, name))
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(
            f"Invalid '{where}': the schema cannot be turned into a grammar: {exc}",
            param=where,
            code="invalid_schema",
        ) from exc


def _literal(text: str) -> str:
    return orjson.dumps(text).decode()


def response_grammar(kind: str, schema: dict[str, Any] | None, where: str) -> str:
    """GBNF for ``response_format`` (``json_object`` or ``json_schema``)."""
    if kind == "json_object":
        return JSON_GBNF
    schema = schema if schema is not None else {}
    check_schema(schema, where)
    converter = _converter()
    _visit(converter, schema, "", where)
    return str(converter.format_grammar())


def tools_grammar(
    tools: tuple[ToolDef, ...],
    *,
    only: str | None,
    parallel: bool,
    text_alternative: tuple[str, dict[str, Any] | None] | None = None,
) -> str:
    """GBNF for tool calls, from ``<tool_call>`` on (also the lazy grammar's root).

    ``only`` restricts the calls to one function (a named ``tool_choice``);
    ``text_alternative`` lets the whole answer be JSON of a response_format
    instead of calls (``tool_choice: auto`` with structured output).
    """
    converter = _converter()
    calls: list[str] = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if only is not None and fn.name != only:
            continue
        where = f"tools.[{i}].function.parameters"
        parameters = fn.parameters if fn.parameters is not None else {"type": "object"}
        check_schema(parameters, where)
        args = _visit(converter, parameters, f"fn{i}-args", where)
        head = _literal(f'{{"name": "{fn.name}", "arguments": ')
        converter._add_rule(f"fn{i}-call", f"{head} {args} {_literal('}')}")
        calls.append(f"fn{i}-call")
    converter._add_rule("tool-call", " | ".join(calls))
    one = f"{_literal(CALL_OPEN)} tool-call {_literal(CALL_CLOSE)}"
    converter._add_rule("one-call", one)
    root = 'one-call ("\\n" one-call)*' if parallel else "one-call"
    if text_alternative is not None:
        kind, schema = text_alternative
        if kind == "json_object":
            answer = converter._add_primitive("object", _object_rule())
        else:
            where = "response_format.json_schema.schema"
            check_schema(schema or {}, where)
            answer = _visit(converter, schema or {}, "answer", where)
        root = f"({root}) | {answer}"
    converter._add_rule("root", root)
    return str(converter.format_grammar())


def _object_rule() -> Any:
    from llama_cpp.llama_grammar import PRIMITIVE_RULES

    return PRIMITIVE_RULES["object"]
