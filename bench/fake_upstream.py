"""A minimal, fast OpenAI-compatible upstream: 64 streamed chunks per response.

Raw asyncio (uvloop) and precomputed bytes, so that the upstream costs as
little CPU as possible and the gateways in front of it are what is measured.
Every chunk is its own write, as a real server streams them.

    python -m bench.fake_upstream --port 9000 [--chunks 64]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
import uvloop


def _event(body: dict[str, object]) -> bytes:
    data = b"data: " + orjson.dumps(body) + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def responses(chunks: int) -> tuple[list[bytes], bytes]:
    base = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake",
    }
    parts = [
        _event(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
    ]
    parts += [
        _event(
            {
                **base,
                "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}],
            }
        )
        for i in range(chunks)
    ]
    parts.append(_event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    parts.append(
        _event(
            {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": chunks,
                    "total_tokens": 10 + chunks,
                },
            }
        )
    )
    parts.append(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    models = orjson.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]})
    return parts, models


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parts: list[bytes], models: bytes
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            if head.startswith(b"GET"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: " + str(len(models)).encode() + b"\r\n\r\n" + models
                )
                continue
            writer.write(HEAD)
            for part in parts:
                writer.write(part)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int, chunks: int) -> None:
    parts, models = responses(chunks)
    server = await asyncio.start_server(lambda r, w: handle(r, w, parts, models), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=64)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.chunks))
