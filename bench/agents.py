"""Issue 17: an agent-trace replay, tokenwell against llama-server, in one run.

Coding agents resend their whole conversation every turn, behind a long
shared system prompt and tool list, and more sessions run than there are
slots. Here: --sessions concurrent sessions (8), --turns turns each (6), a
shared system prompt of about --prefix tokens (3,000: tool definitions), each
turn adding about 150 user tokens and generating --tokens tokens (100, end
tokens biased out, greedy), the whole history resent each turn; 4 slots of
8,192 tokens on every server.

Servers, one after another (all on the same GGUF; llama-server built with
tokenwell's own ggml flags by bench/peers.py, its prompt cache and slot
similarity at their defaults):
- ``tokenwell``: the embedded engine with its host-memory prompt store;
- ``tokenwell-nostore``: the same with ``cache_ram = 0`` (slots only);
- ``tokenwell-unbounded``: the same with ``step_ms = 0`` (a prompt read beside
  running streams in chunks of ``prefill_chunk``, however long a step takes);
- ``tokenwell-nospec``: the same with ``draft_max = 0`` (no speculative decoding);
- ``llama-server``, and ``llama-server:TYPE`` with ``--spec-type TYPE`` (its
  n-gram speculative decoding, e.g. ``ngram-mod``).

Reported per server: prompt tokens computed on turns 2 and later against the
tokens that were new there (a turn's prompt minus the previous turn's prompt
and answer, whose cells the session computed already), from tokenwell's
``cached_tokens`` and llama-server's ``timings.prompt_n``; time to first
token p50/p99 from turn 2 on; inter-token latency p50/p99 (a long prompt read
beside the streams stalls them); the whole run's wall time; aggregate generated
tokens/s; the server's resident memory (peak, and at the end).

    ./dev bench agents [--sessions 8] [--turns 6] [--prefix 3000] [--tokens 100]
                       [--servers tokenwell,tokenwell-nostore,llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.common import MASTER, MODEL, NO_EOS, Process, llama_server, median, pct, tokenwell

PARALLEL = 4
CONTEXT = 8192  # per slot

WORDS = str.split(
    "buffer cache index parser token stream schema module router handler ledger budget "
    "request response session retry timeout socket thread queue worker config value "
    "update delete insert select filter render encode decode layout widget column table "
    "report metric counter gauge histogram trace span event signal process resource"
)


def tools_prompt(tokens: int, rng: random.Random) -> str:
    """A system prompt of tool definitions, about ``tokens`` tokens long."""
    lines = ["You are a coding agent. You can call these tools:"]
    i = 0
    while len(" ".join(lines)) < tokens * 4:  # ~4 characters per token here
        name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{i}"
        params = {
            rng.choice(WORDS): {"type": rng.choice(["string", "integer", "boolean"])}
            for _ in range(3)
        }
        lines.append(
            json.dumps(
                {
                    "name": name,
                    "description": " ".join(rng.choice(WORDS) for _ in range(12)),
                    "parameters": {"type": "object", "properties": params},
                }
            )
        )
        i += 1
    return "\n".join(lines)


def user_turn(session: int, turn: int, rng: random.Random) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(110))
    return f"Session {session}, step {turn}: change the code so that {words}."


@dataclass
class Turn:
    session: int
    turn: int
    prompt: int = 0
    computed: int = 0
    completion: int = 0
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between content chunks


@dataclass
class Result:
    turns: list[Turn] = field(default_factory=list)
    wall: float = 0.0
    rss_peak: int = 0
    rss_end: int = 0


async def one_turn(
    client: httpx.AsyncClient, base: str, headers: dict[str, str], messages: list[Any], tokens: int
) -> tuple[str, Turn]:
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "logit_bias": NO_EOS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    turn = Turn(0, 0)
    text = ""
    start = last = time.perf_counter()
    buffer = b""
    async with client.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers=headers
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:500]!r}")
        async for data in response.aiter_raw():
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                chunk = orjson.loads(event[6:])
                for choice in chunk.get("choices") or []:
                    content = choice["delta"].get("content")
                    if content:
                        now = time.perf_counter()
                        if not text:
                            turn.ttft = now - start
                        else:
                            turn.gaps.append(now - last)
                        last = now
                        text += content
                usage = chunk.get("usage")
                if usage:
                    turn.prompt = usage["prompt_tokens"]
                    turn.completion = usage["completion_tokens"]
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    if cached is not None:
                        turn.computed = turn.prompt - cached
                timings = chunk.get("timings")
                if timings and "prompt_n" in timings:  # llama-server: what it computed
                    turn.computed = timings["prompt_n"]
    return text, turn


async def session(
    base: str, headers: dict[str, str], system: str, s: int, args: argparse.Namespace
) -> list[Turn]:
    rng = random.Random(1000 + s)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    turns = []
    for t in range(args.turns):
        messages.append({"role": "user", "content": user_turn(s, t, rng)})
        # A fresh connection per turn: llama-server drops idle keep-alive ones.
        async with httpx.AsyncClient(timeout=600) as client:
            text, turn = await one_turn(client, base, headers, messages, args.tokens)
        turn.session, turn.turn = s, t
        turns.append(turn)
        messages.append({"role": "assistant", "content": text})
    return turns


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def replay(proc: Process, headers: dict[str, str], args: argparse.Namespace) -> Result:
    system = tools_prompt(args.prefix, random.Random(7))
    result = Result()
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            result.rss_peak = max(result.rss_peak, rss(proc.proc.pid))
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    start = time.perf_counter()
    sessions = await asyncio.gather(
        *(session(proc.base, headers, system, s, args) for s in range(args.sessions))
    )
    result.wall = time.perf_counter() - start
    done.set()
    await watcher
    result.rss_end = rss(proc.proc.pid)
    result.rss_peak = max(result.rss_peak, result.rss_end)
    result.turns = [t for turns in sessions for t in turns]
    return result


def start(name: str, threads: int) -> tuple[Process, dict[str, str]]:
    if name.startswith("tokenwell"):
        store = {
            "tokenwell-nostore": "cache_ram = 0\n",  # slots only
            "tokenwell-unbounded": "step_ms = 0\n",  # prompt chunks of prefill_chunk
            "tokenwell-nospec": "draft_max = 0\n",  # no speculative decoding
        }.get(name, "")
        proc = tokenwell(
            f'[[models]]\nname = "{MODEL}"\nengine = "llamacpp"\nparallel = {PARALLEL}\n'
            f"context = {CONTEXT}\nthreads = {threads}\n{store}"
        )
        return proc.wait(), {"Authorization": f"Bearer {MASTER}"}
    if name == "llama-server" or name.startswith("llama-server:"):
        # llama-server:TYPE: with its n-gram speculative decoding (--spec-type TYPE).
        spec = ["--spec-type", name.split(":", 1)[1]] if ":" in name else []
        options = ["--parallel", str(PARALLEL), "-c", str(PARALLEL * CONTEXT), *spec]
        return llama_server(threads, *options), {}
    raise SystemExit(f"unknown server {name}")


def summary(name: str, result: Result, tokens: int) -> dict[str, Any]:
    by = {(t.session, t.turn): t for t in result.turns}
    later = [t for t in result.turns if t.turn > 0]
    new = 0
    for t in later:
        before = by[(t.session, t.turn - 1)]
        new += max(1, t.prompt - before.prompt - before.completion)
    computed = sum(t.computed for t in later)
    ttfts = [t.ttft for t in later]
    generated = sum(t.completion for t in result.turns)
    gaps = [g for t in result.turns for g in t.gaps]
    return {
        "server": name,
        "computed_later": computed,
        "new_later": new,
        "computed_per_new": computed / new,
        "computed_all": sum(t.computed for t in result.turns),
        "ttft_p50": median(ttfts),
        "ttft_p99": pct(ttfts, 99),
        "itl_p50": median(gaps),
        "itl_p99": pct(gaps, 99),
        "wall": result.wall,
        "tokens_per_s": generated / result.wall,
        "rss_peak_mib": result.rss_peak / 2**20,
        "rss_end_mib": result.rss_end / 2**20,
        "all_full": all(t.completion == tokens for t in result.turns),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--prefix", type=int, default=3000)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--servers", default="tokenwell,tokenwell-nostore,llama-server")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    rows = []
    for name in args.servers.split(","):
        proc, headers = start(name, args.threads)
        try:
            result = asyncio.run(replay(proc, headers, args))
        finally:
            proc.stop()
        row = summary(name, result, args.tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(
        "| server | prompt tokens computed, turns 2+ | new tokens, turns 2+ | computed / new "
        "| TTFT p50, turns 2+ | TTFT p99, turns 2+ | inter-token p50 / p99 | wall | tokens/s "
        "| RSS peak / end |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['server']} | {r['computed_later']:,} | {r['new_later']:,} "
            f"| {r['computed_per_new']:.2f}x | {r['ttft_p50'] * 1000:.0f} ms "
            f"| {r['ttft_p99'] * 1000:.0f} ms "
            f"| {r['itl_p50'] * 1000:.0f} / {r['itl_p99'] * 1000:.0f} ms "
            f"| {r['wall']:.1f} s | {r['tokens_per_s']:.1f} "
            f"| {r['rss_peak_mib']:.0f} / {r['rss_end_mib']:.0f} MiB |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
