"""Claude Code, non-interactively, against tokenwell's Messages API (scripted engine).

Claude Code is installed by ``./dev test`` from ``tests/clients/package.json``
(npm); without it these tests skip. Its full system prompt (about 12,000
tokens) is beyond the tiny model's context, hence the scripted engine: what is
tested is the protocol (``/v1/messages?beta=true``, its headers, streaming,
usage, aliases), not text; ``--bare`` also runs on the real model (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import MASTER, ROOT, Server, model_config

CLAUDE = ROOT / "tests" / "clients" / "node_modules" / ".bin" / "claude"
REPLY = "Hello from tokenwell."

pytestmark = pytest.mark.skipif(
    not CLAUDE.exists(),
    reason="Claude Code is not installed (tests/clients/node_modules): "
    "./dev test installs it when npm is available",
)

CONFIG = f"""
[[models]]
name = "scripted-cc"
engine = "scripted"
reply = "{REPLY}"
price = {{ prompt = 1.0, completion = 2.0 }}
# Claude Code asks for its own default model (and a small one for side tasks).
aliases = ["claude-*"]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("claude-code"), CONFIG) as server:
        yield server


def claude(
    server: Server,
    home: Path,
    *args: str,
    timeout: float = 120,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),  # no user settings, sessions written here
        "ANTHROPIC_BASE_URL": server.base,
        "ANTHROPIC_API_KEY": MASTER,
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        **(env or {}),
    }
    done = subprocess.run(
        [str(CLAUDE), "-p", "Say hello.", "--output-format", "json", *args],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:  # (a run that stops at --max-turns may exit 1 with its JSON result)
        assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n{server.log()}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def messages_rows(server: Server) -> list[dict[str, Any]]:
    """The Messages API's ledger rows, once none is open (a close commits just after)."""
    deadline = time.monotonic() + 10
    with server.http() as http:
        while True:
            rows = http.get("/admin/requests", params={"limit": 100}).json()["data"]
            rows = [r for r in rows if r["api"] == "messages"]
            if all(r["status"] != "open" for r in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


@pytest.mark.parametrize("bare", [False, True], ids=["full", "bare"])
def test_claude_code_completes_a_prompt(server: Server, tmp_path: Path, bare: bool) -> None:
    before = {r["id"] for r in messages_rows(server)}
    result = claude(server, tmp_path, *(["--bare"] if bare else []))
    assert result["is_error"] is False and result["subtype"] == "success"
    assert result["result"] == REPLY
    assert result["stop_reason"] == "end_turn"
    rows = [r for r in messages_rows(server) if r["id"] not in before]
    assert rows and all(r["status"] == "completed" for r in rows)
    assert all(r["model"] == "scripted-cc" for r in rows)  # by alias, billed as the model
    # What Claude Code reports is what the ledger billed.
    usage = result["usage"]
    assert usage["output_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == sum(
        r["prompt_tokens"] for r in rows
    )


def test_server_is_healthy_after(server: Server) -> None:
    assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200


@pytest.mark.slow
def test_claude_code_bare_on_the_real_model(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    # --bare sends about 1,100 tokens (system prompt and tools). Its tools'
    # schemas use `minimum`, which the grammar leaves to the model (Anthropic
    # tools are not strict). The tiny model may call a tool and write long
    # answers (880 tokens seen, then a second turn over 2,048), so it gets its
    # whole trained context (8,192), 256 tokens an answer and at most 3 turns:
    # what is tested is that every request Claude Code makes is served and
    # billed, whatever the model says.
    config = model_config(parallel=1, context=8192, extra='aliases = ["claude-*"]')
    with Server(tmp_path_factory.mktemp("claude-code-model"), config) as server:
        result = claude(
            server,
            tmp_path,
            "--bare",
            "--max-turns",
            "3",
            timeout=280,
            check=False,
            # Claude Code asks for 32,000 tokens; the tiny model rarely stops by itself.
            env={"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "256"},
        )
        assert result.get("api_error_status") is None, result
        assert result["subtype"] in ("success", "error_max_turns"), result
        rows = messages_rows(server)
    assert rows, result
    assert all(r["status"] in ("completed", "length", "tool_calls") for r in rows), rows
    assert result["usage"]["output_tokens"] <= sum(r["completion_tokens"] for r in rows)
