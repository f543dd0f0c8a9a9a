"""Issue 14: the Anthropic Messages API against chat completions, in one run.

One server (scripted engine, 64 tokens per response, full metering on
SQLite) answers both APIs, alternating (bench/apis.py). Reported:
single-stream tokens/s and requests/s at ``--concurrency`` streams for each,
and messages/chat ratios (1.0: no cost for speaking Anthropic's format; the
issue asks for within 5%).

    ./dev bench messages [--seconds 10] [--rounds 2] [--concurrency 64] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json

from bench.apis import CHAT, Api, add_arguments, compare
from bench.common import MASTER

APIS = {
    "chat": CHAT,
    "messages": Api(
        "/v1/messages",
        {
            "model": "scripted-64",
            "stream": True,
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "hello"}],
        },
        {"x-api-key": MASTER, "anthropic-version": "2023-06-01"},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    print(json.dumps(compare(APIS, parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
