"""``POST /v1/embeddings``: the request and the response body. Pure: no I/O."""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.requests import MAX_TOKEN_ID, ChatRequest, decode_object
from tokenwell.protocol.validation import first_error, json_type_name

API = "embeddings"
MAX_INPUTS = 2048  # as OpenAI


class _EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


Input = str | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    request: ChatRequest  # for admission and the ledger row (api "embeddings")
    inputs: list[Input]
    encoding_format: str
    dimensions: int | None

    @property
    def model(self) -> str:
        return self.request.model


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _inputs(raw: Any) -> list[Input]:
    """OpenAI's four shapes: a string, strings, token ids, lists of token ids."""
    if isinstance(raw, str):
        inputs: list[Input] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    elif _is_ids(raw):
        inputs = [tuple(raw)]
    elif isinstance(raw, list) and raw and all(_is_ids(x) for x in raw):
        inputs = [tuple(x) for x in raw]
    else:
        got = "an empty array" if raw == [] else json_type_name(raw)
        raise InvalidRequest(
            "Invalid 'input': expected a string, an array of strings, an array of token ids "
            f"or an array of arrays of token ids, got {got}.",
            param="input",
            code="invalid_type",
        )
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequest(
            f"Invalid 'input': at most {MAX_INPUTS} inputs per request, got {len(inputs)}.",
            param="input",
            code="array_above_max_length",
        )
    for i, item in enumerate(inputs):
        where = "input" if len(inputs) == 1 else f"input.[{i}]"
        if item == "":
            raise InvalidRequest(
                f"Invalid '{where}': an input cannot be empty.", param=where, code="invalid_value"
            )
        if isinstance(item, tuple) and any(t < 0 or t > MAX_TOKEN_ID for t in item):
            raise InvalidRequest(
                f"Invalid '{where}': token ids are 0 to {MAX_TOKEN_ID}.",
                param=where,
                code="invalid_value",
            )
    return inputs


def parse_embeddings_request(body: bytes) -> EmbeddingsRequest:
    data = decode_object(body)
    if "input" not in data:
        raise InvalidRequest(
            "Missing required parameter: 'input'.",
            param="input",
            code="missing_required_parameter",
        )
    try:
        parsed = _EmbeddingsBody.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc) from exc
    inputs = _inputs(parsed.input)
    request = ChatRequest(model=parsed.model, messages=(), user=parsed.user, raw=data, api=API)
    return EmbeddingsRequest(request, inputs, parsed.encoding_format, parsed.dimensions)


def check_dimensions(dimensions: int | None, native: int, can_truncate: bool, model: str) -> None:
    """``dimensions``: the model's own size, or fewer only where the model allows it
    (a Matryoshka-trained model); anything else is a 400 naming it."""
    if dimensions is None or dimensions == native:
        return
    if dimensions > native or not can_truncate:
        allowed = f"1 to {native}" if can_truncate else f"only {native}"
        raise InvalidRequest(
            f"Invalid 'dimensions': the model `{model}` makes {native}-dimensional "
            f"embeddings ({allowed} allowed), got {dimensions}.",
            param="dimensions",
            code="invalid_value",
        )


def truncate(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """Cut to ``dimensions`` (checked), then normalised again."""
    if dimensions is None or not vectors or dimensions >= len(vectors[0]):
        return vectors
    out = []
    for vector in vectors:
        cut = vector[:dimensions]
        norm = math.sqrt(sum(x * x for x in cut)) or 1.0
        out.append([x / norm for x in cut])
    return out


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # As OpenAI: little-endian float32, base64.
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embeddings_body(
    model: str, vectors: list[list[float]], encoding_format: str, prompt_tokens: int
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
