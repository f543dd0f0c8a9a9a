"""OpenAI's four shapes of a completion's ``prompt`` and an embedding's ``input``.

A string, an array of strings, an array of token ids, or an array of arrays
of token ids; the last two become tuples. One reading for both APIs, so that
both refuse the same mistakes with the same words.
"""

from __future__ import annotations

from typing import Any

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import MAX_TOKEN_ID
from tokenwell.protocol.validation import json_type_name

Text = str | tuple[int, ...]


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def texts_or_token_ids(raw: Any, name: str, limit: int, *, empty_text: bool) -> list[Text]:
    """``raw`` as a list of texts and token-id tuples; a 400 naming ``name`` (or the
    item, ``name.[i]``) for any other shape, more than ``limit`` items, a token id
    out of range, or (unless ``empty_text``) an empty string."""
    if isinstance(raw, str):
        items: list[Text] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        items = list(raw)
    elif _token_ids(raw):
        items = [tuple(raw)]
    elif isinstance(raw, list) and raw and all(_token_ids(x) for x in raw):
        items = [tuple(x) for x in raw]
    else:
        got = "an empty array" if raw == [] else json_type_name(raw)
        raise InvalidRequest(
            f"Invalid '{name}': expected a string, an array of strings, an array of token "
            f"ids or an array of arrays of token ids, got {got}.",
            param=name,
            code="invalid_type",
        )
    if len(items) > limit:
        raise InvalidRequest(
            f"Invalid '{name}': at most {limit} per request, got {len(items)}.",
            param=name,
            code="array_above_max_length",
        )
    for i, item in enumerate(items):
        where = name if len(items) == 1 else f"{name}.[{i}]"
        if item == "" and not empty_text:
            raise InvalidRequest(
                f"Invalid '{where}': it cannot be empty.", param=where, code="invalid_value"
            )
        if isinstance(item, tuple) and any(t < 0 or t > MAX_TOKEN_ID for t in item):
            raise InvalidRequest(
                f"Invalid '{where}': token ids are 0 to {MAX_TOKEN_ID}.",
                param=where,
                code="invalid_value",
            )
    return items
