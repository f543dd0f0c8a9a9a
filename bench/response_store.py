"""Issue 13: what storing a response costs the event loop, on SQLite.

A single stream stores one response every few milliseconds; each
``ResponseStore.put`` (and its commit, on the loop) is CPU the next request
waits for. This calls ``put`` for responses arriving ``--gap`` ms apart, as a
single stream of short responses would, and reports the event loop's own CPU
(``time.thread_time``) per stored response, with the WAL bytes written per
response, the median of ``--rounds`` rounds. Run it on two trees with
``PYTHONPATH=<tree>/src`` to compare them.

    ./dev bench response_store [--responses 400] [--gap 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from tokenwell.billing.db import Database
from tokenwell.billing.responses import ResponseStore

TEXT = " word" * 64


def _response(rid: str) -> dict[str, object]:
    return {
        "id": rid,
        "object": "response",
        "model": "scripted-64",
        "status": "completed",
        "background": False,
        "output": [
            {
                "type": "message",
                "id": "msg_" + rid,
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": TEXT, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 12, "output_tokens": 64, "total_tokens": 76},
    }


async def _round(directory: Path, n: int, gap: float, index: int) -> tuple[float, float]:
    path = directory / f"r{index}.db"
    db = Database(f"sqlite:///{path}")
    await db.migrate()
    store = ResponseStore(db)
    items = [{"type": "message", "role": "user", "content": "hello"}]
    wal = path.with_name(path.name + "-wal")
    try:
        # Idle time between responses costs no CPU: only the puts' is counted
        # (and the commits they schedule), with the waits' own CPU subtracted.
        idle = time.thread_time()
        for _ in range(n):
            await asyncio.sleep(gap)
        idle = time.thread_time() - idle
        before = wal.stat().st_size if wal.exists() else 0
        began = time.thread_time()
        for i in range(n):
            await store.put(
                "key",
                _response(f"resp_{index}_{i}"),
                request_id=None,
                input_items=items,
                history=items,
            )
            await asyncio.sleep(gap)
        if hasattr(store, "flush"):
            await store.flush()
        cpu = time.thread_time() - began - idle
        written = (wal.stat().st_size if wal.exists() else 0) - before
    finally:
        await db.close()
    return cpu / n, written / n


async def _main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cpu, wal = [], []
        for index in range(args.rounds):
            c, w = await _round(Path(tmp), args.responses, args.gap / 1000, index)
            cpu.append(c)
            wal.append(w)
            print(f"round {index}: {c * 1e6:.1f} us of loop CPU, {w:.0f} WAL bytes per response")
    print(
        f"median: {statistics.median(cpu) * 1e6:.1f} us of loop CPU per stored response, "
        f"{statistics.median(wal):.0f} WAL bytes per response"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--responses", type=int, default=400)
    parser.add_argument("--gap", type=float, default=3.0, help="ms between responses")
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
