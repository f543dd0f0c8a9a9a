"""The one place where errors become HTTP responses in the OpenAI error shape."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from tokenwell.errors import APIError, InvalidRequest, NotFound, ServerError
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


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(ServerError("The server had an error while processing your request."))
