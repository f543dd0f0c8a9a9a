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

``--instructions`` counts instead of timing: each kind runs in a process of its
own under valgrind (callgrind; ``./dev bench`` installs it with apt), once with
``--requests`` requests after the warm-up and once without, and the
difference over ``--requests`` is the instructions per request, every thread
of the process counted (the ledger's commits, SQLite, zlib). The same code
gives the same count to ~0.1% on any load, so a change of 1% shows, where
the timed rounds swing by ±30% on a shared 2-core machine. Instructions are
not time (zlib runs several per cycle, the interpreter's dispatch far fewer),
so it guides work; requests/s over HTTP (``bench/idempotency.py``) judges it.

    ./dev bench idempotency_cost --instructions [--requests 384]

``--opcodes N`` counts the interpreter's bytecodes instead (``sys.settrace``
with opcode events; one round of each kind, in this process): per request,
keyed against not, and the N functions whose count a key changes most. Exact
and quick (~30 s), it says which Python functions a key's cost is in, where
``--profile``'s timings are skewed by the profiler. (Anything timed, the Redis
mirror's rounds every 50 ms for one, runs ~25x slower under the tracer: more
rounds a request than without it.)

``--redis`` runs both kinds with Redis configured (``TOKENWELL_REDIS_URL``:
the log mirrored there, and the rate limits kept there for both kinds), with
any of the modes above.

    ./dev bench idempotency_cost --opcodes 20 [--redis]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import itertools
import json
import pstats
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import uvloop

from bench.apis import asgi_post
from bench.common import callgrind, in_process, instructions
from tokenwell.billing.keys import KeyFields

CONFIG = """
[[models]]
name = "scripted"
engine = "scripted"
reply_tokens = {tokens}
price = {{ prompt = 1.0, completion = 2.0 }}
"""
CONCURRENCY = 64
REDIS_URL = "redis://127.0.0.1:6379/0"
BODY = orjson.dumps(
    {
        "model": "scripted",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hello"}],
    }
)


@contextlib.asynccontextmanager
async def _app(tokens: int, redis: bool = False) -> AsyncIterator[tuple[Any, str]]:
    """The app started in process, and an API key with room for any run."""
    env = {"TOKENWELL_MASTER_KEY": "sk-cost-master"}
    if redis:
        env["TOKENWELL_REDIS_URL"] = REDIS_URL
    async with in_process(CONFIG.format(tokens=tokens), env) as app:
        fields = KeyFields(name="cost", budget_usd=10**6, rpm=10**7, tpm=10**9)
        key, _ = await app.state.services.keys.create(fields, {"name", "budget_usd", "rpm", "tpm"})
        yield app, key


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

    profilers = {False: cProfile.Profile(), True: cProfile.Profile()} if args.profile else None
    none: list[float] = []
    keyed: list[float] = []
    async with _app(args.tokens, args.redis) as (app, key):
        for warm in (False, True):  # warm-up: pools, caches, the JIT of nothing
            await _round(app, key, BODY, CONCURRENCY * 2, warm)
        for n in range(args.rounds):
            order = (False, True) if n % 2 == 0 else (True, False)
            for with_key in order:
                if profilers is not None:
                    profilers[with_key].enable()
                cost = await _round(app, key, BODY, args.requests, with_key)
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


async def _child(kind: str, requests: int, tokens: int, redis: bool) -> None:
    """(Under valgrind) Start, warm up, then ``requests`` requests of ``kind``."""

    async with _app(tokens, redis) as (app, key):
        await _round(app, key, BODY, CONCURRENCY * 2, kind == "keyed")
        if requests:
            await _round(app, key, BODY, requests, kind == "keyed")
        await asyncio.sleep(0.3)  # the last results stored and logs freed


def _instructions(kind: str, requests: int, tokens: int, redis: bool) -> subprocess.Popen[str]:
    options = ["--child", kind, "--requests", str(requests), "--tokens", str(tokens)]
    return callgrind("bench.idempotency_cost", *options, *(["--redis"] if redis else []))


def count_instructions(args: argparse.Namespace) -> dict[str, Any]:
    """Instructions per request of each kind: two processes at a time (2 cores)."""
    per_request: dict[str, float] = {}
    for kind in ("none", "keyed"):
        with_requests = _instructions(kind, args.requests, args.tokens, args.redis)
        without = _instructions(kind, 0, args.tokens, args.redis)
        added = instructions(with_requests) - instructions(without)
        per_request[kind] = added / args.requests
    none, keyed = per_request["none"], per_request["keyed"]
    return {
        "tokens": args.tokens,
        "requests": args.requests,
        "redis": args.redis,
        "none_instructions": round(none),
        "keyed_instructions": round(keyed),
        "keyed_adds_pct": round(100 * (keyed - none) / none, 1),
    }


async def count_opcodes(args: argparse.Namespace) -> dict[str, Any]:
    """Bytecodes per request of each kind, and where a key changes them most."""
    counts: dict[bool, Counter[tuple[str, int, str]]] = {False: Counter(), True: Counter()}
    counting: Counter[tuple[str, int, str]] | None = None

    def opcode(frame: FrameType, event: str, _arg: Any) -> Any:
        if event == "opcode" and counting is not None:
            code = frame.f_code
            counting[(Path(code.co_filename).name, code.co_firstlineno, code.co_name)] += 1
        return opcode

    def call(frame: FrameType, _event: str, _arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return opcode

    async with _app(args.tokens, args.redis) as (app, key):
        for warm in (False, True):
            await _round(app, key, BODY, CONCURRENCY * 2, warm)
        for keyed in (False, True):
            counting = counts[keyed]
            sys.settrace(call)
            try:
                await _round(app, key, BODY, args.requests, keyed)
            finally:
                sys.settrace(None)
                counting = None
    per = {k: sum(c.values()) / args.requests for k, c in counts.items()}
    changed = {
        f"{file}:{line}({name})": (counts[True][where] - counts[False][where]) / args.requests
        for where in set(counts[True]) | set(counts[False])
        for file, line, name in [where]
    }
    top = sorted(changed.items(), key=lambda item: -abs(item[1]))[: args.opcodes]
    return {
        "tokens": args.tokens,
        "requests": args.requests,
        "redis": args.redis,
        "none_opcodes": round(per[False]),
        "keyed_opcodes": round(per[True]),
        "keyed_adds_pct": round(100 * (per[True] - per[False]) / per[False], 1),
        "most_changed": {name: round(n) for name, n in top},
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
    parser.add_argument("--instructions", action="store_true", help="count, under valgrind")
    parser.add_argument("--opcodes", type=int, default=0, metavar="N", help="count bytecodes")
    parser.add_argument("--redis", action="store_true", help="with Redis configured")
    parser.add_argument("--child", choices=("none", "keyed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        uvloop.run(_child(args.child, args.requests, args.tokens, args.redis))
        return
    if args.opcodes:
        print(json.dumps(uvloop.run(count_opcodes(args)), indent=2), flush=True)
        return
    if args.instructions:
        print(json.dumps(count_instructions(args)), flush=True)
        return
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
