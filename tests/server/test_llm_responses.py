"""Simon Willison's ``llm`` CLI on tokenwell's Responses API, through its OpenAI plugin.

``llm-openai-plugin`` is how ``llm`` speaks the Responses API (``llm`` 0.36 has
no ``--responses`` flag; its built-in OpenAI models use chat completions). The
plugin builds ``openai.OpenAI()`` with no base URL, so ``OPENAI_BASE_URL``
points it here, and its model ``openai/gpt-4o-mini`` reaches tokenwell as
``gpt-4o-mini``: an alias of a served model. Each test gets its own key and
its own ``LLM_USER_PATH`` (``llm``'s log database), so what ``llm`` logged can
be held against what tokenwell billed — a retry the SDK hid would show up as
one request too many in the ledger.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import Server, model_config

pytest.importorskip("llm_openai")

LLM = str(Path(sys.executable).parent / "llm")
REPLY_64 = " ".join(f"w{i}" for i in range(64))


class LLMCli:
    def __init__(self, server: Server, home: Path) -> None:
        self.server = server
        self.key = server.create_key(name="llm")
        self.env = {
            **os.environ,
            "LLM_USER_PATH": str(home),
            "OPENAI_BASE_URL": f"{server.base}/v1",
            "OPENAI_API_KEY": self.key["key"],
        }

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            [LLM, *args], env=self.env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, f"llm {args} failed:\n{done.stdout}\n{done.stderr}"
        self.stderr = done.stderr
        return done.stdout

    def logs(self) -> list[dict[str, Any]]:
        """What ``llm`` recorded of each response, oldest first."""
        logged = orjson.loads(self("logs", "--json", "-n", "0"))
        return sorted(logged, key=lambda entry: entry["datetime_utc"])

    def input_items(self, response_id: str) -> list[tuple[str, str]]:
        """(role, text) of what a response was asked, as tokenwell stored it, in order."""
        with self.server.http(self.key["key"]) as http:
            reply = http.get(f"/v1/responses/{response_id}/input_items", params={"order": "asc"})
        assert reply.status_code == 200, reply.text
        return [(item["role"], item["content"][0]["text"]) for item in reply.json()["data"]]

    def billed(self) -> dict[str, Any]:
        with self.server.http(self.key["key"]) as http:
            usage = http.get("/v1/usage").json()
        assert usage["in_flight"] == 0
        return usage  # type: ignore[no-any-return]

    def rows(self) -> list[dict[str, Any]]:
        with self.server.http() as http:
            reply = http.get("/admin/requests", params={"key_id": self.key["id"]})
        assert reply.status_code == 200, reply.text
        return sorted(reply.json()["data"], key=lambda row: row["created_at"])


def assert_llm_logged_what_was_billed(cli: LLMCli, turns: int) -> list[dict[str, Any]]:
    logs = cli.logs()
    assert len(logs) == turns
    billed = cli.billed()
    assert billed["requests"] == turns  # one request a turn: nothing retried, nothing lost
    assert billed["prompt_tokens"] == sum(entry["input_tokens"] for entry in logs)
    assert billed["completion_tokens"] == sum(entry["output_tokens"] for entry in logs)
    assert {row["api"] for row in cli.rows()} == {"responses"}
    return logs


def test_prompt_streamed_and_not_on_the_scripted_engine(
    scripted_server: Server, tmp_path: Path
) -> None:
    cli = LLMCli(scripted_server, tmp_path)
    assert cli("-m", "openai/gpt-4o-mini", "hello").strip() == REPLY_64
    assert cli("-m", "openai/gpt-4o-mini", "--no-stream", "hello").strip() == REPLY_64
    logs = assert_llm_logged_what_was_billed(cli, turns=2)
    assert [entry["output_tokens"] for entry in logs] == [64, 64]
    assert all(entry["model"] == "openai/gpt-4o-mini" for entry in logs)
    assert all(entry["datetime_utc"] for entry in logs)
    # What the plugin kept of the final response object: a Responses object from here.
    final = logs[0]["response_json"]
    assert final["object"] == "response" and final["status"] == "completed"
    assert final["id"].startswith("resp_")


def test_the_system_prompt_and_options_reach_the_model(
    scripted_server: Server, tmp_path: Path
) -> None:
    cli = LLMCli(scripted_server, tmp_path)
    # Not streamed: the plugin logs usage from `response.completed` only, and a
    # stream cut by max_output_tokens ends with `response.incomplete` (as OpenAI's).
    out = cli(
        "-m",
        "openai/gpt-4o-mini",
        "--no-stream",
        "-s",
        "Be brief.",
        "-o",
        "max_output_tokens",
        "5",
        "question",
    )
    assert out.strip() == "w0 w1 w2 w3 w4"
    (entry,) = assert_llm_logged_what_was_billed(cli, turns=1)
    final = entry["response_json"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cli.input_items(final["id"]) == [("system", "Be brief."), ("user", "question")]
    # (llm 0.36 with llm-openai-plugin 0.7 does not resend history on `llm -c`: the
    # plugin reads the conversation where llm no longer keeps it, so no test of it.)


def test_a_function_tool_runs_between_two_requests(scripted_server: Server, tmp_path: Path) -> None:
    cli = LLMCli(scripted_server, tmp_path)
    call = {"tool_calls": [{"name": "shout", "arguments": '{"text": "tokens"}'}]}
    out = cli(
        "-m",
        "openai/gpt-4o-mini",
        "--functions",
        "def shout(text: str) -> str:\n    return text.upper() + '!'",
        "--td",
        "!script " + orjson.dumps(call).decode(),
    )
    # llm ran the tool on the call tokenwell streamed, sent its output back as a
    # function_call_output item, and printed the model's next answer.
    assert "shout({'text': 'tokens'})" in cli.stderr and "TOKENS!" in cli.stderr  # --td
    assert out.strip() == REPLY_64
    first, second = assert_llm_logged_what_was_billed(cli, turns=2)
    assert first["output_tokens"] > 0 and second["output_tokens"] == 64


@pytest.mark.slow
def test_prompt_on_the_real_model(tmp_path: Path) -> None:
    config = model_config(parallel=1, extra='aliases = ["gpt-4o-mini"]')
    with Server(tmp_path / "server", config) as server:
        cli = LLMCli(server, tmp_path / "llm")
        out = cli(
            "-m",
            "openai/gpt-4o-mini",
            "-o",
            "max_output_tokens",
            "24",
            "-o",
            "temperature",
            "0",
            "Name one colour.",
        )
        assert out.strip()
        (entry,) = assert_llm_logged_what_was_billed(cli, turns=1)
        assert 0 < entry["output_tokens"] <= 24
        assert entry["response"].strip() == out.strip()
