"""POST /v1/messages and /v1/messages/count_tokens (the Anthropic Messages API)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from tokenwell.server.responses import json_response


async def create(request: Request) -> ASGIApp:
    return await request.app.state.services.messages.create(request)


async def count_tokens(request: Request) -> Response:
    return json_response(await request.app.state.services.messages.count_tokens(request))
