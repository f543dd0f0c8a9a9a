"""GET /v1/usage: what the calling key has used and spent."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tokenwell.billing.usage import key_usage
from tokenwell.server.responses import json_response


async def own_usage(request: Request) -> Response:
    services = request.app.state.services
    key = await services.accounting.authenticate(request.headers.get("authorization"))
    if not key.is_master:
        key = await services.keys.get(key.id)  # fresh spend, not the auth cache's
    return json_response(await key_usage(services.db, key, services.accounting.clock()))
