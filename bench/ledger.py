"""The ledger alone: CPU per request of its writes, SQLite and PostgreSQL.

Each round opens ``--batch`` rows on one key (they commit as one batch),
then closes them (another); the CPU of SQLite's commits, the whole process's
and the postgres backends' are divided by the requests.

    ./dev bench ledger [--batch 32] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path

from bench.common import cpu_seconds_of, pg
from tokenwell.billing.accounting import new_request_id
from tokenwell.billing.db import Database
from tokenwell.billing.keys import KeyFields, KeyHasher, KeyStore
from tokenwell.billing.ledger import CloseRow, Ledger, OpenRow


async def measure(url: str, batch: int, rounds: int) -> dict[str, float]:
    db = Database(url)
    await db.migrate()
    ledger = Ledger(db)
    await ledger.start()
    try:
        keys = KeyStore(db, KeyHasher("bench"))
        fields = KeyFields(name="bench", budget_usd=10**6)
        _, key = await keys.create(fields, {"name", "budget_usd"})

        async def one_round() -> None:
            rows = [
                OpenRow(new_request_id(), key.id, "m", True, False, 1, 10, 100, "bench")
                for _ in range(batch)
            ]
            await asyncio.gather(*[ledger.open(row) for row in rows])
            closes = [CloseRow(r.id, key.id, "completed", 10, 0, 5, 40, 100) for r in rows]
            await asyncio.gather(*[ledger.close(row) for row in closes])

        for _ in range(10):  # warm-up
            await one_round()
        pg, commits = cpu_seconds_of("postgres"), ledger.commit_cpu_seconds
        process, wall = time.process_time(), time.perf_counter()
        for _ in range(rounds):
            await one_round()
        n = rounds * batch
        return {
            "sqlite_commit_us_per_request": round(
                (ledger.commit_cpu_seconds - commits) / n * 1e6, 1
            ),
            "process_us_per_request": round((time.process_time() - process) / n * 1e6, 1),
            "postgres_us_per_request": round((cpu_seconds_of("postgres") - pg) / n * 1e6, 1),
            "wall_us_per_request": round((time.perf_counter() - wall) / n * 1e6, 1),
        }
    finally:
        await ledger.stop()
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    sqlite = f"sqlite:///{Path(tempfile.mkdtemp(prefix='tw-ledger-')) / 'ledger.db'}"
    name = "tw_bench_" + secrets.token_hex(4)
    pg(f"CREATE DATABASE {name}")
    try:
        for label, url in (
            ("sqlite", sqlite),
            ("postgresql", f"postgresql://postgres@127.0.0.1:5432/{name}"),
        ):
            result = asyncio.run(measure(url, args.batch, args.rounds))
            print(json.dumps({"database": label, "batch": args.batch, **result}), flush=True)
    finally:
        pg(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
