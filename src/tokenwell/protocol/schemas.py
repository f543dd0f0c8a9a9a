"""JSON schemas inside requests (``response_format``, tool ``parameters``): their shape.

Checked for every engine, before anything walks a schema recursively,
serialises it (orjson stops at 254 levels, while parsing accepts 1,024) or
turns it into a grammar:

- the nesting depth of the schema document is bounded (``MAX_SCHEMA_DEPTH``),
  and so is its number of JSON values (``MAX_SCHEMA_NODES``);
- every keyword tokenwell knows has a value of the type JSON Schema gives it
  (``type: {}``, ``properties: []``, ``items: 5``, ``pattern: 5``,
  ``minLength: -1`` … are a 400 naming the keyword).

Keywords tokenwell does not know are left alone here; an engine that enforces
schemas itself (llama.cpp's grammars) refuses those it cannot enforce, and
bounds what a schema may cost (``engines/llamacpp/grammar.py``).

The checks are iterative (an explicit stack), never recursive, so a hostile
schema cannot exhaust the interpreter's stack.
"""

from __future__ import annotations

from typing import Any

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.validation import json_type_name

# JSON nesting levels of one schema document (``{"properties": {"a": {...}}}`` is
# two levels per object schema). OpenAI allows 10 levels of object nesting;
# 64 leaves room for that and for anyOf/items wrappers, and keeps a whole
# request far below orjson's 254-level limit on serialising.
MAX_SCHEMA_DEPTH = 64
# JSON values (objects, arrays, strings, numbers, ...) in one schema document.
MAX_SCHEMA_NODES = 50_000

JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# keyword → what its value must be
_SCHEMA = "schema"  # a schema: an object (or true/false)
_SCHEMA_OR_LIST = "schema-or-list"  # items (the old tuple form is a list of schemas)
_SCHEMA_MAP = "schema-map"  # an object whose values are schemas
_SCHEMA_LIST = "schema-list"  # a non-empty array of schemas
_STRING = "string"
_STRING_LIST = "string-list"
_COUNT = "count"  # a non-negative integer
_NUMBER = "number"
_NUMBER_OR_BOOL = "number-or-bool"  # exclusiveMinimum/Maximum (a boolean in draft 4)
_POSITIVE = "positive"
_BOOL = "bool"
_ARRAY = "array"
_NONEMPTY_ARRAY = "nonempty-array"
_TYPE = "type"
_DEPENDENT_REQUIRED = "dependent-required"

_KEYWORDS: dict[str, str] = {
    "type": _TYPE,
    "properties": _SCHEMA_MAP,
    "patternProperties": _SCHEMA_MAP,
    "$defs": _SCHEMA_MAP,
    "definitions": _SCHEMA_MAP,
    "dependentSchemas": _SCHEMA_MAP,
    "additionalProperties": _SCHEMA,
    "unevaluatedProperties": _SCHEMA,
    "propertyNames": _SCHEMA,
    "items": _SCHEMA_OR_LIST,
    "additionalItems": _SCHEMA,
    "unevaluatedItems": _SCHEMA,
    "contains": _SCHEMA,
    "not": _SCHEMA,
    "if": _SCHEMA,
    "then": _SCHEMA,
    "else": _SCHEMA,
    "prefixItems": _SCHEMA_LIST,
    "anyOf": _SCHEMA_LIST,
    "oneOf": _SCHEMA_LIST,
    "allOf": _SCHEMA_LIST,
    "required": _STRING_LIST,
    "enum": _NONEMPTY_ARRAY,
    "examples": _ARRAY,
    "pattern": _STRING,
    "format": _STRING,
    "$ref": _STRING,
    "$schema": _STRING,
    "$id": _STRING,
    "$anchor": _STRING,
    "$comment": _STRING,
    "title": _STRING,
    "description": _STRING,
    "contentEncoding": _STRING,
    "contentMediaType": _STRING,
    "minLength": _COUNT,
    "maxLength": _COUNT,
    "minItems": _COUNT,
    "maxItems": _COUNT,
    "minProperties": _COUNT,
    "maxProperties": _COUNT,
    "minContains": _COUNT,
    "maxContains": _COUNT,
    "minimum": _NUMBER,
    "maximum": _NUMBER,
    "exclusiveMinimum": _NUMBER_OR_BOOL,
    "exclusiveMaximum": _NUMBER_OR_BOOL,
    "multipleOf": _POSITIVE,
    "uniqueItems": _BOOL,
    "deprecated": _BOOL,
    "readOnly": _BOOL,
    "writeOnly": _BOOL,
    "dependentRequired": _DEPENDENT_REQUIRED,
}
_EXPECTED = {
    _SCHEMA: "a schema (an object or a boolean)",
    _SCHEMA_OR_LIST: "a schema (an object or a boolean)",
    _SCHEMA_MAP: "an object whose values are schemas",
    _SCHEMA_LIST: "a non-empty array of schemas",
    _STRING: "a string",
    _STRING_LIST: "an array of strings",
    _COUNT: "a non-negative integer",
    _NUMBER: "a number",
    _NUMBER_OR_BOOL: "a number",
    _POSITIVE: "a number greater than 0",
    _BOOL: "a boolean",
    _ARRAY: "an array",
    _NONEMPTY_ARRAY: "a non-empty array",
    _TYPE: "a JSON schema type or a non-empty array of them",
    _DEPENDENT_REQUIRED: "an object whose values are arrays of strings",
}
_PAIRS = (
    ("minLength", "maxLength"),
    ("minItems", "maxItems"),
    ("minProperties", "maxProperties"),
    ("minContains", "maxContains"),
)


