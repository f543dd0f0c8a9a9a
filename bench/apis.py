"""One server, several wire APIs, measured in one run: what the API benches share.

A bench names its APIs (``Api``: a path, a streamed request body and headers)
against one scripted server that answers each request with ``TOKENS`` tokens;
``compare`` alternates them so machine noise hits each alike, and reports
single-stream tokens/s (one connection, one request after another, the APIs
taking turns every 8 requests: ``load.interleaved``), requests/s at
``--concurrency`` streams (the APIs in turn, ``--seconds`` each), and each
API's ratio to the first one. ``cpu_per_request`` calls the ASGI app in-process (no
sockets, no client) for the server's CPU per request: steadier than HTTP on a
shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.common import MASTER, in_process, tokenwell
from bench.load import interleaved, run_load

TOKENS = 64
SCRIPTED = f"""
[[models]]
name = "scripted-64"
engine = "scripted"
reply_tokens = {TOKENS}
price = {{ prompt = 1.0, completion = 2.0 }}
"""
BEARER = {"Authorization": f"Bearer {MASTER}"}
CHAT_BODY = {
    "model": "scripted-64",
    "stream": True,
    "messages": [{"role": "user", "content": "hello"}],
}


@dataclass(frozen=True)
class Api:
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=lambda: dict(BEARER))


CHAT = Api("/v1/chat/completions", CHAT_BODY)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds, not measured")


def _measure(base: str, name: str, api: Api, concurrency: int, args: argparse.Namespace) -> float:
    result = asyncio.run(
        run_load(base + api.path, api.body, api.headers, concurrency, args.seconds, args.warmup)
    )
    assert result.errors == 0 and result.requests > 0, (name, result.summary())
    return result.rps


def compare(apis: dict[str, Api], args: argparse.Namespace) -> dict[str, Any]:
    """Every API over HTTP, alternating, for ``args.rounds``; medians and ratios to
    the first API named."""
    server = tokenwell(SCRIPTED).wait()
    single: dict[str, list[float]] = {name: [] for name in apis}
    many: dict[str, list[float]] = {name: [] for name in apis}
    try:
        for _ in range(args.rounds):
            took = asyncio.run(
                interleaved(
                    server.base,
                    {name: (api.path, api.body, api.headers) for name, api in apis.items()},
                    args.seconds * len(apis),
                    args.warmup,
                )
            )
            for name, api in apis.items():
                single[name].append(TOKENS * len(took[name]) / sum(took[name]))
                many[name].append(_measure(server.base, name, api, args.concurrency, args))
                print(name, round(single[name][-1], 1), "tok/s,", round(many[name][-1], 1), "req/s")
    finally:
        server.stop()
    tps = {name: statistics.median(v) for name, v in single.items()}
    rps = {name: statistics.median(v) for name, v in many.items()}
    base, *others = apis
    return {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "single_stream_tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "requests_per_s": {k: round(v, 1) for k, v in rps.items()},
        "single_stream_ratio": {name: round(tps[name] / tps[base], 3) for name in others},
        "requests_per_s_ratio": {name: round(rps[name] / rps[base], 3) for name in others},
    }


async def asgi_post(app: Any, path: str, body: bytes, headers: dict[str, str]) -> int:
    """One POST to an ASGI app in-process, its body read to the end; its status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "headers": [
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    sent = False
    never = asyncio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def cpu_per_request(apis: dict[str, Api], requests: int) -> dict[str, float]:
    """CPU microseconds per streamed request for each API, the ASGI app in-process
    (metering on SQLite), 64 at once, alternating, best of 3."""
    best: dict[str, float] = {}
    async with in_process(SCRIPTED, {"TOKENWELL_MASTER_KEY": MASTER}) as app:
        for _ in range(3):
            for name, api in apis.items():
                raw = json.dumps(api.body).encode()

                async def worker(n: int, api: Api = api, raw: bytes = raw) -> None:
                    for _ in range(n):
                        status = await asgi_post(app, api.path, raw, api.headers)
                        assert status == 200, (api.path, status)

                await asyncio.gather(*[worker(2) for _ in range(64)])  # warm
                cpu = sum(os.times()[:2])
                await asyncio.gather(*[worker(requests) for _ in range(64)])
                used = (sum(os.times()[:2]) - cpu) / (64 * requests) * 1e6
                best[name] = min(best.get(name, used), used)
    return {name: round(v, 1) for name, v in best.items()}
