"""The OpenAI Responses API: ``/v1/responses`` (server.responses_api)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp


async def create(request: Request) -> ASGIApp:
    return await request.app.state.services.responses.create(request)


async def input_tokens(request: Request) -> ASGIApp:
    return await request.app.state.services.responses.input_tokens(request)


async def retrieve(request: Request) -> ASGIApp:
    return await request.app.state.services.responses.retrieve(request)


async def delete(request: Request) -> ASGIApp:
    return await request.app.state.services.responses.delete(request)


async def cancel(request: Request) -> ASGIApp:
    return await request.app.state.services.responses.cancel(request)


async def input_items(request: Request) -> ASGIApp:
    return await request.app.state.services.responses.input_items(request)
