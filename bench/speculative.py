"""Issue 17: speculative decoding on code rewriting, tokenwell vs itself without drafts
vs llama-server with and without its n-gram speculation, in one run.

A code-rewriting set: each prompt gives a Python function and asks for it back
with one change (greedy), the traffic of coding agents whose answers repeat
their input. One stream at a time; every server is up at once and the
prompts alternate between them (A B C, C B A, ...), so the shared machine's
noise falls on all alike. Reported per server: the decode rate (completion
tokens after the first, per second after the first) and the end-to-end rate
(completion tokens per second of the whole request), medians over the
requests; for tokenwell also the drafted and kept tokens from its counters.

Servers: ``tokenwell`` (drafts on, the default), ``tokenwell-nospec``
(``draft_max = 0``), ``llama-server`` (no speculation) and
``llama-server:TYPE`` for each of its ``--spec-type`` values (e.g.
``llama-server:ngram-simple``, ``ngram-map-k``, ``ngram-mod``), at that type's
default sizes.

    ./dev bench speculative [--rounds 3] [--tokens 320]
        [--servers tokenwell,tokenwell-nospec,llama-server,llama-server:ngram-simple]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import httpx

from bench.common import MASTER, MODEL, Process, llama_server, median, stream_chat, tokenwell

PARALLEL = 4
CONTEXT = 4096  # per slot

FUNCTIONS: list[tuple[str, str]] = [
    (
        "rename the function to `mean_of`",
        '''def average(values):
    """Return the arithmetic mean of a list of numbers."""
    if not values:
        raise ValueError("average of an empty list")
    total = 0
    count = 0
    for value in values:
        total = total + value
        count = count + 1
    return total / count''',
    ),
    (
        "rename the parameter `text` to `sentence`",
        '''def count_words(text):
    """Count how often each word occurs in a text."""
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?")
        if not word:
            continue
        counts[word] = counts.get(word, 0) + 1
    return counts''',
    ),
    (
        "make it return None instead of -1 when the item is missing",
        '''def binary_search(items, target):
    """Find the index of target in a sorted list, or -1."""
    low = 0
    high = len(items) - 1
    while low <= high:
        middle = (low + high) // 2
        if items[middle] == target:
            return middle
        if items[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1''',
    ),
    (
        "rename the variable `result` to `merged`",
        '''def merge_sorted(left, right):
    """Merge two sorted lists into one sorted list."""
    result = []
    i = 0
    j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i = i + 1
        else:
            result.append(right[j])
            j = j + 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result''',
    ),
    (
        "add a docstring that says what it returns",
        """def fizzbuzz(limit):
    lines = []
    for number in range(1, limit + 1):
        if number % 15 == 0:
            lines.append("FizzBuzz")
        elif number % 3 == 0:
            lines.append("Fizz")
        elif number % 5 == 0:
            lines.append("Buzz")
        else:
            lines.append(str(number))
    return lines""",
    ),
    (
        "rename the class to `Counter`",
        '''class Tally:
    """Count events by name."""

    def __init__(self):
        self.counts = {}

    def add(self, name, amount=1):
        self.counts[name] = self.counts.get(name, 0) + amount

    def get(self, name):
        return self.counts.get(name, 0)

    def total(self):
        return sum(self.counts.values())''',
    ),
    (
        "change the default separator from a comma to a semicolon",
        '''def parse_row(line, separator=","):
    """Split one line of a CSV file into stripped fields."""
    fields = []
    for field in line.split(separator):
        field = field.strip()
        if field.startswith('"') and field.endswith('"'):
            field = field[1:-1]
        fields.append(field)
    return fields''',
    ),
    (
        "rename the function to `fibonacci_numbers`",
        '''def fibonacci(count):
    """Return the first count Fibonacci numbers."""
    numbers = []
    a = 0
    b = 1
    for _ in range(count):
        numbers.append(a)
        a, b = b, a + b
    return numbers''',
    ),
]


def prompt(change: str, code: str) -> str:
    return (
        f"Repeat this Python code exactly, with one change: {change}. "
        f"Answer with the code only.\n\n```python\n{code}\n```"
    )


def start(name: str, threads: int, draft: int) -> Process:
    if name in ("tokenwell", "tokenwell-nospec"):
        extra = "draft_max = 0\n" if name == "tokenwell-nospec" else f"draft_max = {draft}\n"
        return tokenwell(
            f'[[models]]\nname = "{MODEL}"\nengine = "llamacpp"\nparallel = {PARALLEL}\n'
            f"context = {CONTEXT}\nthreads = {threads}\n{extra}"
        ).wait()
    if name == "llama-server" or name.startswith("llama-server:"):
        options = ["--parallel", str(PARALLEL), "-c", str(PARALLEL * CONTEXT)]
        if ":" in name:
            options += ["--spec-type", name.split(":", 1)[1]]  # its own draft sizes
        return llama_server(threads, *options)
    raise SystemExit(f"unknown server {name}")


def _stats(proc: Process) -> dict[str, Any]:
    try:
        response = httpx.get(
            proc.base + "/health", headers={"Authorization": f"Bearer {MASTER}"}, timeout=5
        )
        engine = response.json().get("models", {}).get(MODEL)
        if not engine:  # not tokenwell: its counters are not known
            return {}
        return {k: engine.get(k, 0) for k in ("draft_tokens", "draft_accepted_tokens")}
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}


async def one(proc: Process, text: str, tokens: int) -> dict[str, float]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {MASTER}"}
    async with httpx.AsyncClient(timeout=600) as http:
        run = await stream_chat(http, proc.base + "/v1/chat/completions", body, headers)
    if run.status != 200 or run.tokens < 2:
        raise RuntimeError(f"request failed: {run.status}, {run.tokens} tokens")
    return {
        "tokens": run.tokens,
        "decode": (run.tokens - 1) / (run.total - run.ttft),
        "end_to_end": run.tokens / run.total,
        "ttft": run.ttft,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=320)
    parser.add_argument("--draft", type=int, default=16, help="tokenwell's draft_max")
    parser.add_argument(
        "--servers", default="tokenwell,tokenwell-nospec,llama-server,llama-server:ngram-simple"
    )
    args = parser.parse_args()
    names = args.servers.split(",")
    threads = os.cpu_count() or 1
    servers: dict[str, Process] = {}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    try:
        for name in names:
            servers[name] = start(name, threads, args.draft)
        for proc in servers.values():  # warm-up: the step cost is learnt
            for change, code in FUNCTIONS[:2]:
                asyncio.run(one(proc, prompt(change, code), 32))
        before = {name: _stats(proc) for name, proc in servers.items()}
        for r in range(args.rounds):
            for i, (change, code) in enumerate(FUNCTIONS):
                order = names if (r + i) % 2 == 0 else names[::-1]
                for name in order:
                    result = asyncio.run(one(servers[name], prompt(change, code), args.tokens))
                    runs[name].append(result)
            print(f"round {r + 1} done", file=sys.stderr, flush=True)
        after = {name: _stats(proc) for name, proc in servers.items()}
    finally:
        for proc in servers.values():
            proc.stop()
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = runs[name]
        summary[name] = {
            "requests": len(rows),
            "tokens": int(sum(r["tokens"] for r in rows)),
            "decode_tok_s": round(median([r["decode"] for r in rows]), 1),
            "end_to_end_tok_s": round(median([r["end_to_end"] for r in rows]), 1),
            "ttft_ms": round(1000 * median([r["ttft"] for r in rows]), 1),
        }
        if after[name]:
            drafted = after[name]["draft_tokens"] - before[name]["draft_tokens"]
            kept = after[name]["draft_accepted_tokens"] - before[name]["draft_accepted_tokens"]
            summary[name]["drafted"] = drafted
            summary[name]["kept"] = kept
    print(json.dumps(summary, indent=2))
    base = summary.get("tokenwell-nospec")
    print(
        "| server | requests | tokens | decode tok/s | end-to-end tok/s | TTFT p50 | "
        "vs tokenwell-nospec (decode) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, s in summary.items():
        ratio = f"{s['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        print(
            f"| {name} | {s['requests']} | {s['tokens']} | {s['decode_tok_s']} | "
            f"{s['end_to_end_tok_s']} | {s['ttft_ms']} ms | {ratio} |"
        )


if __name__ == "__main__":
    main()
