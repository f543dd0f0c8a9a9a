"""tokenwell's error types.

Services raise; exactly one handler (``server.errors``) renders an ``APIError``
into the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``.

    TokenwellError
    ├── ConfigError                 bad configuration, raised at start-up
    │   └── StartupFailed           a port taken, a database not there... (one sentence)
    ├── EngineUnusable              an engine cannot run on this machine (start-up self-test)
    └── APIError                    anything a client can be told about
        ├── InvalidRequest          400 invalid_request_error
        │   └── ContextLengthExceeded   400 code=context_length_exceeded
        ├── AuthenticationFailed    401 invalid_api_key
        ├── PermissionDenied        403 permission_error
        ├── NotFound                404
        │   └── ModelNotFound       404 code=model_not_found
        ├── RequestTimeout          408 the request's headers or body came too slowly
        ├── PayloadTooLarge         413
        ├── RateLimited             429 rate_limit_exceeded
        ├── ClientDisconnected      499 the client left before the response (never seen)
        ├── InsufficientQuota       429 insufficient_quota
        ├── ServerError             500 a bug, never bad input
        ├── UpstreamFailed          502 an upstream answered badly
        └── Overloaded              503 queue full, backend down
"""

from __future__ import annotations

from typing import Any


class TokenwellError(Exception):
    """Base of every error tokenwell raises on purpose."""


class ConfigError(TokenwellError):
    """The configuration cannot be used; raised before serving starts."""


class StartupFailed(ConfigError):
    """``tokenwell serve`` cannot start: the message is one sentence with the cause and fix."""


class EngineUnusable(TokenwellError):
    """An engine cannot run on this machine; the message names the cause and the fix."""


class APIError(TokenwellError):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTimeout(APIError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class InsufficientQuota(APIError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class ClientDisconnected(APIError):
    """The client went away while its request was read: nobody to answer, no error."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"


class ServerError(APIError):
    status = 500
    type = "server_error"
    code = None


class UpstreamFailed(APIError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class Overloaded(APIError):
    status = 503
    type = "server_error"
    code = "overloaded"
