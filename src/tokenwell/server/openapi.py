"""The API's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Request bodies are the JSON Schemas of the pydantic models that validate them
(``protocol.requests``, ``billing.keys``), so the document cannot drift from
what the server accepts; clients and tools (and this project's fuzz tests)
generate requests from it. Built once, on first use.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tokenwell.billing.keys import KeyFields, KeyRotation
from tokenwell.protocol import anthropic as messages_requests
from tokenwell.protocol import completions as completions_requests
from tokenwell.protocol import embeddings as embeddings_requests
from tokenwell.protocol import requests as chat_requests
from tokenwell.protocol import responses as responses_codec

_REF = "#/components/schemas/{model}"

# Schema names as published (the models' own names are private).
_NAMES: dict[type[BaseModel], str] = {
    chat_requests._Body: "ChatCompletionRequest",
    chat_requests._SystemMessage: "SystemMessage",
    chat_requests._UserMessage: "UserMessage",
    chat_requests._AssistantMessage: "AssistantMessage",
    chat_requests._ToolMessage: "ToolMessage",
    chat_requests._ToolCallIn: "ToolCall",
    chat_requests._FunctionCall: "FunctionCall",
    KeyFields: "KeyFields",
    KeyRotation: "KeyRotation",
    completions_requests._CompletionsBody: "CompletionRequest",
    embeddings_requests._EmbeddingsBody: "EmbeddingRequest",
    messages_requests._MessagesBody: "MessagesRequest",
    messages_requests._MessagesToolChoice: "MessagesToolChoice",
    messages_requests._MessagesMetadata: "MessagesMetadata",
    responses_codec._ResponsesBody: "ResponseCreateRequest",
    responses_codec._Format: "ResponseTextFormat",
    responses_codec._Reasoning: "ResponseReasoning",
    responses_codec._Text: "ResponseText",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _schemas() -> dict[str, Any]:
    _, top = models_json_schema([(model, "validation") for model in _NAMES], ref_template=_REF)
    text = orjson.dumps(top["$defs"]).decode()
    for model, name in _NAMES.items():
        text = text.replace(
            f'"{_REF.format(model=model.__name__)}"', f'"{_REF.format(model=name)}"'
        )
    defs: dict[str, Any] = orjson.loads(text)
    for model, name in _NAMES.items():
        if model.__name__ in defs:
            defs[name] = defs.pop(model.__name__)
            defs[name]["title"] = name
    # Each message is checked by the model of its role.
    defs["ChatCompletionRequest"]["properties"]["messages"]["items"] = {
        "oneOf": [
            _ref(n) for n in ("SystemMessage", "UserMessage", "AssistantMessage", "ToolMessage")
        ]
    }
    defs["ChatCompletionRequest"]["description"] = "A chat completion request."
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    defs["CompletionRequest"]["description"] = "A (text) completion request: a raw prompt."
    defs["CompletionRequest"]["properties"]["prompt"] = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1},
            token_ids,
            {"type": "array", "items": token_ids, "minItems": 1},
        ]
    }
    defs["EmbeddingRequest"]["description"] = "An embeddings request."
    defs["EmbeddingRequest"]["properties"]["input"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            token_ids,
            {"type": "array", "items": token_ids, "minItems": 1},
        ]
    }
    defs["KeyCreate"] = {
        "allOf": [_ref("KeyFields")],
        "required": ["name"],
        "title": "KeyCreate",
    }
    defs["Error"] = {
        "type": "object",
        "title": "Error",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    }
    defs["Object"] = {"type": "object", "title": "Object", "additionalProperties": True}
    _messages_schemas(defs)
    responses = defs["ResponseCreateRequest"]
    responses["description"] = "A Responses API request."
    responses["properties"]["input"]["anyOf"][1]["items"] = {
        "oneOf": [_ref(n) for n in ("InputMessage", "FunctionCallItem", "FunctionCallOutputItem")]
    }
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {
            "type": {"enum": ["input_text", "output_text"]},
            "text": {"type": "string"},
        },
    }
    defs["InputMessage"] = {
        "type": "object",
        "title": "InputMessage",
        "required": ["role", "content"],
        "properties": {
            "type": {"const": "message"},
            "role": {"enum": ["user", "assistant", "system", "developer"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]},
            "id": {"type": "string"},
        },
    }
    defs["FunctionCallItem"] = {
        "type": "object",
        "title": "FunctionCallItem",
        "required": ["type", "call_id", "name", "arguments"],
        "properties": {
            "type": {"const": "function_call"},
            "call_id": {"type": "string"},
            "name": {"type": "string"},
            "arguments": {"type": "string"},
        },
    }
    defs["FunctionCallOutputItem"] = {
        "type": "object",
        "title": "FunctionCallOutputItem",
        "required": ["type", "call_id", "output"],
        "properties": {
            "type": {"const": "function_call_output"},
            "call_id": {"type": "string"},
            "output": {"type": "string"},
        },
    }
    return defs


def _messages_schemas(defs: dict[str, Any]) -> None:
    """The Anthropic Messages request: its messages' content blocks, tools and errors."""
    request = defs["MessagesRequest"]
    request["description"] = "An Anthropic Messages API request."
    request["properties"]["messages"]["items"] = _ref("MessagesMessage")
    request["properties"]["tools"]["anyOf"][0]["items"] = _ref("MessagesTool")
    text = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }
    texts = {"anyOf": [{"type": "string"}, {"type": "array", "items": text}]}
    defs["MessagesContentBlock"] = {
        "title": "MessagesContentBlock",
        "oneOf": [
            text,
            {
                "type": "object",
                "required": ["type", "id", "name", "input"],
                "properties": {
                    "type": {"const": "tool_use"},
                    "id": {"type": "string", "minLength": 1},
                    "name": {"type": "string"},
                    "input": {"type": "object"},
                },
            },
            {
                "type": "object",
                "required": ["type", "tool_use_id"],
                "properties": {
                    "type": {"const": "tool_result"},
                    "tool_use_id": {"type": "string", "minLength": 1},
                    "content": texts,
                    "is_error": {"type": "boolean"},
                },
            },
        ],
    }
    defs["MessagesMessage"] = {
        "type": "object",
        "title": "MessagesMessage",
        "required": ["role", "content"],
        "additionalProperties": False,
        "properties": {
            "role": {"enum": ["user", "assistant", "system"]},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": _ref("MessagesContentBlock")},
                ]
            },
        },
    }
    defs["MessagesTool"] = {
        "type": "object",
        "title": "MessagesTool",
        "required": ["name", "input_schema"],
        "properties": {
            "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
            "description": {"type": "string"},
            "input_schema": {"type": "object"},
        },
    }
    defs["AnthropicError"] = {
        "type": "object",
        "title": "AnthropicError",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    }


