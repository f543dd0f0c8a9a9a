"""Issue 3: many streams on one embedded model, tokenwell vs its peers, in one run.

For each server, at 1, 4 and 16 concurrent streams: aggregate completion
tokens/s, p50/p99 time to first token and p50 inter-token latency. Same GGUF,
same prompts, same sampling (temperature 0.8, seeded), end tokens biased out
so every stream makes exactly --tokens tokens.

Peers (set up by ``bench/peers.py``, never committed):
- llama.cpp's ``llama-server --parallel 16``, built from the llama-cpp-python
  sdist's vendor/llama.cpp with tokenwell's own ggml flags;
- ``tokenwell-native``: tokenwell itself on pip's native (-march=native)
  build of llama-cpp-python, against which the portable build is measured;
- ``python -m llama_cpp.server`` (llama-cpp-python's own server), with
  ``--interrupt_requests False``: by default it cuts a running stream short
  whenever another request arrives.

    ./dev bench concurrency [--tokens 128] [--levels 1,4,16] [--rounds 3]
                            [--servers tokenwell,llama-server,llama-cpp-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import httpx

from bench import peers
from bench.common import (
    MASTER,
    MODEL,
    NO_EOS,
    PROMPTS,
    Process,
    free_port,
    median,
    pct,
    stream_chat,
    tokenwell,
)

PARALLEL = 16
CONTEXT = 1024  # per slot


def start(name: str, threads: int) -> tuple[Process, dict[str, str], str]:
    from tokenwell.engines.llamacpp.model import builtin_model_path

    gguf = str(builtin_model_path())
    if name in ("tokenwell", "tokenwell-native"):
        # tokenwell-native: the same server on pip's native build of llama.cpp
        # (bench/peers.py), to show what the portable build costs.
        env = {"PYTHONPATH": str(peers.native_site())} if name == "tokenwell-native" else None
        proc = tokenwell(
            f'[[models]]\nname = "{MODEL}"\nengine = "llamacpp"\nparallel = {PARALLEL}\n'
            f"context = {CONTEXT}\nthreads = {threads}\n",
            env=env,
        )
        return proc.wait(), {"Authorization": f"Bearer {MASTER}"}, MODEL
    port = free_port()
    if name == "llama-server":
        binary = peers.llama_server()
        proc = Process(
            [
                str(binary),
                "-m",
                gguf,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--parallel",
                str(PARALLEL),
                "-c",
                str(PARALLEL * CONTEXT),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "--no-webui",
            ],
            port,
        )
        return proc.wait(), {}, MODEL
    if name == "llama-cpp-server":
        python = peers.llama_cpp_server()
        proc = Process(
            [
                str(python),
                "-m",
                "llama_cpp.server",
                "--model",
                gguf,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                str(CONTEXT),
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads),
                "--model_alias",
                MODEL,
                "--interrupt_requests",
                "False",
            ],
            port,
            health="/v1/models",
        )
        return proc.wait(), {}, MODEL
    raise SystemExit(f"unknown server {name}")


async def level(
    base: str, headers: dict[str, str], model: str, streams: int, tokens: int, rounds: int
) -> dict[str, Any]:
    ttfts: list[float] = []
    gaps: list[float] = []
    produced = 0
    elapsed = 0.0
    # A fresh connection per request: some servers drop idle keep-alive connections.
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for r in range(rounds):
            bodies = [
                {
                    "model": model,
                    "stream": True,
                    "max_tokens": tokens,
                    "temperature": 0.8,
                    "seed": 1000 * r + i,
                    "logit_bias": NO_EOS,
                    "stream_options": {"include_usage": True},
                    "messages": [
                        {
                            "role": "user",
                            "content": f"{PROMPTS[i % len(PROMPTS)]} (Part {r * 100 + i}.)",
                        }
                    ],
                }
                for i in range(streams)
            ]
            before = _stats(base)
            start = time.perf_counter()
            runs = await asyncio.gather(
                *[
                    stream_chat(client, f"{base}/v1/chat/completions", body, headers)
                    for body in bodies
                ]
            )
            took = time.perf_counter() - start
            elapsed += took
            after = _stats(base)
            if before and after:
                steps = after["steps"] - before["steps"]
                print(
                    f"  round {r}: {took:.2f}s, {steps} steps, decode "
                    f"{after['decode_seconds'] - before['decode_seconds']:.2f}s, sample "
                    f"{after['sample_seconds'] - before['sample_seconds']:.2f}s, step total "
                    f"{after['step_seconds'] - before['step_seconds']:.2f}s",
                    file=sys.stderr,
                )
            for run in runs:
                assert run.status == 200, run.status
                produced += run.tokens or (len(run.gaps) + 1)
                ttfts.append(run.ttft)
                gaps.extend(run.gaps)
    return {
        "streams": streams,
        "tokens_per_s": round(produced / elapsed, 1),
        "ttft_p50_ms": round(median(ttfts) * 1000, 1),
        "ttft_p99_ms": round(pct(ttfts, 99) * 1000, 1),
        "itl_p50_ms": round(median(gaps) * 1000, 2),
    }


def _stats(base: str) -> dict[str, Any] | None:
    """The engine's own timing counters, where the server is tokenwell."""
    try:
        stats = httpx.get(f"{base}/health", timeout=5).json()["models"][MODEL]
    except Exception:
        return None
    return stats if "decode_seconds" in stats else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--servers", default="tokenwell,llama-server,llama-cpp-server")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.servers.split(","):
        proc, headers, model = start(name, threads)
        try:
            # Warm-up: one short stream, then the measured levels.
            asyncio.run(level(proc.base, headers, model, 1, 8, 1))
            results[name] = [
                asyncio.run(level(proc.base, headers, model, n, args.tokens, args.rounds))
                for n in levels
            ]
        finally:
            proc.stop()
        print(name, json.dumps(results[name]), flush=True)
    if "tokenwell" in results and "llama-server" in results:
        for ours, theirs in zip(results["tokenwell"], results["llama-server"], strict=True):
            print(
                f"{ours['streams']:>2} streams: tokenwell/llama-server throughput "
                f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, "
                f"p99 TTFT {ours['ttft_p99_ms'] / theirs['ttft_p99_ms']:.2f}x"
            )
    if "tokenwell" in results and "tokenwell-native" in results:
        for ours, native in zip(results["tokenwell"], results["tokenwell-native"], strict=True):
            print(
                f"{ours['streams']:>2} streams: portable/native build throughput "
                f"{ours['tokens_per_s'] / native['tokens_per_s']:.3f}x, "
                f"p50 TTFT {ours['ttft_p50_ms'] / native['ttft_p50_ms']:.2f}x"
            )
    if "tokenwell" in results and "llama-cpp-server" in results:
        for ours, theirs in zip(results["tokenwell"], results["llama-cpp-server"], strict=True):
            print(
                f"{ours['streams']:>2} streams: tokenwell/llama_cpp.server throughput "
                f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
