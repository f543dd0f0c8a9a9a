"""Issue 13: the OpenAI Responses API against chat completions, in one run.

One server (scripted engine, 64 tokens per response, full metering on
SQLite) answers chat, ``/v1/responses`` (stored: the API's default, one more
row written per request) and ``/v1/responses`` with ``store: false``,
alternating (bench/apis.py). Reported: single-stream tokens/s and requests/s
at ``--concurrency`` streams for each, their ratios to chat (the issue asks
for within 5%), and the server's CPU per request with the ASGI app called
in-process (no sockets, no client): the steadier number on a shared machine.

    ./dev bench responses [--seconds 10] [--rounds 2] [--concurrency 64] [--warmup 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from bench.apis import CHAT, Api, add_arguments, compare, cpu_per_request

RESPONSE = {"model": "scripted-64", "stream": True, "input": "hello"}
APIS = {
    "chat": CHAT,
    "responses": Api("/v1/responses", RESPONSE),
    "responses-nostore": Api("/v1/responses", {**RESPONSE, "store": False}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument(
        "--cpu-requests", type=int, default=10, help="per stream, for the in-process CPU"
    )
    args = parser.parse_args()
    cpu = asyncio.run(cpu_per_request(APIS, args.cpu_requests))
    print("cpu us per request", cpu)
    result = compare(APIS, args)
    result["cpu_us_per_request"] = cpu
    result["cpu_ratio"] = {api: round(cpu[api] / cpu["chat"], 3) for api in APIS if api != "chat"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
