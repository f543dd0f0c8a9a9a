"""The one place where errors become HTTP responses, in the shape of the request's API.

A request's wire API is chosen here once (``api_of``: the route's
``scope["tokenwell.api"]``, else its path), and each API's codec module says
how an ``APIError`` looks there: OpenAI's ``{"error": {...}}`` for chat
completions and everything else, Anthropic's ``{"type": "error", ...}`` (with
Anthropic's status codes) under ``/v1/messages``.

``ErrorBoundary`` wraps the app: an exception nothing else handled becomes a
500 in that shape *and the connection stays usable* (Starlette's own
``ServerErrorMiddleware`` re-raises after its 500, and uvicorn then closes the
connection without ``Connection: close``, so pooled clients got a reset on
their next request). A client that went away is not an error: no traceback.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwell import logs
from tokenwell.billing.accounting import new_request_id
from tokenwell.errors import APIError, ClientDisconnected, InvalidRequest, NotFound, ServerError
from tokenwell.protocol import anthropic_codec
from tokenwell.server import accesslog
from tokenwell.server.responses import json_response

log = logging.getLogger(__name__)

# An API error as (status, body) in each wire API's shape.
ErrorShape = Callable[[APIError], tuple[int, dict[str, Any]]]
ERROR_SHAPES: dict[str, ErrorShape] = {
    "openai": lambda error: (error.status, error.body()),
    "anthropic": anthropic_codec.api_error_body,
}
# Paths whose errors are not in the OpenAI shape (a route may also set
# ``scope["tokenwell.api"]``); the prefix is the path or a parent of it.
API_BY_PATH = {"/v1/messages": "anthropic"}


def api_of(scope: Scope) -> str:
    api = scope.get("tokenwell.api")
    if isinstance(api, str):
        return api
    path: str = scope.get("path", "")
    for prefix, name in API_BY_PATH.items():
        if path == prefix or path.startswith(prefix + "/"):
            return name
    return "openai"


def error_response(error: APIError, request: Request | None = None) -> Response:
    """``error`` in the request's API shape; every error response carries an
    ``x-request-id`` (the request's own once admitted, else one of its own), so
    that a client's report of an error finds the server's line about it."""
    error.headers.setdefault("x-request-id", new_request_id())
    shape = ERROR_SHAPES[api_of(request.scope) if request is not None else "openai"]
    status, body = shape(error)
    return json_response(body, status=status, headers=error.headers)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    # Refused before admission (no ledger row, so no id yet): its id is given
    # here rather than in error_response, because the log line needs it first.
    exc.headers.setdefault("x-request-id", new_request_id())
    accesslog.refused(request, exc)
    return error_response(exc, request)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err: APIError = NotFound(f"Unknown request URL: {request.method} {request.url.path}.")
    elif exc.status_code == 405:
        err = InvalidRequest(
            f"Method {request.method} is not allowed for {request.url.path}.",
            code="method_not_allowed",
        )
        err.status = 405
    else:
        err = APIError(str(exc.detail))
        err.status = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(err, request)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client left while its request was read: nobody will see this response."""
    log.debug("client went away on %s %s", request.method, request.url.path)
    services = getattr(request.app.state, "services", None)
    if services is not None:
        services.metrics.client_gone("request")
    return error_response(ClientDisconnected("The client disconnected."), request)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    error = ServerError("The server had an error while processing your request.")
    # An admitted request's own id (its ledger row's), else one of its own.
    request_id = logs.request_id.get() or new_request_id()
    error.headers["x-request-id"] = request_id
    log.exception(
        "unhandled error on %s %s",
        request.method,
        request.url.path,
        extra={"request_id": request_id},
    )
    return error_response(error, request)


def raw_error_response(error: APIError) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for the protocol
    layer (a request that never reached the app: its headers or body came too slowly)."""
    body = orjson.dumps(error.body())
    phrase = http.HTTPStatus(error.status).phrase
    return (
        f"HTTP/1.1 {error.status} {phrase}\r\n"
        "content-type: application/json\r\n"
        f"x-request-id: {error.headers.get('x-request-id') or new_request_id()}\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


class ErrorBoundary:
    """The app's outermost handler for what nothing else handled.

    Before the response began: a 500 in the API's error shape, logged once,
    and the exception ends here, so the keep-alive connection stays usable.
    After it began, nothing valid can follow: returning leaves uvicorn to close
    the connection (the client sees a cut response, never a wrong one).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            log.debug("client went away on %s %s", scope.get("method"), scope.get("path"))
        except Exception as exc:
            request = Request(scope)
            response = await unexpected_error(request, exc)
            if not started:
                await response(scope, receive, send)
