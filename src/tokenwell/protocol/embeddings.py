"""``POST /v1/embeddings``: the request and the response body. Pure: no I/O."""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenwell.errors import InvalidRequest
from tokenwell.protocol.inputs import Text, texts_or_token_ids
from tokenwell.protocol.requests import ChatRequest, decode_object
from tokenwell.protocol.validation import first_error

API = "embeddings"
MAX_INPUTS = 2048  # as OpenAI


class _EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


Input = Text


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    request: ChatRequest  # for admission and the ledger row (api "embeddings")
    inputs: list[Input]
    encoding_format: str
    dimensions: int | None

    @property
    def model(self) -> str:
        return self.request.model


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
    inputs = texts_or_token_ids(parsed.input, "input", MAX_INPUTS, empty_text=False)
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