def check_schema_shape(schema: Any, where: str) -> None:
    """Raise InvalidRequest (``param`` = the offending place) for a malformed schema."""
    check_depth(schema, where, MAX_SCHEMA_DEPTH)
    if not isinstance(schema, dict):
        _invalid(
            where,
            f"Invalid type for '{where}': expected a JSON schema (an object), "
            f"but got {json_type_name(schema)} instead.",
            "invalid_type",
        )
    pending: list[tuple[Any, str]] = [(schema, where)]
    while pending:
        node, path = pending.pop()
        if isinstance(node, bool):
            continue  # true / false: valid schemas
        if not isinstance(node, dict):
            _invalid(
                path,
                f"Invalid type for '{path}': expected a schema (an object or a boolean), "
                f"but got {json_type_name(node)} instead.",
                "invalid_type",
            )
        for key, value in node.items():
            kind = _KEYWORDS.get(key)
            if kind is None:
                continue
            at = f"{path}.{key}"
            if not _valid(kind, value):
                _invalid(
                    at,
                    f"Invalid '{at}': expected {_EXPECTED[kind]}, "
                    f"but got {_describe(value)} instead.",
                    "invalid_type" if _wrong_json_type(kind, value) else "invalid_value",
                )
            if kind == _SCHEMA:
                pending.append((value, at))
            elif kind == _SCHEMA_OR_LIST:
                if isinstance(value, list):
                    pending.extend((item, f"{at}.[{i}]") for i, item in enumerate(value))
                else:
                    pending.append((value, at))
            elif kind == _SCHEMA_MAP:
                pending.extend((child, f"{at}.{short_name(name)}") for name, child in value.items())
            elif kind == _SCHEMA_LIST:
                pending.extend((item, f"{at}.[{i}]") for i, item in enumerate(value))
        for low, high in _PAIRS:
            lo, hi = node.get(low), node.get(high)
            if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
                at = f"{path}.{low}"
                _invalid(
                    at, f"Invalid '{at}': {lo} is greater than '{high}' ({hi}).", "invalid_value"
                )


def check_depth(value: Any, where: str, limit: int) -> None:
    """Bound the nesting depth and the size of a JSON value, without recursing."""
    pending: list[tuple[Any, str, int]] = [(value, where, 1)]
    seen = 0
    while pending:
        node, path, depth = pending.pop()
        seen += 1
        if seen > MAX_SCHEMA_NODES:
            _invalid(
                where,
                f"Invalid '{where}': the schema is too large (more than {MAX_SCHEMA_NODES} "
                "JSON values).",
                "schema_too_large",
            )
        if depth > limit:
            _invalid(
                path,
                f"Invalid '{where}': the schema is nested too deeply (more than {limit} "
                f"levels, at '{path}').",
                "schema_too_large",
            )
        if isinstance(node, dict):
            pending.extend(
                (child, f"{path}.{short_name(key)}", depth + 1) for key, child in node.items()
            )
        elif isinstance(node, list):
            pending.extend((child, f"{path}.[{i}]", depth + 1) for i, child in enumerate(node))


def short_name(name: str) -> str:
    """A property name as it appears in a ``param`` path (a hostile one may be huge)."""
    return name if len(name) <= 64 else name[:61] + "..."


def _valid(kind: str, value: Any) -> bool:
    if kind in (_SCHEMA, _SCHEMA_OR_LIST):
        return isinstance(value, dict | bool) or (kind == _SCHEMA_OR_LIST and _schemas(value))
    if kind == _SCHEMA_MAP:
        return isinstance(value, dict) and all(isinstance(v, dict | bool) for v in value.values())
    if kind == _SCHEMA_LIST:
        return _schemas(value) and len(value) > 0
    if kind == _STRING:
        return isinstance(value, str)
    if kind == _STRING_LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == _COUNT:
        return _integer(value) and value >= 0
    if kind == _NUMBER:
        return _number(value)
    if kind == _NUMBER_OR_BOOL:
        return _number(value) or isinstance(value, bool)
    if kind == _POSITIVE:
        return _number(value) and value > 0
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _ARRAY:
        return isinstance(value, list)
    if kind == _NONEMPTY_ARRAY:
        return isinstance(value, list) and len(value) > 0
    if kind == _TYPE:
        kinds = value if isinstance(value, list) else [value]
        return (
            len(kinds) > 0
            and all(isinstance(k, str) and k in JSON_TYPES for k in kinds)
            and len(set(kinds)) == len(kinds)
        )
    if kind == _DEPENDENT_REQUIRED:
        return isinstance(value, dict) and all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in value.values()
        )
    raise AssertionError(kind)  # pragma: no cover


def _schemas(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict | bool) for v in value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value == value)


def _wrong_json_type(kind: str, value: Any) -> bool:
    """Whether the value has the wrong JSON type (rather than the right type, a bad value)."""
    if kind in (_COUNT, _NUMBER, _POSITIVE):
        return not _number(value)
    if kind == _TYPE:
        return not isinstance(value, str | list)
    if kind in (_STRING_LIST, _ARRAY, _NONEMPTY_ARRAY, _SCHEMA_LIST):
        return not isinstance(value, list)
    if kind in (_SCHEMA_MAP, _DEPENDENT_REQUIRED):
        return not isinstance(value, dict)
    return True


def _describe(value: Any) -> str:
    text = repr(value) if isinstance(value, str | int | float) else json_type_name(value)
    if isinstance(value, list | dict):
        return json_type_name(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _invalid(param: str, message: str, code: str) -> None:
    raise InvalidRequest(message, param=param, code=code)
