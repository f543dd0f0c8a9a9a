"""POST /v1/chat/completions."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp


async def create(request: Request) -> ASGIApp:
    return await request.app.state.services.chat.create(request)
