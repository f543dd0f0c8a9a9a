"""Issues 3 and 20: many streams on one embedded model, tokenwell vs its peers, in one run.

At 1, 2, 4, 8 and 16 concurrent streams: aggregate completion tokens/s
(those that arrived within the measured windows),
p50/p99 time to first token and p50 inter-token latency. Same GGUF, same
prompts, same sampling (temperature 0.8, seeded), end tokens biased out so
every stream makes exactly --tokens tokens; a fresh connection per request.

By default the load is closed-loop: each of N clients sends its next request
as soon as its last one ended, for --seconds, so that requests arrive while
the others generate (as real users' do). All servers are up at once and the
windows alternate between them (A B, B A, ...) at each level, so the shared
machine's noise falls on all alike, and each window starts after
``WARMUP_SECONDS`` of the same number of streams (short requests) that are
not measured: for about a second after another server's window, llama.cpp's
decode runs slow, in every server. The load average is printed with the
results. ``--mode waves`` is the older measure: each round starts all
streams at once, servers one after another.

Peers (set up by ``bench/peers.py``, never committed):
- llama.cpp's ``llama-server --parallel 16``, built from the llama-cpp-python
  sdist's vendor/llama.cpp with tokenwell's own ggml flags;
- ``tokenwell-native``: tokenwell itself on pip's native (-march=native)
  build of llama-cpp-python, against which the portable build is measured;
- ``python -m llama_cpp.server`` (llama-cpp-python's own server), with
  ``--interrupt_requests False``: by default it cuts a running stream short
  whenever another request arrives.

    ./dev bench concurrency [--tokens 128] [--levels 1,2,4,8,16] [--rounds 2]
                            [--seconds 20] [--mode closed|waves]
                            [--servers tokenwell,llama-server[,llama-cpp-server,
                                       tokenwell-nospec,tokenwell-native]]

A tokenwell server named ``tokenwell@key=value`` runs with that top-level
setting (``tokenwell@gil_switch_ms=0.5``), beside the others; one named
``tokenwell@env:NAME=value`` with that environment variable
(``tokenwell@env:OMP_WAIT_POLICY=active``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
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
    llama_server,
    median,
    pct,
    stream_chat,
    tokenwell,
)

PARALLEL = 16
CONTEXT = 1024  # per slot
WARMUP_SECONDS = 2.0  # of each window, not measured (see interleaved)


def start(name: str, threads: int) -> tuple[Process, dict[str, str], str]:
    from tokenwell.engines.llamacpp.model import builtin_model_path

    gguf = str(builtin_model_path())
    name, _, setting = name.partition("@")
    # tokenwell@key=value: a top-level setting changed; tokenwell@env:NAME=value:
    # an environment variable set for the server process.
    variable = setting[4:].split("=", 1) if setting.startswith("env:") else None
    top = setting.replace("=", " = ", 1) + "\n" if setting and variable is None else ""
    if name in ("tokenwell", "tokenwell-native", "tokenwell-nospec"):
        # tokenwell-native: the same server on pip's native build of llama.cpp
        # (bench/peers.py), to show what the portable build costs;
        # tokenwell-nospec: without speculative decoding (draft_max = 0).
        env = {"PYTHONPATH": str(peers.native_site())} if name == "tokenwell-native" else {}
        if variable is not None:
            env[variable[0]] = variable[1]
        extra = "draft_max = 0\n" if name == "tokenwell-nospec" else ""
        proc = tokenwell(
            f'{top}[[models]]\nname = "{MODEL}"\nengine = "llamacpp"\nparallel = {PARALLEL}\n'
            f"context = {CONTEXT}\nthreads = {threads}\n{extra}",
            env=env or None,
        )
        return proc.wait(), {"Authorization": f"Bearer {MASTER}"}, MODEL
    if name == "llama-server":
        return (
            llama_server(threads, "--parallel", str(PARALLEL), "-c", str(PARALLEL * CONTEXT)),
            {},
            MODEL,
        )
    port = free_port()
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


@dataclass
class Tally:
    """One server's measurements at one level, over all its windows."""

    produced: float = 0.0  # tokens that arrived within the windows
    elapsed: float = 0.0  # the windows' seconds
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    # tokenwell's speculative decoding: tokens drafted, and kept.
    drafted: int = 0
    kept: int = 0
    # What its scheduler had learnt at the end of the level (/health).
    learnt: dict[str, Any] = field(default_factory=dict)
    # Each window's own tokens/s, in the order run: a window and the other
    # server's next to it ran under nearly the same machine, so their ratios'
    # spread is what one run can say about a ratio.
    windows: list[float] = field(default_factory=list)

    def summary(self, streams: int) -> dict[str, Any]:
        return {
            **({"drafted": self.drafted, "kept": self.kept} if self.drafted else {}),
            "streams": streams,
            "requests": len(self.ttfts),
            "tokens_per_s": round(self.produced / self.elapsed, 1),
            "ttft_p50_ms": round(median(self.ttfts) * 1000, 1),
            "ttft_p99_ms": round(pct(self.ttfts, 99) * 1000, 1),
            "itl_p50_ms": round(median(self.gaps) * 1000, 2),
            "itl_p90_ms": round(pct(self.gaps, 90) * 1000, 2),
            "itl_mean_ms": round(sum(self.gaps) / max(len(self.gaps), 1) * 1000, 2),
            "window_tokens_per_s": [round(w, 1) for w in self.windows],
            **self.learnt,
        }


