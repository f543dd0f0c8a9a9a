"""POST /v1/embeddings."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response


async def create(request: Request) -> Response:
    return await request.app.state.services.embeddings.create(request)  # type: ignore[no-any-return]
