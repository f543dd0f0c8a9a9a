"""Issue 6: tokenwell as a gateway vs the LiteLLM proxy, in one run.

One fast fake upstream (``bench/fake_upstream.py``, 64 chunks per response);
requests/s and time to first token at 1, 16 and 64 concurrent streams:
- direct to the upstream,
- through tokenwell (metering on: a real API key, SQLite ledger),
- through the LiteLLM proxy (same upstream, no database,
  ``LITELLM_LOCAL_MODEL_COST_MAP=True``), set up by ``bench/peers.py``.

    ./dev bench gateway [--seconds 8] [--levels 1,16,64] [--skip-litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench import peers
from bench.common import MASTER, Process, free_port, tokenwell
from bench.load import run_load

LITELLM_KEY = "sk-litellm-bench-0123456789abcdef0123456789abcdef"
BODY = {
    "model": "bench",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "hello"}],
}


def measure(
    url: str, headers: dict[str, str], levels: list[int], seconds: float
) -> list[dict[str, Any]]:
    out = []
    for level in levels:
        result = asyncio.run(run_load(url, BODY, headers, level, seconds, warmup=1.0))
        out.append({"streams": level, **result.summary()})
        print(f"  {level:>2} streams: {json.dumps(out[-1])}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--skip-litellm", action="store_true")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    port = free_port()
    upstream = Process(
        [sys.executable, "-m", "bench.fake_upstream", "--port", str(port)],
        port,
        health="/v1/models",
    ).wait()
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        print("direct", file=sys.stderr)
        results["direct"] = measure(
            f"{upstream.base}/v1/chat/completions", {}, levels, args.seconds
        )

        print("tokenwell", file=sys.stderr)
        gateway = tokenwell(
            f'[[models]]\nname = "bench"\nengine = "upstream"\nurls = ["{upstream.base}/v1"]\n'
            "price = { prompt = 1.0, completion = 2.0 }\n"
        ).wait()
        try:
            key = httpx.post(
                f"{gateway.base}/admin/keys",
                json={"name": "bench"},
                headers={"Authorization": f"Bearer {MASTER}"},
            ).json()["key"]
            results["tokenwell"] = measure(
                f"{gateway.base}/v1/chat/completions",
                {"Authorization": f"Bearer {key}"},
                levels,
                args.seconds,
            )
        finally:
            gateway.stop()

        if not args.skip_litellm:
            print("litellm", file=sys.stderr)
            litellm = peers.litellm()
            work = Path(tempfile.mkdtemp(prefix="litellm-"))
            (work / "config.yaml").write_text(
                "model_list:\n"
                "  - model_name: bench\n"
                "    litellm_params:\n"
                "      model: openai/fake\n"
                f"      api_base: {upstream.base}/v1\n"
                "      api_key: none\n"
            )
            lport = free_port()
            proxy = Process(
                [
                    str(litellm),
                    "--config",
                    str(work / "config.yaml"),
                    "--port",
                    str(lport),
                    "--host",
                    "127.0.0.1",
                ],
                lport,
                env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": LITELLM_KEY},
                health="/health/liveliness",
            ).wait(timeout=300)
            try:
                results["litellm"] = measure(
                    f"{proxy.base}/v1/chat/completions",
                    {"Authorization": f"Bearer {LITELLM_KEY}"},
                    levels,
                    args.seconds,
                )
            finally:
                proxy.stop()
    finally:
        upstream.stop()

    summary: dict[str, Any] = {"levels": levels, "results": results}
    direct = {r["streams"]: r for r in results["direct"]}
    ours = {r["streams"]: r for r in results["tokenwell"]}
    if 1 in direct and 1 in ours:
        summary["tokenwell_added_ttft_p50_ms_at_1"] = round(
            ours[1]["ttft_p50_ms"] - direct[1]["ttft_p50_ms"], 3
        )
    if "litellm" in results:
        theirs = {r["streams"]: r for r in results["litellm"]}
        summary["tokenwell_over_litellm_rps"] = {
            n: round(ours[n]["requests_per_s"] / max(theirs[n]["requests_per_s"], 1e-9), 1)
            for n in levels
        }
        summary["litellm_added_ttft_p50_ms_at_1"] = (
            round(theirs[1]["ttft_p50_ms"] - direct[1]["ttft_p50_ms"], 3) if 1 in theirs else None
        )
    summary["tokenwell_share_of_direct_rps"] = {
        n: round(ours[n]["requests_per_s"] / direct[n]["requests_per_s"], 3) for n in levels
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
