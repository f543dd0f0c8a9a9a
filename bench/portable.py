"""Issue 11: what the portable llama.cpp build costs against a native one, in one run.

Two tokenwell servers on the same GGUF, both up at once (an idle server
costs nothing: its decode thread sleeps): one on the project's own build
(tools/build_llama.py: GGML_NATIVE=OFF, the extensions that run here, AMX
off), one on pip's default native build (``-march=native``, put first on
PYTHONPATH; bench/peers.py builds it). Rounds alternate between them (A B,
B A, …) at each level, so machine noise hits both alike. Reported: aggregate
tokens/s and p50 time to first token per build and level, and the ratio
portable/native (the issue's target: ≥ 0.97).

    ./dev bench portable [--levels 1,16] [--rounds 6] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

from bench import peers
from bench.common import MASTER, MODEL, median, tokenwell
from bench.concurrency import CONTEXT, PARALLEL, level


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    config = (
        f'[[models]]\nname = "{MODEL}"\nengine = "llamacpp"\nparallel = {PARALLEL}\n'
        f"context = {CONTEXT}\nthreads = {threads}\n"
    )
    servers = {
        "portable": tokenwell(config),
        "native": tokenwell(config, env={"PYTHONPATH": str(peers.native_site())}),
    }
    headers = {"Authorization": f"Bearer {MASTER}"}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {name: {} for name in servers}
    try:
        for proc in servers.values():
            proc.wait()
            asyncio.run(level(proc.base, headers, MODEL, 1, 8, 1))  # warm-up
        for streams in [int(x) for x in args.levels.split(",")]:
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    run = asyncio.run(
                        level(servers[name].base, headers, MODEL, streams, args.tokens, 1)
                    )
                    results[name].setdefault(streams, []).append(run)
    finally:
        for proc in servers.values():
            proc.stop()
    summary = []
    for streams in results["portable"]:
        row: dict[str, Any] = {"streams": streams}
        for name in servers:
            runs = results[name][streams]
            row[f"{name}_tokens_per_s"] = round(median([x["tokens_per_s"] for x in runs]), 1)
            row[f"{name}_ttft_p50_ms"] = round(median([x["ttft_p50_ms"] for x in runs]), 1)
        pairs = zip(results["portable"][streams], results["native"][streams], strict=True)
        ratios = [p["tokens_per_s"] / n["tokens_per_s"] for p, n in pairs]
        row["ratio_per_round"] = [round(x, 3) for x in ratios]
        row["ratio_median"] = round(median(ratios), 3)
        summary.append(row)
        print(
            f"{streams:>2} streams: portable {row['portable_tokens_per_s']} tok/s, native "
            f"{row['native_tokens_per_s']} tok/s, portable/native {row['ratio_median']}x "
            f"(rounds {row['ratio_per_round']})",
            flush=True,
        )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
