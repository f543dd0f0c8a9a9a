"""Issue 19: /v1/embeddings throughput against llama-server, and what it costs streams.

1. Inputs/s for requests of 1, 16 and 128 inputs of about 64 tokens each,
   one request after another, on tokenwell (embedded SmolLM2-135M) and on
   llama.cpp's ``llama-server --embeddings --pooling mean`` (built by
   ``bench/peers.py``) on the same GGUF with the same threads; rounds
   alternate so machine noise hits both alike. The issue asks tokenwell for
   at least 0.9x llama-server.
2. Inter-token latency (p50) of --streams chat streams on tokenwell, alone
   and while one client keeps asking for embeddings of 16 inputs; the issue
   asks for at most 1.5x.

    ./dev bench embeddings [--seconds 10] [--rounds 2] [--servers tokenwell,llama-server]
                           [--streams 4] [--tokens 64] [--sizes 1,16,128] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import httpx

from bench.common import MASTER, MODEL, NO_EOS, Process, llama_server, tokenwell

CONTEXT = 2048
SIZES = (1, 16, 128)
WORDS = [
    "river",
    "stone",
    "light",
    "garden",
    "paper",
    "window",
    "music",
    "cloud",
    "bread",
    "table",
    "letter",
    "road",
    "winter",
    "coffee",
    "engine",
    "forest",
    "market",
    "silver",
    "number",
    "ocean",
]


def texts(count: int, salt: int) -> list[str]:
    """``count`` different sentences of about 64 tokens each."""
    out = []
    for i in range(count):
        words = [WORDS[(i * 7 + j * 3 + salt) % len(WORDS)] for j in range(60)]
        out.append(" ".join(words) + f" {i}.")
    return out


def start(name: str, threads: int) -> tuple[Process, dict[str, str]]:
    if name == "tokenwell":
        proc = tokenwell(
            f'[[models]]\nname = "{MODEL}"\nengine = "llamacpp"\nparallel = 4\n'
            f"context = {CONTEXT}\nthreads = {threads}\n"
        )
        return proc.wait(), {"Authorization": f"Bearer {MASTER}"}
    assert name == "llama-server", name
    return llama_server(
        threads,
        *("--embeddings", "--pooling", "mean", "-c", str(CONTEXT)),
        *("-b", str(CONTEXT), "-ub", str(CONTEXT)),
    ), {}


def inputs_per_second(base: str, headers: dict[str, str], size: int, seconds: float) -> float:
    done = 0
    salt = 0
    with httpx.Client(base_url=base, headers=headers, timeout=600) as http:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or done == 0:
            salt += 1  # never the same inputs twice (no cache helps either side)
            r = http.post("/v1/embeddings", json={"model": MODEL, "input": texts(size, salt)})
            r.raise_for_status()
            assert len(r.json()["data"]) == size
            done += size
        return done / (time.perf_counter() - started)


async def stream_gaps(base: str, headers: dict[str, str], streams: int, tokens: int) -> list[float]:
    """Seconds between consecutive chunks of ``streams`` concurrent chat streams."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": tokens,
        "stream": True,
        "logit_bias": NO_EOS,
        "seed": 1,
    }
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as http:

        async def one() -> None:
            last = None
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

        await asyncio.gather(*(one() for _ in range(streams)))
    return gaps


async def itl_with_embeddings(
    base: str, headers: dict[str, str], streams: int, tokens: int
) -> float:
    stop = asyncio.Event()

    async def embed_load() -> None:
        salt = 10_000
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as http:
            while not stop.is_set():
                salt += 1
                r = await http.post(
                    "/v1/embeddings", json={"model": MODEL, "input": texts(16, salt)}
                )
                r.raise_for_status()

    load = asyncio.create_task(embed_load())
    await asyncio.sleep(0.5)
    try:
        gaps = await stream_gaps(base, headers, streams, tokens)
    finally:
        stop.set()
        await load
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--servers", default="tokenwell,llama-server")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="inputs per request")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    servers = args.servers.split(",")
    results: dict[str, Any] = {"throughput": {}, "itl": {}}
    for name in servers:
        results["throughput"][name] = {size: [] for size in sizes}
    for _ in range(args.rounds):
        for name in servers:
            proc, headers = start(name, args.threads)
            try:
                for size in sizes:
                    rate = inputs_per_second(proc.base, headers, size, args.seconds)
                    results["throughput"][name][size].append(rate)
                    print(f"{name:14s} {size:4d} inputs/request: {rate:8.1f} inputs/s", flush=True)
            finally:
                proc.stop()
    summary: dict[str, Any] = {}
    for name in servers:
        summary[name] = {
            size: round(statistics.median(v), 1) for size, v in results["throughput"][name].items()
        }
    if "tokenwell" in servers and "llama-server" in servers:
        summary["ratio"] = {
            size: round(summary["tokenwell"][size] / summary["llama-server"][size], 3)
            for size in sizes
        }
    if "tokenwell" in servers:
        proc, headers = start("tokenwell", args.threads)
        try:
            alone = statistics.median(
                asyncio.run(stream_gaps(proc.base, headers, args.streams, args.tokens))
            )
            loaded = asyncio.run(itl_with_embeddings(proc.base, headers, args.streams, args.tokens))
        finally:
            proc.stop()
        summary["itl_p50_ms"] = {
            "alone": round(alone * 1000, 2),
            "with_embeddings": round(loaded * 1000, 2),
            "ratio": round(loaded / alone, 3),
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