def _json(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    why = {
        400: "Invalid request",
        401: "No key, or a wrong, revoked or expired key",
        403: "The key may not do this",
        404: "Not found",
        408: "The request's headers or body came too slowly",
        409: "Its Idempotency-Key is in use where this server cannot read it",
        413: "Body too large",
        422: "Its Idempotency-Key was used with another body",
        429: "Rate limit or budget",
        502: "An upstream failed",
        503: "Overloaded or loading",
    }
    return {str(s): _json("Error", why[s]) for s in statuses}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


# Idempotent requests and resumable streams (server/idempotent.py).
_RESUMABLE = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "1-255 printable ASCII characters: the request is generated once and "
        "billed once; a retry with the same body gets its result (422 with another body)",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    },
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "With the same Idempotency-Key: the stream's events after this one",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
]


def _operation(
    summary: str,
    ok: dict[str, Any],
    *,
    errors: tuple[int, ...] = (401,),
    body: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**ok, **_errors(*errors)}}
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if parameters:
        op["parameters"] = parameters
    if public:
        op["security"] = []
    return op


def _paths() -> dict[str, Any]:
    master = (400, 401, 403, 404)
    chat_ok = {
        "200": {
            "description": "A chat completion (JSON), or its chunks as server-sent events",
            "content": {
                "application/json": {"schema": _ref("Object")},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    }
    return {
        "/v1/chat/completions": {
            "post": _operation(
                "Create a chat completion",
                chat_ok,
                errors=(400, 401, 403, 404, 408, 409, 413, 422, 429, 502, 503),
                body="ChatCompletionRequest",
                parameters=_RESUMABLE,
            )
        },
        "/v1/completions": {
            "post": _operation(
                "Create a (text) completion",
                {
                    "200": {
                        "description": "A text_completion (JSON), or its chunks as "
                        "server-sent events",
                        "content": {
                            "application/json": {"schema": _ref("Object")},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    }
                },
                errors=(400, 401, 403, 404, 408, 413, 429, 502, 503),
                body="CompletionRequest",
            )
        },
        "/v1/embeddings": {
            "post": _operation(
                "Create embeddings",
                {"200": _json("Object")},
                errors=(400, 401, 403, 404, 408, 413, 429, 503),
                body="EmbeddingRequest",
            )
        },
        **_responses_paths(),
        **_messages_paths(),
        "/v1/models": {"get": _operation("The models this key may use", {"200": _json("Object")})},
        "/v1/models/{model}": {
            "get": _operation(
                "One model",
                {"200": _json("Object")},
                errors=(401, 403, 404),
                parameters=[_path("model")],
            )
        },
        "/v1/usage": {
            "get": _operation(
                "The calling key's usage and budgets",
                {"200": _json("Object")},
                errors=(400, 401),
                parameters=[
                    _query(
                        "user",
                        {"type": "string", "minLength": 1, "maxLength": 256},
                        "An end user of the key: their spend, budget and rate limits too",
                    )
                ],
            )
        },
        "/admin/keys": {
            "post": _operation(
                "Create a key (its secret is in the answer, once)",
                {"201": _json("Object", "Created")},
                errors=(400, 401, 403, 413),
                body="KeyCreate",
            ),
            "get": _operation("List keys", {"200": _json("Object")}, errors=(401, 403)),
        },
        "/admin/keys/{key_id}": {
            "get": _operation(
                "One key", {"200": _json("Object")}, errors=master, parameters=[_path("key_id")]
            ),
            "patch": _operation(
                "Change a key",
                {"200": _json("Object")},
                errors=(*master, 413),
                body="KeyFields",
                parameters=[_path("key_id")],
            ),
            "delete": _operation(
                "Revoke a key",
                {"200": _json("Object")},
                errors=master,
                parameters=[_path("key_id")],
            ),
        },
        "/admin/keys/{key_id}/rotate": {
            "post": _operation(
                "A new secret for the key (in the answer as `key`, once); the old one "
                "works until grace_seconds have passed",
                {"200": _json("Object")},
                errors=(*master, 413),
                body="KeyRotation",
                parameters=[_path("key_id")],
            )
        },
        "/admin/audit": {
            "get": _operation(
                "The audit trail of key changes, newest first",
                {"200": _json("Object")},
                errors=(400, 401, 403),
                parameters=[
                    _query("key_id", {"type": "string"}, "One key"),
                    _query(
                        "action",
                        {"enum": ["key.create", "key.update", "key.rotate", "key.revoke"]},
                        "One kind of change",
                    ),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "How many",
                    ),
                ],
            )
        },
        "/admin/alerts": {
            "get": _operation(
                "Alerts (budget thresholds, expiring keys), newest first, with their delivery",
                {"200": _json("Object")},
                errors=(400, 401, 403),
                parameters=[
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "How many",
                    ),
                ],
            )
        },
        "/admin/usage": {
            "get": _operation(
                "The spend report",
                {
                    "200": {
                        "description": "Rows of groups and sums (JSON), or the same as CSV",
                        "content": {
                            "application/json": {"schema": _ref("Object")},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    }
                },
                errors=(400, 401, 403),
                parameters=[
                    _query(
                        "group_by",
                        {"type": "string"},
                        "Any of key, model, day, end_user, tag:NAME (a metadata key), "
                        "comma-separated",
                    ),
                    _query("since", {"type": "string", "format": "date"}, "First day (UTC)"),
                    _query("until", {"type": "string", "format": "date"}, "Last day (UTC)"),
                    _query("key_id", {"type": "string"}, "One key"),
                    _query("model", {"type": "string"}, "One model"),
                    _query("user", {"type": "string"}, "One end user"),
                    _query(
                        "format",
                        {"enum": ["json", "csv"], "default": "json"},
                        "json, or csv (text/csv: the groups, then the sums, one line a row)",
                    ),
                ],
            )
        },
        "/admin/requests": {
            "get": _operation(
                "Ledger rows, newest first",
                {"200": _json("Object")},
                errors=(400, 401, 403),
                parameters=[
                    _query("key_id", {"type": "string"}, "One key"),
                    _query("status", {"type": "string"}, "One status"),
                    _query("model", {"type": "string"}, "One model"),
                    _query(
                        "since",
                        {"type": "string", "format": "date-time"},
                        "Created at or after (ISO date or datetime, UTC)",
                    ),
                    _query(
                        "until",
                        {"type": "string", "format": "date-time"},
                        "Created before (ISO date or datetime, UTC)",
                    ),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "How many",
                    ),
                ],
            )
        },
        "/admin/requests/{request_id}": {
            "get": _operation(
                "One ledger row",
                {"200": _json("Object")},
                errors=master,
                parameters=[_path("request_id")],
            )
        },
        "/health": {
            "get": _operation(
                "Ready, loading or failed, per model",
                {"200": _json("Object"), "503": _json("Object", "Loading or failed")},
                errors=(),
                public=True,
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (with the server's metrics_token, when it sets one)",
                {
                    "200": {
                        "description": "OK",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                errors=(401,),
                public=True,
            )
        },
        "/openapi.json": {
            "get": _operation("This document", {"200": _json("Object")}, errors=(), public=True)
        },
    }


def _messages_paths() -> dict[str, Any]:
    why = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error (with retry-after)",
        500: "api_error",
        529: "overloaded_error",
    }
    errors = {str(s): _json("AnthropicError", text) for s, text in why.items()}
    headers = [
        {"name": "x-api-key", "in": "header", "required": False, "schema": {"type": "string"}},
        {
            "name": "anthropic-version",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
        },
    ]
    ok = {
        "200": {
            "description": "A message (JSON), or its events as server-sent events",
            "content": {
                "application/json": {"schema": _ref("Object")},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    }
    create = _operation("Create a message (Anthropic Messages API)", ok, body="MessagesRequest")
    count = _operation(
        "Count a message request's input tokens", {"200": _json("Object")}, body="MessagesRequest"
    )
    for op in (create, count):
        op["responses"].update(errors)
        op["parameters"] = headers
    return {"/v1/messages": {"post": create}, "/v1/messages/count_tokens": {"post": count}}


def _responses_paths() -> dict[str, Any]:
    create_ok = {
        "200": {
            "description": "A response object (JSON), or its events as server-sent events",
            "content": {
                "application/json": {"schema": _ref("Object")},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    }
    one = [_path("response_id")]
    return {
        "/v1/responses": {
            "post": _operation(
                "Create a response (OpenAI Responses API)",
                create_ok,
                errors=(400, 401, 403, 404, 408, 409, 413, 422, 429, 502, 503),
                body="ResponseCreateRequest",
                parameters=_RESUMABLE,
            )
        },
        "/v1/responses/input_tokens": {
            "post": _operation(
                "Count a request's input tokens",
                {"200": _json("Object")},
                errors=(400, 401, 403, 404, 413),
                body="ResponseCreateRequest",
            )
        },
        "/v1/responses/{response_id}": {
            "get": _operation(
                "A stored response; a background response's events with stream=true",
                create_ok,
                errors=(400, 401, 404),
                parameters=[
                    *one,
                    _query("stream", {"type": "boolean"}, "Stream the events (background)"),
                    _query(
                        "starting_after",
                        {"type": "integer", "minimum": 0},
                        "The events after this sequence number",
                    ),
                ],
            ),
            "delete": _operation(
                "Delete a stored response",
                {"200": _json("Object")},
                errors=(401, 404),
                parameters=one,
            ),
        },
        "/v1/responses/{response_id}/cancel": {
            "post": _operation(
                "Cancel a background response (billed for what was generated)",
                {"200": _json("Object")},
                errors=(400, 401, 404),
                parameters=one,
            )
        },
        "/v1/responses/{response_id}/input_items": {
            "get": _operation(
                "A stored response's input items",
                {"200": _json("Object")},
                errors=(400, 401, 404),
                parameters=[
                    *one,
                    _query("order", {"type": "string", "enum": ["asc", "desc"]}, "Order"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "How many"),
                    _query("after", {"type": "string"}, "Items after this id"),
                ],
            )
        },
    }


@functools.cache
def openapi_document() -> bytes:
    try:
        package_version = version("tokenwell")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        package_version = "0"
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenwell",
            "version": package_version,
            "description": "An OpenAI-compatible token API; errors are "
            '{"error": {"message", "type", "param", "code"}}.',
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    return orjson.dumps(document)
