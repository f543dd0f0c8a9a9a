"""The one place where errors become HTTP responses in the OpenAI error shape.

``ErrorBoundary`` wraps the app: an exception nothing else handled becomes a
500 in that shape *and the connection stays usable* (Starlette's own
``ServerErrorMiddleware`` re-raises after its 500, and uvicorn then closes the
connection without ``Connection: close``, so pooled clients got a reset on
their next request). A client that went away is not an error: no traceback.
"""

from __future__ import annotations

import http
import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwell.errors import APIError, ClientDisconnected, InvalidRequest, NotFound, ServerError
from tokenwell.server.responses import json_response

log = logging.getLogger(__name__)


def error_response(error: APIError) -> Response:
    return json_response(error.body(), status=error.status, headers=error.headers)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


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
    return error_response(err)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client left while its request was read: nobody will see this response."""
    log.debug("client went away on %s %s", request.method, request.url.path)
    services = getattr(request.app.state, "services", None)
    if services is not None:
        services.metrics.client_gone("request")
    return error_response(ClientDisconnected("The client disconnected."))


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(ServerError("The server had an error while processing your request."))


def raw_error_response(error: APIError) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for the protocol
    layer (a request that never reached the app: its headers or body came too slowly)."""
    body = orjson.dumps(error.body())
    phrase = http.HTTPStatus(error.status).phrase
    return (
        f"HTTP/1.1 {error.status} {phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


class ErrorBoundary:
    """The app's outermost handler for what nothing else handled.

    Before the response began: a 500 in the OpenAI error shape, logged once,
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