async def closed_loop(
    base: str,
    headers: dict[str, str],
    model: str,
    streams: int,
    tokens: int,
    seconds: float,
    seed: int,
    tally: Tally,
) -> None:
    """``streams`` clients, each sending its next request as soon as the last one
    ended, for ``seconds`` (requests started by then run to their end): arrivals
    fall at any point of the others' generation, as with real users."""
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=0)
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, i: int) -> None:
        k = 0
        while time.perf_counter() < deadline:
            body = {
                "model": model,
                "stream": True,
                "max_tokens": tokens,
                "temperature": 0.8,
                "seed": seed + 1000 * i + k,
                "logit_bias": NO_EOS,
                "stream_options": {"include_usage": True},
                "messages": [
                    {
                        "role": "user",
                        "content": f"{PROMPTS[(i + k) % len(PROMPTS)]} (Part {seed + k}.{i})",
                    }
                ],
            }
            began = time.perf_counter()
            run = await stream_chat(http, f"{base}/v1/chat/completions", body, headers)
            assert run.status == 200, run.status
            # Only what arrived within the window counts: the requests still
            # running at its end finish with fewer streams beside them, a tail
            # whose length depends on where each one was when the window ended.
            chunks = len(run.gaps) + 1
            at, inside = began + (run.ttft or 0.0), 0
            for gap in (0.0, *run.gaps):
                at += gap
                inside += at <= deadline
            tally.produced += (run.tokens or chunks) * inside / chunks
            tally.ttfts.append(run.ttft)
            tally.gaps.extend(run.gaps)
            k += 1

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        produced = tally.produced
        await asyncio.gather(*[client(http, i) for i in range(streams)])
        tally.elapsed += deadline - start
        tally.windows.append((tally.produced - produced) / (deadline - start))


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def interleaved(args: argparse.Namespace, names: list[str], levels: list[int]) -> None:
    """Every server up at once (an idle one costs nothing); at each level, windows
    of closed-loop load alternate between them (A B, B A, ...), so the machine's
    noise falls on all alike."""
    threads = os.cpu_count() or 1
    servers: dict[str, tuple[Process, dict[str, str], str]] = {}
    try:
        for name in names:
            servers[name] = start(name, threads)
        for proc, headers, model in servers.values():
            asyncio.run(level(proc.base, headers, model, 1, 8, 1))  # warm-up
        loads = [load_average()]
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for streams in levels:
            tallies = {name: Tally() for name in names}
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    proc, headers, model = servers[name]
                    # Not measured: for about a second after another server's
                    # window, llama_decode itself runs slow here (a 26-token
                    # prefill 272 vs 118 ms, one-token steps up to 103 vs
                    # 10-14 ms), in both servers: as many streams of short
                    # requests, unmeasured.
                    asyncio.run(
                        closed_loop(
                            proc.base, headers, model, streams, 16, WARMUP_SECONDS, 500_000, Tally()
                        )
                    )
                    before = _stats(proc.base)
                    asyncio.run(
                        closed_loop(
                            proc.base,
                            headers,
                            model,
                            streams,
                            args.tokens,
                            args.seconds,
                            10_000 * r,
                            tallies[name],
                        )
                    )
                    after = _stats(proc.base)
                    if before and after:
                        tallies[name].drafted += after["draft_tokens"] - before["draft_tokens"]
                        tallies[name].kept += (
                            after["draft_accepted_tokens"] - before["draft_accepted_tokens"]
                        )
                        tallies[name].learnt = {
                            k: after.get(k) for k in ("step_cost", "draft_odds")
                        }
            for name in names:
                results[name].append(tallies[name].summary(streams))
                print(name, json.dumps(results[name][-1]), flush=True)
            loads.append(load_average())
            print(f"  load average: {loads[-1]}", file=sys.stderr, flush=True)
    finally:
        for proc, _, _ in servers.values():
            proc.stop()
    print(f"load average (1, 5, 15 min) at the start and after each level: {loads}")
    report(results, names)
    print(json.dumps(results, indent=2))


