"""Issue 2: one stream through HTTP + SSE vs the raw llama-cpp-python loop in-process.

Same GGUF, same prompts, same token counts (end tokens are biased out, so
every run makes exactly --tokens tokens), greedy sampling, runs interleaved
(raw, tokenwell, raw, tokenwell…) so that machine noise hits both alike.

    ./dev bench single_stream [--tokens 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import httpx

from bench.common import MASTER, MODEL, NO_EOS, PROMPTS, median, stream_chat, tokenwell


def raw_loop(llm, prompt: str, tokens: int) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """llama-cpp-python's own streaming generation, in this process."""
    messages = [{"role": "user", "content": prompt}]
    start = time.perf_counter()
    first = 0.0
    count = 0
    for chunk in llm.create_chat_completion(
        messages=messages,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        logit_bias={int(k): v for k, v in NO_EOS.items()},
    ):
        delta = chunk["choices"][0]["delta"]
        if delta.get("content"):
            count += 1
            if not first:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()

    from llama_cpp import Llama

    from tokenwell.engines.llamacpp.model import builtin_model_path

    threads = os.cpu_count() or 1
    server = tokenwell(
        f'[[models]]\nname = "{MODEL}"\nengine = "llamacpp"\nparallel = 1\ncontext = 2048\n'
        f"threads = {threads}\n"
    ).wait()
    llm = Llama(
        str(builtin_model_path()),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    raw_tps, tw_tps, raw_ttft, tw_ttft = [], [], [], []

    async def through_http(prompt: str) -> tuple[float, float, int]:
        async with httpx.AsyncClient(timeout=120) as client:
            run = await stream_chat(
                client,
                f"{server.base}/v1/chat/completions",
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": args.tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "logit_bias": NO_EOS,
                },
                {"Authorization": f"Bearer {MASTER}"},
            )
        return run.ttft, run.total, run.tokens

    try:
        for prompt in PROMPTS[: args.prompts]:  # warm both up
            raw_loop(llm, prompt, 8)
            asyncio.run(through_http(prompt))
        for _ in range(args.rounds):
            for prompt in PROMPTS[: args.prompts]:
                first, total, count = raw_loop(llm, prompt, args.tokens)
                raw_ttft.append(first)
                raw_tps.append(count / total)
                first, total, count = asyncio.run(through_http(prompt))
                assert count == args.tokens, count
                tw_ttft.append(first)
                tw_tps.append(count / total)
    finally:
        server.stop()
    result = {
        "tokens_per_request": args.tokens,
        "runs": len(raw_tps),
        "raw_tokens_per_s": round(median(raw_tps), 1),
        "tokenwell_tokens_per_s": round(median(tw_tps), 1),
        "ratio": round(median(tw_tps) / median(raw_tps), 3),
        "raw_ttft_ms": round(median(raw_ttft) * 1000, 1),
        "tokenwell_ttft_ms": round(median(tw_ttft) * 1000, 1),
        "added_ttft_ms": round((median(tw_ttft) - median(raw_ttft)) * 1000, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
