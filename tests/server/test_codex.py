"""OpenAI's Codex CLI, non-interactively, against tokenwell's Responses API (scripted engine).

Codex is installed by ``./dev test`` from ``tests/clients/package.json`` (npm;
its binary ships in the package); without it these tests skip. Its system
prompt and tools (about 8,000 tokens) are beyond the tiny model, hence the
scripted engine: what is tested is the protocol Codex speaks to a custom
provider (``wire_api = "responses"``: streamed events, ``store: false`` with
the whole history, ``reasoning``/``include``/``client_metadata``, developer
messages with ids, hosted and namespace tools), and that what it reports is
what the ledger billed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import MASTER, ROOT, Server

CODEX = ROOT / "tests" / "clients" / "node_modules" / ".bin" / "codex"
REPLY = "Hello from tokenwell."

pytestmark = pytest.mark.skipif(
    not CODEX.exists(),
    reason="Codex CLI is not installed (tests/clients/node_modules): "
    "./dev test installs it when npm is available",
)

CONFIG = f"""
[[models]]
name = "scripted-codex"
engine = "scripted"
reply = "{REPLY}"
price = {{ prompt = 1.0, completion = 2.0 }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("codex"), CONFIG) as server:
        yield server


def codex(server: Server, home: Path, prompt: str) -> list[dict[str, Any]]:
    """``codex exec --json``: its events (JSON lines)."""
    codex_home = home / "codex-home"
    codex_home.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(
        f"""
model = "scripted-codex"
model_provider = "tokenwell"

[model_providers.tokenwell]
name = "tokenwell"
base_url = "{server.base}/v1"
env_key = "TOKENWELL_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"""
    )
    work = home / "work"
    work.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        "TOKENWELL_API_KEY": MASTER,
    }
    done = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "--json", prompt],
        env=env,
        cwd=work,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}\n{server.log()}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def responses_rows(server: Server) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    with server.http() as http:
        while True:
            rows = http.get("/admin/requests", params={"limit": 100}).json()["data"]
            rows = [r for r in rows if r["api"] == "responses"]
            if all(r["status"] != "open" for r in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


def test_codex_exec_completes_a_turn(server: Server, tmp_path: Path) -> None:
    before = {r["id"] for r in responses_rows(server)}
    events = codex(server, tmp_path, "Say hello.")
    messages = [
        e["item"]["text"]
        for e in events
        if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message"
    ]
    assert messages == [REPLY]
    (completed,) = [e for e in events if e.get("type") == "turn.completed"]
    assert not [e for e in events if e.get("type") in ("error", "turn.failed")]
    rows = [r for r in responses_rows(server) if r["id"] not in before]
    assert len(rows) == 1 and rows[0]["status"] == "completed"
    # What Codex reports is what the ledger billed.
    usage = completed["usage"]
    assert usage["output_tokens"] == rows[0]["completion_tokens"]
    assert usage["input_tokens"] == rows[0]["prompt_tokens"]
