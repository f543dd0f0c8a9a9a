"""Issue 4: what full metering costs, in one run.

The scripted engine streams 64 chunks per response; 64 concurrent streams
run for --seconds against tokenwell with metering off, with full metering on
SQLite (a real API key: lookup, rate-limit buckets, write-ahead ledger row
with budget reservation, journal, settlement), and with full metering on
PostgreSQL. Runs alternate (off, sqlite, postgresql, off, …) so machine
noise hits each alike; the overhead is 1 - metered/unmetered requests/s.

    ./dev bench metering [--seconds 10] [--rounds 2] [--concurrency 64] [--pin]
                         [--spend-controls]

``--pin`` runs the server on CPU 0 and the load generator on CPU 1 (PostgreSQL
shares them as the scheduler sees fit): the
scheduler can then no longer put the server and its client on one core,
which is much of this machine's run-to-run spread.

``--spend-controls`` (issue 16): the metered key also has a daily and a
monthly budget (in a time zone of its own) and a daily budget per end user,
and every request names its end user and carries metadata tags. All 64
streams are one end user's, so their reservations meet on one end-user row
as on the key's (the hardest case for that row).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics

import httpx

from bench.common import MASTER, cpu_seconds, cpu_seconds_of, pg, tokenwell
from bench.load import run_load

SCRIPTED = """
{metering}
[[models]]
name = "scripted-64"
engine = "scripted"
reply_tokens = 64
price = {{ prompt = 1.0, completion = 2.0 }}
"""


# Two budget periods, a budget per end user, a time zone (none of them runs out).
SPEND_CONTROLS = {
    "budgets": [
        {"usd": "1000000", "period": "total"},
        {"usd": "100000", "period": "day"},
        {"usd": "500000", "period": "month"},
    ],
    "timezone": "Europe/Paris",
    "end_user_budget": {"usd": "10000", "period": "day"},
}


def measure(kind: str, args: argparse.Namespace, pg_db: str) -> dict[str, float]:
    env = {}
    if kind == "postgresql":
        env["TOKENWELL_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{pg_db}"
    server = tokenwell(
        SCRIPTED.format(metering="metering = false" if kind == "off" else ""),
        env=env,
        cpus={0} if args.pin else None,
    ).wait()
    try:
        key = MASTER
        if kind != "off":
            fields: dict[str, object] = {
                "name": "bench",
                "budget_usd": "1000000",
                "rpm": 10_000_000,
                "tpm": 1_000_000_000,
            }
            if args.spend_controls:
                fields.update(SPEND_CONTROLS)
            made = httpx.post(
                f"{server.base}/admin/keys",
                json=fields,
                headers={"Authorization": f"Bearer {MASTER}"},
            )
            key = made.json()["key"]
        body: dict[str, object] = {
            "model": "scripted-64",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hello"}],
        }
        if args.spend_controls:
            body.update(user="bench-user", metadata={"team": "bench", "env": "prod"})
        cpu_before = cpu_seconds(server.proc.pid)
        pg_before = cpu_seconds_of("postgres")
        result = asyncio.run(
            run_load(
                f"{server.base}/v1/chat/completions",
                body,
                {"Authorization": f"Bearer {key}"},
                args.concurrency,
                args.seconds,
                warmup=0,
            )
        )
        cpu = cpu_seconds(server.proc.pid) - cpu_before
        pg_cpu = cpu_seconds_of("postgres") - pg_before
        summary = result.summary()
        summary["server_cpu_ms_per_request"] = round(cpu * 1000 / max(result.requests, 1), 3)
        if kind == "postgresql":
            summary["postgres_cpu_ms_per_request"] = round(
                pg_cpu * 1000 / max(result.requests, 1), 3
            )
        if kind != "off":
            # Every request the client saw is in the ledger.
            usage = httpx.get(
                f"{server.base}/v1/usage", headers={"Authorization": f"Bearer {key}"}
            ).json()
            summary["ledger_requests"] = usage["requests"]
            metrics = httpx.get(f"{server.base}/metrics").text
            found = {
                line.split()[0]: float(line.split()[1])
                for line in metrics.splitlines()
                if line.startswith(
                    (
                        "tokenwell_ledger_commits_total",
                        "tokenwell_ledger_rows_total",
                        "tokenwell_ledger_commit_cpu_seconds_total",
                    )
                )
            }
            commits = found.get("tokenwell_ledger_commits_total", 0)
            if commits:
                summary["rows_per_commit"] = round(
                    found["tokenwell_ledger_rows_total"] / commits, 1
                )
                if kind == "sqlite":  # CPU in the library, on the event loop
                    commits = found.get("tokenwell_ledger_commit_cpu_seconds_total", 0)
                    summary["sqlite_commit_cpu_ms_per_request"] = round(
                        commits * 1000 / max(usage["requests"], 1), 3
                    )
        return summary
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, client on CPU 1")
    parser.add_argument(
        "--spend-controls",
        action="store_true",
        help="budgets per day and month, a budget per end user, end users and tags",
    )
    args = parser.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {1})
    pg_db = "tw_bench_" + secrets.token_hex(4)
    pg(f"CREATE DATABASE {pg_db}")
    runs: dict[str, list[dict[str, float]]] = {"off": [], "sqlite": [], "postgresql": []}
    try:
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(measure(kind, args, pg_db))
                print(kind, json.dumps(runs[kind][-1]), flush=True)
    finally:
        pg(f"DROP DATABASE IF EXISTS {pg_db} WITH (FORCE)")
    rps = {k: statistics.median(r["requests_per_s"] for r in v) for k, v in runs.items()}
    result: dict[str, object] = {
        "concurrency": args.concurrency,
        "chunks_per_response": 64,
        "rounds": args.rounds,
        "pinned": args.pin,
        "spend_controls": args.spend_controls,
        "requests_per_s": rps,
        "overhead_sqlite": round(1 - rps["sqlite"] / rps["off"], 3),
        "overhead_postgresql": round(1 - rps["postgresql"] / rps["off"], 3),
    }
    # Each round's runs are minutes apart at most, so a round's own ratio is
    # the least disturbed by the machine's drift: their median, and range.
    for kind in ("sqlite", "postgresql"):
        paired = sorted(
            1 - m["requests_per_s"] / o["requests_per_s"]
            for m, o in zip(runs[kind], runs["off"], strict=True)
        )
        result[f"round_overhead_{kind}"] = {
            "median": round(statistics.median(paired), 3),
            "min": round(paired[0], 3),
            "max": round(paired[-1], 3),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
