"""Requests that arrive while their model is still loading wait for it.

A 503 during start-up is something a plain client does not retry. Instead a
request waits (``model_load_wait_seconds``); a stream commits to 200 at once
and sends ``: keep-alive`` comments meanwhile, so neither the client nor a
proxy gives up. Once the model is ready the request runs as usual; an error
that would have been an HTTP error before the first byte becomes an error
event and ``[DONE]`` on the stream that is already open.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwell.engines.base import Engine
from tokenwell.errors import APIError, Overloaded
from tokenwell.protocol import sse
from tokenwell.protocol.render import StreamRenderer

_POLL = 0.05


def _failed(engine: Engine) -> APIError | None:
    if engine.start_error is not None:
        return Overloaded(
            f"The model `{engine.model_id}` failed to start: {engine.start_error}",
            code="model_failed",
        )
    why = engine.unavailable
    if why is not None:  # started, but cannot serve (no upstream will answer): no wait
        return Overloaded(
            f"The model `{engine.model_id}` is unavailable: {why}",
            code="upstream_unavailable",
            headers={"Retry-After": "5"},
        )
    return None


async def wait_until_ready(engine: Engine, timeout: float) -> None:
    """Return once ``engine`` is ready; Overloaded if it failed or took too long."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not engine.ready:
        error = _failed(engine)
        if error is not None:
            raise error
        if loop.time() >= deadline:
            raise Overloaded(
                f"The model `{engine.model_id}` is still loading after {timeout:g} s; "
                "try again shortly.",
                headers={"Retry-After": "5"},
            )
        await asyncio.sleep(_POLL)


class LoadingStream:
    """A streaming request held open with keep-alive comments until its model is ready."""

    def __init__(
        self,
        engine: Engine,
        timeout: float,
        keepalive: float,
        respond: Callable[[], Awaitable[ASGIApp]],
        headers: dict[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.timeout = timeout
        self.keepalive = keepalive
        self.respond = respond
        self.headers = headers or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    *((k.lower().encode(), v.encode()) for k, v in self.headers.items()),
                ],
            }
        )
        try:
            waiting = asyncio.ensure_future(wait_until_ready(self.engine, self.timeout))
            try:
                while not waiting.done():
                    done, _ = await asyncio.wait({waiting}, timeout=self.keepalive)
                    if not done:
                        await send(
                            {"type": "http.response.body", "body": sse.KEEPALIVE, "more_body": True}
                        )
            finally:
                waiting.cancel()
            waiting.result()
            app = await self.respond()
        except APIError as exc:
            await send(_error_tail(exc.message, exc.code, exc.type))
            return
        await app(scope, receive, _OnOpenStream(send))


def _error_tail(message: str, code: str | None, type_: str) -> Message:
    body = StreamRenderer.error(message, code, type_) + sse.DONE
    return {"type": "http.response.body", "body": body, "more_body": False}


class _OnOpenStream:
    """``send`` for a response whose 200 and headers are already on the wire.

    Its own ``http.response.start`` is dropped; if it was an error status, the
    JSON error body that follows becomes an SSE error event and ``[DONE]``.
    """

    def __init__(self, send: Send) -> None:
        self.send = send
        self.error_status = False
        self.error_body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.error_status = message["status"] != 200
            return
        if not self.error_status:
            await self.send(message)
            return
        self.error_body += message.get("body", b"")
        if message.get("more_body", False):
            return
        try:
            error = orjson.loads(bytes(self.error_body))["error"]
            tail = _error_tail(error["message"], error.get("code"), error["type"])
        except (ValueError, KeyError, TypeError):
            tail = _error_tail("The request failed.", None, "server_error")
        await self.send(tail)
