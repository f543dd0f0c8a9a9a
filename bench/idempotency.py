"""Issue 12: what Idempotency-Key (and its request log) costs, in one run.

64 concurrent streams on the scripted engine (64 chunks per response, full
metering on SQLite) against tokenwell without idempotency keys, with a new
key on every request (the log in process), and with a new key on every
request and Redis configured (the log mirrored to Redis as it grows), and
without keys with Redis configured (``none_redis``: Redis then also keeps the
rate limits, two round trips per request that are no part of the log). Runs
alternate (none, in-process, redis, none_redis, none, …) so machine noise hits
each alike; the overhead is 1 - with/without requests/s: in process and Redis
against ``none`` (the issue's comparison), and the Redis log alone against
``none_redis``. Each request with a key also claims it in the database (with
its ledger row) and stores its result there for replay. Each server gets
``--warmup`` seconds of the same load first (connection pools, caches), not
measured.

    ./dev bench idempotency [--seconds 10] [--rounds 2] [--concurrency 64] [--warmup 1] [--pin]

Also reported: the server's CPU per request, and (Redis) the peak of Redis's
used_memory during the run and the keys left after it (0: every log freed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from functools import partial

import httpx
import redis

from bench.common import MASTER, cpu_seconds, tokenwell
from bench.load import run_load

REDIS_URL = "redis://127.0.0.1:6379/0"
SCRIPTED = """
[[models]]
name = "scripted-64"
engine = "scripted"
reply_tokens = 64
price = { prompt = 1.0, completion = 2.0 }
"""
KINDS = ("none", "in_process", "redis", "none_redis")


def _redis_peak(stop: threading.Event, out: dict[str, int]) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys_before = _log_keys(client)
    base = int(client.info("memory")["used_memory"])
    peak = base
    while not stop.wait(0.1):
        peak = max(peak, int(client.info("memory")["used_memory"]))
    out["redis_used_memory_added_peak_bytes"] = peak - base
    # Keys this run added and left (0: every log freed; earlier runs' leftovers not counted).
    out["redis_log_keys_left"] = _log_keys(client) - keys_before
    client.close()


def _log_keys(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter("tokenwell:log:*", count=1000))


def measure(kind: str, args: argparse.Namespace) -> dict[str, float]:
    env = {"TOKENWELL_REDIS_URL": REDIS_URL} if kind in ("redis", "none_redis") else {}
    server = tokenwell(SCRIPTED, env=env, cpus={0} if args.pin else None).wait()
    try:
        made = httpx.post(
            f"{server.base}/admin/keys",
            json={"name": "bench", "budget_usd": "1000000", "rpm": 10_000_000, "tpm": 10**9},
            headers={"Authorization": f"Bearer {MASTER}"},
        )
        key = made.json()["key"]
        body = {
            "model": "scripted-64",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hello"}],
        }
        watch: dict[str, int] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_redis_peak, args=(stop, watch), daemon=True)
        load = partial(
            run_load,
            f"{server.base}/v1/chat/completions",
            body,
            {"Authorization": f"Bearer {key}"},
            args.concurrency,
            warmup=0,
            unique_header=None if kind.startswith("none") else "Idempotency-Key",
        )
        if args.warmup > 0:
            asyncio.run(load(args.warmup))
            time.sleep(0.2)  # the warm-up's last requests finish
        if kind == "redis":
            watcher.start()
        cpu_before = cpu_seconds(server.proc.pid)
        result = asyncio.run(load(args.seconds))
        cpu = cpu_seconds(server.proc.pid) - cpu_before
        summary = result.summary()
        summary["server_cpu_ms_per_request"] = round(cpu * 1000 / max(result.requests, 1), 3)
        if kind == "redis":
            time.sleep(0.5)  # the last results stored, their logs freed
            stop.set()
            watcher.join()
            summary.update(watch)
        return summary
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds, not measured")
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, client on CPU 1")
    args = parser.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {1})
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            runs[kind].append(measure(kind, args))
            print(kind, json.dumps(runs[kind][-1]), flush=True)
    rps = {k: statistics.median(r["requests_per_s"] for r in v) for k, v in runs.items()}
    result: dict[str, object] = {
        "concurrency": args.concurrency,
        "chunks_per_response": 64,
        "rounds": args.rounds,
        "pinned": args.pin,
        "requests_per_s": rps,
        "overhead_in_process": round(1 - rps["in_process"] / rps["none"], 3),
        "overhead_redis": round(1 - rps["redis"] / rps["none"], 3),
        "overhead_redis_log": round(1 - rps["redis"] / rps["none_redis"], 3),
    }
    for kind, base in (("in_process", "none"), ("redis", "none"), ("redis_log", "none_redis")):
        paired = sorted(
            1 - m["requests_per_s"] / o["requests_per_s"]
            for m, o in zip(runs[kind.replace("_log", "")], runs[base], strict=True)
        )
        result[f"round_overhead_{kind}"] = {
            "median": round(statistics.median(paired), 3),
            "min": round(paired[0], 3),
            "max": round(paired[-1], 3),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
