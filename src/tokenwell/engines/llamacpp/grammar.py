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

What a schema may cost is bounded before its grammar is built (``check_cost``)
and checked again on the GBNF produced (``check_gbnf``). llama.cpp expands a
bounded repetition ``x{0,N}`` (and the converter writes ``maxLength``,
``maxItems`` and ``{n,m}`` in a ``pattern`` as) N nested optional groups; its
GBNF parser recurses once per nesting level, so about 18,700 levels
(``maxLength: 18695`` on an 8 MiB stack) overflow the C stack and kill the
process with SIGSEGV, before llama.cpp's own limit (a group generating more
than 2,000 rules is refused: ``maxLength`` 1,000 passes, 1,001 is refused)
is ever checked. Every limit below is a module constant, documented in the
README, and each one has been run in a child process at and beyond its value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from llama_cpp.llama_grammar import JSON_GBNF, BuiltinRule, SchemaConverter

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import ToolDef
from tokenwell.protocol.schemas import check_schema_shape, short_name

# ---- what one request's schemas may cost (response_format and all tools together)
# minLength/maxLength/minItems/maxItems and every {n,m} in a pattern (and the
# product of nested ones): llama.cpp refuses a group of more than 2,000 rules,
# which is a repetition above 1,000; the parser crashes near 18,700.
MAX_REPETITION = 1_000
# A pattern's length and how deeply its groups nest.
MAX_PATTERN_LENGTH = 1_000
MAX_PATTERN_NESTING = 32
# Alternatives open at once at one place of the output (enum values, anyOf/oneOf
# branches, type lists, summed through nesting and $ref): each is a grammar
# stack that every candidate token is checked against, on every token. 256
# costs about as much per token as an unconstrained JSON object; 1,000 costs
# ~10x, 5,000 ~50x.
MAX_ALTERNATIVES = 256
# Properties in all the schemas of a request, and optional (not required)
# properties of one object: the converter's work grows with the square of an
# object's optional properties (900 took 2 s of CPU; 2,000 overflowed
# Python's recursion limit).
MAX_PROPERTIES = 2_000
MAX_OPTIONAL_PROPERTIES = 100
MAX_OPTIONAL_PROPERTIES_TOTAL = 200
# $defs/definitions in a request's schemas, and $ref hops followed in a row.
MAX_DEFINITIONS = 256
MAX_REF_DEPTH = 32
# The GBNF itself: its size, its rules, and how deeply its groups nest (the
# parser's recursion; crash measured at ~18,700, the limit leaves 15x margin).
MAX_GBNF_BYTES = 1_000_000
MAX_GBNF_RULES = 20_000
MAX_GBNF_NESTING = 1_200

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
_ANNOTATIONS = {
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


def check_schema(schema: Any, where: str, budget: Budget | None = None) -> None:
    """Raise InvalidRequest for anything the grammar could not enforce, or that costs too much."""
    check_schema_shape(schema, where)
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
    check_cost(schema, where, budget if budget is not None else Budget())


@dataclass(slots=True)
class Budget:
    """What the schemas of one request have used so far (they share one grammar)."""

    properties: int = 0
    optional: int = 0
    definitions: int = 0


def _too_large(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': the schema is too large to enforce: {message}",
        param=param,
        code="schema_too_large",
    )


def check_cost(schema: dict[str, Any], where: str, budget: Budget) -> None:
    """Bound what the schema's grammar costs to build and to apply, before it is built."""
    for path, node in _walk(schema, where):
        for key in ("minLength", "maxLength", "minItems", "maxItems"):
            value = node.get(key)
            if isinstance(value, int) and value > MAX_REPETITION:
                raise _too_large(
                    f"{path}.{key}", f"{key} may be at most {MAX_REPETITION}, got {value}."
                )
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            _check_pattern(pattern, f"{path}.pattern")
        properties = node.get("properties")
        if isinstance(properties, dict):
            budget.properties += len(properties)
            if budget.properties > MAX_PROPERTIES:
                raise _too_large(
                    f"{path}.properties",
                    f"at most {MAX_PROPERTIES} properties in all, over every schema of "
                    "the request.",
                )
            required = node.get("required")
            required = set(required) if isinstance(required, list) else set()
            optional = sum(1 for name in properties if name not in required)
            budget.optional += optional
            if budget.optional > MAX_OPTIONAL_PROPERTIES_TOTAL:
                raise _too_large(
                    f"{path}.properties",
                    f"at most {MAX_OPTIONAL_PROPERTIES_TOTAL} optional properties (not in "
                    "'required') in all, over every schema of the request.",
                )
            if optional > MAX_OPTIONAL_PROPERTIES:
                raise _too_large(
                    f"{path}.properties",
                    f"an object may have at most {MAX_OPTIONAL_PROPERTIES} optional "
                    f"properties (not in 'required'), got {optional}.",
                )
        for key in ("$defs", "definitions"):
            defs = node.get(key)
            if isinstance(defs, dict):
                budget.definitions += len(defs)
                if budget.definitions > MAX_DEFINITIONS:
                    raise _too_large(
                        f"{path}.{key}", f"at most {MAX_DEFINITIONS} definitions in all."
                    )
    _Alternatives(schema, where).check(schema, where)


class _Alternatives:
    """How many alternatives a schema opens at once where its value starts.

    An enum of n values, an anyOf/oneOf of n branches or a list of n types is n
    grammar stacks at that place; a branch that is itself a choice adds its own;
    a $ref counts what it refers to.
    """

    def __init__(self, root: dict[str, Any], where: str) -> None:
        self.root = root
        self.where = where
        self.memo: dict[int, int] = {}

    def check(self, node: Any, path: str) -> None:
        count = self.count(node, path, 0)
        if count > MAX_ALTERNATIVES:  # pragma: no cover - count() raises first
            raise _too_large(path, f"{count} alternatives.")

    def count(self, node: Any, path: str, hops: int) -> int:
        if not isinstance(node, dict):
            return 1
        key = id(node)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = 1  # a recursive $ref back here counts as one
        total, where = 1, path
        ref = node.get("$ref")
        if isinstance(ref, str):
            if hops >= MAX_REF_DEPTH:
                raise _too_large(
                    f"{path}.$ref", f"at most {MAX_REF_DEPTH} references followed in a row."
                )
            target = self.resolve(ref)
            at = self.where + ref[1:].replace("/", ".")  # #/$defs/a → where.$defs.a
            total = self.count(target, at, hops + 1) if target is not None else 1
        elif isinstance(node.get("anyOf") or node.get("oneOf"), list):
            key_name = "oneOf" if node.get("oneOf") else "anyOf"
            total = sum(
                self.count(child, f"{path}.{key_name}.[{i}]", hops)
                for i, child in enumerate(node[key_name])
            )
            where = f"{path}.{key_name}"
        elif isinstance(node.get("type"), list):
            total, where = len(node["type"]), f"{path}.type"
        elif "const" in node:
            total = 1
        elif isinstance(node.get("enum"), list):
            total, where = len(node["enum"]), f"{path}.enum"
        if total > MAX_ALTERNATIVES:
            raise _too_large(
                where,
                f"at most {MAX_ALTERNATIVES} alternatives (enum values, anyOf/oneOf "
                f"branches, types) may be open at once, got {total}.",
            )
        self.memo[key] = total
        return total

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        node: Any = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and re.fullmatch(r"[0-9]+", part) and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node


_QUANTIFIER = re.compile(r"\{\s*([0-9]*)\s*(?:,\s*([0-9]*)\s*)?\}")


def _check_pattern(pattern: str, param: str) -> None:
    """Bound a pattern's size, nesting and (nested) {n,m} repetitions."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise _too_large(param, f"a pattern may be at most {MAX_PATTERN_LENGTH} characters long.")
    # One frame per open group: [largest repetition product inside, the last atom's].
    frames: list[list[int]] = [[1, 1]]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        frame = frames[-1]
        if c == "\\":
            frame[1] = 1
            i += 2
            continue
        if c == "[":
            j = i + 1
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            frame[1] = 1
            i = j + 1
            continue
        if c == "(":
            frames.append([1, 1])
            if len(frames) > MAX_PATTERN_NESTING + 1:
                raise _too_large(
                    param, f"a pattern's groups may nest at most {MAX_PATTERN_NESTING} deep."
                )
        elif c == ")":
            if len(frames) > 1:
                inner = frames.pop()[0]
                frames[-1][1] = inner
                frames[-1][0] = max(frames[-1][0], inner)
        elif c == "{":
            match = _QUANTIFIER.match(pattern, i)
            if match is not None:
                low = int(match.group(1) or "0")
                high = int(match.group(2) or "0") if match.group(2) is not None else low
                bound = max(low, high)
                product = frame[1] * max(bound, 1)
                if bound > MAX_REPETITION or product > MAX_REPETITION:
                    raise _too_large(
                        param,
                        f"a repetition {{n,m}} (times the repetitions around it) may be "
                        f"at most {MAX_REPETITION}, got {product}.",
                    )
                frame[0] = max(frame[0], product)
                i = match.end()
                continue
            frame[1] = 1
        elif c not in "*+?|^$":
            frame[1] = 1
        i += 1


def check_gbnf(gbnf: str, param: str) -> None:
    """Refuse a generated grammar beyond what llama.cpp was shown to handle safely."""
    if len(gbnf) > MAX_GBNF_BYTES:
        raise _too_large(
            param, f"its grammar would be {len(gbnf)} bytes (at most {MAX_GBNF_BYTES})."
        )
    rules = 0
    depth = deepest = 0
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c == ":" and gbnf.startswith("::=", i):
            rules += 1
        i += 1
    if deepest > MAX_GBNF_NESTING:
        raise _too_large(
            param, f"its grammar would nest {deepest} deep (at most {MAX_GBNF_NESTING})."
        )
    if rules > MAX_GBNF_RULES:
        raise _too_large(param, f"its grammar would have {rules} rules (at most {MAX_GBNF_RULES}).")


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, node
    if not isinstance(node, dict):
        return
    for key in ("properties", "$defs", "definitions"):
        children = node.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                yield from _walk(child, f"{path}.{key}.{short_name(name)}")
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


def relaxed(schema: Any, where: str) -> Any:
    """A copy of ``schema`` without what the grammar cannot enforce (``minimum``,
    ``not``, a ``format`` it lacks…), for a function whose schema is guidance
    (``strict: false``; every Anthropic tool without ``strict``): the output holds
    to the rest, and those keywords are the model's to respect, as on Anthropic.
    Lengths beyond what a grammar can afford (``MAX_REPETITION``) go the same way."""
    check_schema_shape(schema, where)  # bounded before the walk recurses
    if not isinstance(schema, dict):
        return schema
    copy = orjson.loads(orjson.dumps(schema))
    for _, node in list(_walk(copy, where)):
        if isinstance(node, dict):
            for key in [k for k in node if k not in _SUPPORTED]:
                del node[key]
            if "format" in node and node["format"] not in _FORMATS:
                del node["format"]
            for key in ("minLength", "maxLength", "minItems", "maxItems"):
                value = node.get(key)
                if isinstance(value, int) and value > MAX_REPETITION:
                    del node[key]  # too costly to enforce; as guidance it binds little
            if node and not node.keys() - _ANNOTATIONS:
                # Only a description: any value (the converter knows no such schema).
                node["type"] = sorted(_TYPES)
    return copy


# A character of a JSON string. llama-cpp-python's converter allows any but
# '"' and '\\', raw control characters included, which no JSON parser takes
# (a sampled tool call once had a raw one in an argument); llama.cpp's own
# json grammar, and JSON itself, exclude them.
_JSON_CHAR = BuiltinRule(
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | '
    r'"u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])',
    [],
)


class _Converter(SchemaConverter):
    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return str(super()._add_primitive(name, _JSON_CHAR if name == "char" else rule))


def _converter() -> SchemaConverter:
    return _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _visit(converter: SchemaConverter, schema: dict[str, Any], name: str, where: str) -> str:
    try:
        # resolve_refs rewrites the schema it is given: hand it a copy.
        resolved = converter.resolve_refs(orjson.loads(orjson.dumps(schema)), "request")
        return str(converter.visit(resolved, name))
    except RecursionError as exc:
        raise _too_large(where, "it nests too deeply (through $ref).") from exc
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError) as exc:
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
    gbnf = str(converter.format_grammar())
    check_gbnf(gbnf, where)
    return gbnf


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
    budget = Budget()
    calls: list[str] = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if only is not None and fn.name != only:
            continue
        where = f"tools.[{i}].function.parameters"
        parameters = fn.parameters if fn.parameters is not None else {"type": "object"}
        if fn.strict is False:
            parameters = relaxed(parameters, where)
        check_schema(parameters, where, budget)
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
            check_schema(schema or {}, where, budget)
            answer = _visit(converter, schema or {}, "answer", where)
        root = f"({root}) | {answer}"
    converter._add_rule("root", root)
    gbnf = str(converter.format_grammar())
    check_gbnf(gbnf, "tools")
    return gbnf


def _object_rule() -> Any:
    from llama_cpp.llama_grammar import PRIMITIVE_RULES

    return PRIMITIVE_RULES["object"]
