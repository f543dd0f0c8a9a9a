"""POST /v1/completions (OpenAI's text completions)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp


async def create(request: Request) -> ASGIApp:
    return await request.app.state.services.completions.create(request)
