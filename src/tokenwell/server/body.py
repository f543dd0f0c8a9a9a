"""Reading a request body with a size limit."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from tokenwell.errors import ClientDisconnected, PayloadTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(_too_large(limit))
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(_too_large(limit))
            chunks.append(chunk)
    except ClientDisconnect:
        # Not an error: the client left (or its body came too slowly, see
        # server.protocol). Answered quietly, with a metric, no traceback.
        raise ClientDisconnected("The client disconnected while sending the request.") from None
    return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"Request body too large: the limit is {limit} bytes."
