"""Turn pydantic validation errors into OpenAI-style 400s.

OpenAI names the offending parameter with a dotted path whose list indexes
are bracketed (``messages.[0].content``) and says what was expected and what
was got. One translator covers every request model, so the messages read the
same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, ValidationError

from tokenwell.errors import InvalidRequest

_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}


# Union branches are tagged with their JSON type behind this mark, so an error
# path can drop the tag: ``stop`` rather than ``stop.list[str]``.
_BRANCH = "\u00a7"
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "array": list, "object": dict}
_JSON_WORDS = {"string": "a string", "array": "an array", "object": "an object"}


def one_of(**branches: Any) -> Any:
    """A union chosen by the value's JSON type: ``one_of(string=str, array=list[str])``."""

    def pick(value: Any) -> str | None:
        for name in branches:
            if isinstance(value, _JSON_TYPES[name]):
                return _BRANCH + name
        return None

    expected = " or ".join(_JSON_WORDS[name] for name in branches)
    members = tuple(Annotated[kind, Tag(_BRANCH + name)] for name, kind in branches.items())
    return Annotated[
        Union[members],  # noqa: UP007 - a runtime-built union
        Discriminator(
            pick,
            custom_error_type="union_type",
            custom_error_message=f"expected {expected}",
        ),
    ]


def json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def require_object(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else the 400 OpenAI answers, naming ``where``."""
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"Invalid type for '{where}': expected an object, but got "
            f"{json_type_name(value)} instead.",
            param=where,
            code="invalid_type",
        )
    return value


def param_path(loc: Sequence[int | str]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, str) and item.startswith(_BRANCH):
            continue
        parts.append(f"[{item}]" if isinstance(item, int) else str(item))
    return ".".join(parts)


def _number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def translate(error: dict[str, Any], prefix: Sequence[int | str] = ()) -> InvalidRequest:
    """One pydantic error → one InvalidRequest naming the parameter."""
    loc = (*prefix, *error.get("loc", ()))
    param = param_path(loc) or None
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    name = param or "body"

    if kind == "missing":
        return InvalidRequest(
            f"Missing required parameter: '{name}'.", param=param, code="missing_required_parameter"
        )
    if kind == "extra_forbidden":
        return InvalidRequest(
            f"Unrecognized request argument supplied: {name}", param=param, code="unknown_parameter"
        )
    if kind == "union_type":
        return InvalidRequest(
            f"Invalid type for '{name}': {error.get('msg')}, "
            f"but got {json_type_name(value)} instead.",
            param=param,
            code="invalid_type",
        )
    if kind in _TYPE_WORDS:
        return InvalidRequest(
            f"Invalid type for '{name}': expected {_TYPE_WORDS[kind]}, "
            f"but got {json_type_name(value)} instead.",
            param=param,
            code="invalid_type",
        )
    if kind in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
        raw_bound = ctx.get("le", ctx.get("lt", ctx.get("ge", ctx.get("gt"))))
        # The field's type (not the value's) says integer or decimal, as OpenAI does.
        numeric = "decimal" if isinstance(raw_bound, float) else "integer"
    if kind in ("less_than_equal", "less_than"):
        bound = _number(ctx.get("le", ctx.get("lt")))
        op = "<=" if kind == "less_than_equal" else "<"
        return InvalidRequest(
            f"Invalid '{name}': expected a number {op} {bound}, got {_short(value)}.",
            param=param,
            code=f"{numeric}_above_max_value",
        )
    if kind in ("greater_than_equal", "greater_than"):
        bound = _number(ctx.get("ge", ctx.get("gt")))
        op = ">=" if kind == "greater_than_equal" else ">"
        return InvalidRequest(
            f"Invalid '{name}': expected a number {op} {bound}, got {_short(value)}.",
            param=param,
            code=f"{numeric}_below_min_value",
        )
    if kind == "too_short":
        minimum = ctx.get("min_length", 1)
        if isinstance(value, list | dict) and len(value) == 0:
            return InvalidRequest(
                f"Invalid '{name}': empty array. Expected an array with minimum length "
                f"{minimum}, but got an empty array instead.",
                param=param,
                code="empty_array",
            )
        return InvalidRequest(
            f"Invalid '{name}': expected at least {minimum} items, got {len(value or [])}.",
            param=param,
            code="array_below_min_length",
        )
    if kind == "too_long":
        maximum = ctx.get("max_length")
        return InvalidRequest(
            f"Invalid '{name}': expected at most {maximum} items, got {ctx.get('actual_length')}.",
            param=param,
            code="array_above_max_length",
        )
    if kind == "string_too_short":
        return InvalidRequest(
            f"Invalid '{name}': string too short. Expected a string with minimum length "
            f"{ctx.get('min_length')}, but got {_short(value)} instead.",
            param=param,
            code="string_below_min_length",
        )
    if kind == "string_too_long":
        return InvalidRequest(
            f"Invalid '{name}': string too long. Expected a string with maximum length "
            f"{ctx.get('max_length')}, but got a string of length {len(value or '')} instead.",
            param=param,
            code="string_above_max_length",
        )
    if kind == "string_pattern_mismatch":
        return InvalidRequest(
            f"Invalid '{name}': string does not match pattern. Expected a string that matches "
            f"the pattern '{ctx.get('pattern')}'.",
            param=param,
            code="invalid_value",
        )
    if kind == "literal_error":
        return InvalidRequest(
            f"Invalid value for '{name}': {_short(value)}. Supported values are: "
            f"{ctx.get('expected')}.",
            param=param,
            code="invalid_value",
        )
    if kind in ("finite_number",):
        return InvalidRequest(
            f"Invalid '{name}': expected a finite number.", param=param, code="invalid_value"
        )
    # value_error and custom errors carry their own sentence.
    message = str(ctx.get("error", error.get("msg", "invalid value")))
    message = message.removeprefix("Value error, ")
    return InvalidRequest(f"Invalid '{name}': {message}", param=param, code="invalid_value")


def first_error(exc: ValidationError, prefix: Sequence[int | str] = ()) -> InvalidRequest:
    """The most useful of a ValidationError's errors, as an InvalidRequest."""
    errors = exc.errors(include_url=False)
    # Unknown parameters are the most common mistake and the clearest to report.
    errors.sort(key=lambda e: 0 if e["type"] == "extra_forbidden" else 1)
    return translate(errors[0], prefix)
