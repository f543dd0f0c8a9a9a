"""Issue 12: what one round of the Redis request-log mirror costs, on both sides.

``--logs`` request logs (a chat stream's head, then ``--events`` new chunks
each per round) mirrored to the local Redis by ``RedisLogs``, and
``--rounds`` flush rounds run back to back, as the mirror runs them every
50 ms at that many concurrent keyed streams. Reported:

- tokenwell's side, counted: the instructions of one round (valgrind's
  callgrind on this script twice, with 10 rounds and with 10 + ``--rounds``:
  the difference over ``--rounds``, so start-up and Redis's connection are not
  counted; the same code gives the same count on any load);
- Redis's side, timed by Redis itself: µs per ``EVALSHA`` of the round's
  script (``INFO commandstats``, before and after the rounds).

    ./dev bench redis_mirror [--logs 64] [--events 2] [--rounds 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets

import orjson
import redis

from bench.common import callgrind, instructions
from tokenwell.server.requestlog import RedisLogs, RequestLog

REDIS_URL = "redis://127.0.0.1:6379/0"
EVENT = (
    b"data: "
    + orjson.dumps(
        {
            "id": "chatcmpl-0a1b2c3d4e5f60718293a4b5",
            "object": "chat.completion.chunk",
            "created": 1765155000,
            "model": "scripted-64",
            "system_fingerprint": "tokenwell",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": " word"},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    )
    + b"\n\n"
)


async def rounds(logs_n: int, events: int, n: int) -> None:
    prefix = f"tokenwell:bench:{secrets.token_hex(4)}:"
    logs = RedisLogs(REDIS_URL, ttl=60, grace=1, prefix=prefix)
    made = []
    for i in range(logs_n):
        rlog = RequestLog(f"req{i}", True, 1 << 30)
        rlog.start(200, [(b"content-type", b"text/event-stream"), (b"x-request-id", b"req%d" % i)])
        logs.mirror(rlog)
        made.append(rlog)
    await logs._flush()
    for _ in range(n):
        for rlog in made:
            rlog.append([EVENT] * events)
        await logs._flush()
    for rlog in made:
        rlog.finish()
    await logs._flush()
    for rlog in made:
        await logs.forget(rlog.request_id)
    await logs._flush()
    await logs.close()


def _evalsha(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def _instructions(args: argparse.Namespace, n: int) -> int:
    options = ["--child", str(n), "--logs", str(args.logs), "--events", str(args.events)]
    return instructions(callgrind("bench.redis_mirror", *options))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logs", type=int, default=64)
    parser.add_argument("--events", type=int, default=2, help="new events per log per round")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        asyncio.run(rounds(args.logs, args.events, args.child))
        return
    client = redis.Redis.from_url(REDIS_URL)
    calls, usec = _evalsha(client)
    asyncio.run(rounds(args.logs, args.events, args.rounds))
    calls_after, usec_after = _evalsha(client)
    client.close()
    counted = _instructions(args, 10 + args.rounds) - _instructions(args, 10)
    print(
        json.dumps(
            {
                "logs": args.logs,
                "events_per_log_per_round": args.events,
                "rounds": args.rounds,
                "tokenwell_instructions_per_round": round(counted / args.rounds),
                "tokenwell_instructions_per_log_per_round": round(
                    counted / args.rounds / args.logs
                ),
                "redis_us_per_round": round((usec_after - usec) / max(calls_after - calls, 1), 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
