"""Issue 12, measured without sockets: the event loop's CPU per request, keyed vs not.

The ASGI app is called in-process (64 streams at once, scripted engine, 64
chunks a response, full metering on SQLite), alternating rounds without a key
and with a new ``Idempotency-Key`` on every request, so that the machine's
drift hits both alike. What is counted is ``time.thread_time()`` of the event
loop's thread: the process's CPU also counts SQLite's checkpointer and the
ledger's writer thread, which swing by ±30% from round to round on a 2-core
machine. The result is the median of the per-round differences.

    ./dev bench idempotency_cost [--rounds 12] [--requests 384] [--tokens 64] [--profile FILE]

``--profile N`` profiles both kinds of round (cProfile) and prints the N
functions whose own time per request grows most with a key: where the
difference goes. (Profiled rounds cost more: read their differences, not the
totals.)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import json
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.apis import asgi_post
from bench.common import in_process
from tokenwell.billing.keys import KeyFields

CONFIG = """
[[models]]
name = "scripted"
engine = "scripted"
reply_tokens = {tokens}
price = {{ prompt = 1.0, completion = 2.0 }}
"""
CONCURRENCY = 64


async def _round(app: Any, key: str, body: bytes, requests: int, keyed: bool) -> float:
    """Loop CPU seconds per request for ``requests`` requests, 64 at once."""
    counter = itertools.count()
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            headers = {"Authorization": f"Bearer {key}"}
            if keyed:
                headers["Idempotency-Key"] = f"bench-{time.time_ns()}-{next(counter)}"
            status = await asgi_post(app, "/v1/chat/completions", body, headers)
            assert status == 200, status

    began = time.thread_time()
    await asyncio.gather(*[worker() for _ in range(CONCURRENCY)])
    took = time.thread_time() - began
    await asyncio.sleep(0.05)  # the last results stored and logs freed, not counted
    return took / requests


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = orjson.dumps(
        {
            "model": "scripted",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hello"}],
        }
    )
    profilers = {False: cProfile.Profile(), True: cProfile.Profile()} if args.profile else None
    none: list[float] = []
    keyed: list[float] = []
    env = {"TOKENWELL_MASTER_KEY": "sk-cost-master"}
    async with in_process(CONFIG.format(tokens=args.tokens), env) as app:
        fields = KeyFields(name="cost", budget_usd=10**6, rpm=10**7, tpm=10**9)
        key, _ = await app.state.services.keys.create(fields, {"name", "budget_usd", "rpm", "tpm"})
        for warm in (False, True):  # warm-up: pools, caches, the JIT of nothing
            await _round(app, key, body, CONCURRENCY * 2, warm)
        for n in range(args.rounds):
            order = (False, True) if n % 2 == 0 else (True, False)
            for with_key in order:
                if profilers is not None:
                    profilers[with_key].enable()
                cost = await _round(app, key, body, args.requests, with_key)
                if profilers is not None:
                    profilers[with_key].disable()
                (keyed if with_key else none).append(cost)
    if profilers is not None:
        _print_differences(profilers, args.rounds * args.requests, args.profile)
    differences = [k - n for k, n in zip(keyed, none, strict=True)]
    median_none = statistics.median(none)
    added = statistics.median(differences)
    return {
        "tokens": args.tokens,
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "none_us": round(median_none * 1e6),
        "keyed_us": round(statistics.median(keyed) * 1e6),
        "keyed_adds_us": round(added * 1e6),
        "keyed_adds_pct": round(100 * added / median_none, 1),
        "differences_us": [round(d * 1e6) for d in differences],
    }


def _print_differences(profilers: dict[bool, cProfile.Profile], requests: int, top: int) -> None:
    """The functions whose own time per request a key adds to most (or takes from)."""
    own: dict[bool, dict[str, float]] = {}
    for keyed, profiler in profilers.items():
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        own[keyed] = {
            f"{Path(file).name}:{line}({name})": tottime
            for (file, line, name), (_cc, _nc, tottime, _ct, _callers) in stats.items()
        }
    names = set(own[True]) | set(own[False])
    added = {n: (own[True].get(n, 0.0) - own[False].get(n, 0.0)) / requests for n in names}
    total = sum(added.values())
    print(f"profiled: a key adds {total * 1e6:.0f} us per request (profiler overhead included)")
    for name, cost in sorted(added.items(), key=lambda item: -abs(item[1]))[:top]:
        print(f"{cost * 1e6:+8.1f} us  {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=384, help="per round")
    parser.add_argument("--tokens", type=int, default=64, help="per response")
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
