"""GET /v1/usage: what the calling key has used and spent."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tokenwell.billing.usage import key_usage
from tokenwell.errors import InvalidRequest
from tokenwell.server.responses import json_response


async def own_usage(request: Request) -> Response:
    services = request.app.state.services
    key = await services.accounting.authenticate(request.headers.get("authorization"))
    user = request.query_params.get("user")
    if user is not None and not 1 <= len(user) <= 256:
        raise InvalidRequest(
            "Invalid 'user': expected 1 to 256 characters.", param="user", code="invalid_value"
        )
    return json_response(await key_usage(services.db, key, services.accounting.clock(), user=user))
