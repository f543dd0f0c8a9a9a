"""Issue 14: the Anthropic Messages API against chat completions, in one run.

One server (scripted engine, 64 tokens per response, full metering on
SQLite) answers both APIs; runs alternate (chat, messages, chat, …) so
machine noise hits each alike. Reported: single-stream tokens/s (one
connection, one request after another) and requests/s at ``--concurrency``
streams, for each API, and messages/chat ratios (1.0: no cost for speaking
Anthropic's format; the issue asks for within 5%).

    ./dev bench messages [--seconds 10] [--rounds 2] [--concurrency 64] [--warmup 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

from bench.common import MASTER, tokenwell
from bench.load import run_load

TOKENS = 64
SCRIPTED = f"""
[[models]]
name = "scripted-64"
engine = "scripted"
reply_tokens = {TOKENS}
price = {{ prompt = 1.0, completion = 2.0 }}
"""
ASK = [{"role": "user", "content": "hello"}]
APIS: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "chat": (
        "/v1/chat/completions",
        {"model": "scripted-64", "stream": True, "messages": ASK},
        {"Authorization": f"Bearer {MASTER}"},
    ),
    "messages": (
        "/v1/messages",
        {"model": "scripted-64", "stream": True, "max_tokens": 1024, "messages": ASK},
        {"x-api-key": MASTER, "anthropic-version": "2023-06-01"},
    ),
}


def measure(base: str, api: str, concurrency: int, seconds: float, warmup: float) -> float:
    path, body, headers = APIS[api]
    result = asyncio.run(run_load(base + path, body, headers, concurrency, seconds, warmup))
    assert result.errors == 0 and result.requests > 0, (api, result.summary())
    return result.rps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds, not measured")
    args = parser.parse_args()
    server = tokenwell(SCRIPTED).wait()
    single: dict[str, list[float]] = {api: [] for api in APIS}
    many: dict[str, list[float]] = {api: [] for api in APIS}
    try:
        for _ in range(args.rounds):
            for api in APIS:
                rps = measure(server.base, api, 1, args.seconds, args.warmup)
                single[api].append(rps * TOKENS)
                many[api].append(
                    measure(server.base, api, args.concurrency, args.seconds, args.warmup)
                )
                print(api, round(single[api][-1], 1), "tok/s,", round(many[api][-1], 1), "req/s")
    finally:
        server.stop()
    tps = {api: statistics.median(v) for api, v in single.items()}
    rps = {api: statistics.median(v) for api, v in many.items()}
    print(
        json.dumps(
            {
                "rounds": args.rounds,
                "seconds": args.seconds,
                "concurrency": args.concurrency,
                "single_stream_tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
                "requests_per_s": {k: round(v, 1) for k, v in rps.items()},
                "single_stream_ratio": round(tps["messages"] / tps["chat"], 3),
                "requests_per_s_ratio": round(rps["messages"] / rps["chat"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