def report(results: dict[str, list[dict[str, Any]]], names: list[str]) -> None:
    """The table for RESULTS.md, and each server's ratios against llama-server."""
    print("| streams | server | requests | tokens/s | TTFT p50 | TTFT p99 | inter-token p50 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, row in enumerate(results[names[0]]):
        for name in names:
            r = results[name][i]
            print(
                f"| {row['streams']} | {name} | {r['requests']} | {r['tokens_per_s']} | "
                f"{r['ttft_p50_ms']} ms | {r['ttft_p99_ms']} ms | {r['itl_p50_ms']} ms |"
            )
    if "llama-server" not in results:
        return
    print()
    print(
        "| streams | server / llama-server | tokens/s | tokens/s, window by window: "
        "median (min-max) | TTFT p50 | TTFT p99 |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        if name == "llama-server":
            continue
        for ours, theirs in zip(results[name], results["llama-server"], strict=True):
            print(
                f"| {ours['streams']} | {name} | "
                f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | "
                f"{window_ratios(ours, theirs)} | "
                f"{ours['ttft_p50_ms'] / theirs['ttft_p50_ms']:.2f}x | "
                f"{ours['ttft_p99_ms'] / theirs['ttft_p99_ms']:.2f}x |"
            )


def window_ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """Round by round, one server's window against the other's next to it (A B, B A):
    the ratios' median and range, which say how far one run's ratio can be trusted."""
    ratios = sorted(
        a / b
        for a, b in zip(ours["window_tokens_per_s"], theirs["window_tokens_per_s"], strict=True)
        if b > 0
    )
    if not ratios:
        return ""
    return f"{median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--seconds", type=float, default=20, help="length of one closed-loop window"
    )
    parser.add_argument("--servers", default="tokenwell,llama-server")
    parser.add_argument(
        "--mode",
        choices=("closed", "waves"),
        default="closed",
        help="closed: closed-loop clients, servers interleaved (the default); waves: each "
        "round starts all streams at once, servers one after another",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    names = args.servers.split(",")
    if args.mode == "closed":
        interleaved(args, names, levels)
        return
    threads = os.cpu_count() or 1
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
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
    report(results, names)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
