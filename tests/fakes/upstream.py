"""An OpenAI-compatible upstream that misbehaves on request, for fault tests.

Run as ``python -m tests.fakes.upstream --port N``. The requested ``model``
picks the behaviour:

    ok          10 content chunks, then a usage chunk (if asked), then [DONE]
    nousage     the same without any usage
    tools       one streamed tool call
    die         5 chunks, then the connection drops
    hang        3 chunks, then silence
    error500    HTTP 500 before any byte
    error429    HTTP 429 with Retry-After: 7
    error400    HTTP 400 (the request's fault)
    malformed   2 chunks, then a line that is not JSON
    slow        a chunk every 50 ms, 400 of them (for disconnects)

GET /stats tells how many streams were started, finished and cut off by
the client, and how many requests came with each ``prompt_cache_key``;
GET /v1/models answers 200 unless started with --sick (503) or with
--api-key K and asked without it (401).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

STATS = {"started": 0, "finished": 0, "cancelled": 0, "requests": 0}
# How many requests came with each prompt_cache_key (placement hints, forwarded).
CACHE_KEYS: dict[str, int] = {}
SICK = False
API_KEY: str | None = None  # --api-key: /v1/models answers 401 without it


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _usage(model: str, completion: int) -> bytes:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": completion,
            "total_tokens": 11 + completion,
        },
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def _stream(model: str, usage: bool) -> AsyncIterator[bytes]:
    STATS["started"] += 1
    try:
        # vLLM style: the role chunk repeats content "" and a tool call repeats its id.
        yield _chunk(model, {"role": "assistant", "content": ""})
        if model == "tools":
            yield _chunk(
                model,
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_x",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                },
            )
            for piece in ('{"city"', ': "Oslo"}'):
                yield _chunk(
                    model,
                    {
                        "tool_calls": [
                            {"index": 0, "id": "call_x", "function": {"arguments": piece}}
                        ]
                    },
                )
            yield _chunk(model, {}, "tool_calls")
            if usage:
                yield _usage(model, 7)
            yield b"data: [DONE]\n\n"
            STATS["finished"] += 1
            return
        count = {"die": 5, "hang": 3, "malformed": 2, "slow": 400}.get(model, 10)
        for i in range(count):
            if model == "slow":
                await asyncio.sleep(0.05)
            yield _chunk(model, {"content": f" t{i}"})
        if model == "die":
            raise ConnectionAbortedError("the fake upstream dies mid-stream")
        if model == "hang":
            await asyncio.sleep(3600)
        if model == "malformed":
            yield b"data: {this is not json\n\n"
            return
        yield _chunk(model, {}, "eos")  # a llama.cpp-style reason, normalised to "stop"
        if usage:
            yield _usage(model, count)
        yield b"data: [DONE]\n\n"
        STATS["finished"] += 1
    except asyncio.CancelledError:
        STATS["cancelled"] += 1
        raise


async def chat(request: Request) -> Response:
    STATS["requests"] += 1
    body = orjson.loads(await request.body())
    model = body.get("model", "ok")
    if isinstance(body.get("prompt_cache_key"), str):
        key = body["prompt_cache_key"]
        CACHE_KEYS[key] = CACHE_KEYS.get(key, 0) + 1
    if model == "error500":
        return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
    if model == "error429":
        return JSONResponse({"error": {"message": "slow down"}}, 429, headers={"Retry-After": "7"})
    if model == "error400":
        return JSONResponse(
            {"error": {"message": "bad prompt", "type": "invalid_request_error"}}, 400
        )
    usage = bool((body.get("stream_options") or {}).get("include_usage")) and model != "nousage"
    return StreamingResponse(_stream(model, usage), media_type="text/event-stream")


async def models(request: Request) -> Response:
    if SICK:
        return JSONResponse({"error": "sick"}, 503)
    if API_KEY and request.headers.get("authorization") != f"Bearer {API_KEY}":
        return JSONResponse({"error": {"message": "invalid api key"}}, 401)
    return JSONResponse({"object": "list", "data": [{"id": "ok", "object": "model"}]})


async def stats(request: Request) -> Response:
    return JSONResponse({**STATS, "cache_keys": CACHE_KEYS})


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/stats", stats),
    ]
)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sick", action="store_true")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    SICK = args.sick
    API_KEY = args.api_key
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
