"""GET /openapi.json: the API's OpenAPI 3.1 document (no key)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tokenwell.server.openapi import openapi_document


async def openapi(request: Request) -> Response:
    return Response(openapi_document(), media_type="application/json")
