"""CPU per request through the ASGI app in-process: metering off vs on.

No sockets and no client: the app is called directly with ASGI messages, so
what is measured is tokenwell's own work per request (64-chunk scripted
streams, 64 at a time), and what full metering adds to it.

    ./dev bench request_cost [--requests 40] [--database-url postgresql://…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import orjson
import uvloop

from bench.apis import asgi_post
from bench.common import in_process
from bench.metering import SCRIPTED
from tokenwell.billing.keys import KeyFields

BODY = orjson.dumps(
    {
        "model": "scripted-64",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hello"}],
    }
)


async def _request(app: Any, key: str) -> None:
    await asgi_post(app, "/v1/chat/completions", BODY, {"Authorization": f"Bearer {key}"})


async def measure(metering: bool, requests: int, database_url: str | None) -> dict[str, Any]:
    env = {"TOKENWELL_MASTER_KEY": "sk-cost-master"}
    if database_url:
        env["TOKENWELL_DATABASE_URL"] = database_url
    config = SCRIPTED.format(metering="" if metering else "metering = false")
    async with in_process(config, env) as app:
        key = "sk-cost-master"
        if metering:
            fields = KeyFields(name="cost", budget_usd=10**6, rpm=10**7, tpm=10**9)
            key, _ = await app.state.services.keys.create(
                fields, {"name", "budget_usd", "rpm", "tpm"}
            )

        async def worker(n: int) -> None:
            for _ in range(n):
                await _request(app, key)

        await asyncio.gather(*[worker(5) for _ in range(64)])  # warm-up
        cpu = sum(os.times()[:2])
        began = time.perf_counter()
        await asyncio.gather(*[worker(requests) for _ in range(64)])
        cpu = sum(os.times()[:2]) - cpu
        took = time.perf_counter() - began
    total = 64 * requests
    return {
        "metering": metering,
        "requests": total,
        "cpu_us_per_request": round(cpu / total * 1e6, 1),
        "requests_per_s": round(total / took, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40, help="per concurrent stream")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    runs = []
    for metering in (False, True, False, True):
        runs.append(uvloop.run(measure(metering, args.requests, args.database_url)))
        print(json.dumps(runs[-1]), flush=True)
    off = min(r["cpu_us_per_request"] for r in runs if not r["metering"])
    on = min(r["cpu_us_per_request"] for r in runs if r["metering"])
    print(json.dumps({"metering_adds_cpu_us_per_request": round(on - off, 1)}))


if __name__ == "__main__":
    main()
