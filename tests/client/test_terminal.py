"""``tokenwell chat`` driven through a real pseudo-terminal against a real server."""

from __future__ import annotations

import os
import re
import sys
from decimal import Decimal

import pexpect
import pytest

from tests.support import Server, ledger_row

pytestmark = pytest.mark.timeout(180)

TURN = re.compile(
    r"\[(\d+) prompt(?: \((\d+) cached\))? \+ (\d+) completion tokens · \$([0-9.]+) · "
    r"[0-9.]+ s · (req_[0-9a-f]+)\]"
)


def chat(server: Server, key: str, *args: str) -> pexpect.spawn:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWELL_")}
    return pexpect.spawn(
        sys.executable,
        ["-m", "tokenwell", "chat", "--url", server.base, "--key", key, *args],
        env={**env, "TERM": "dumb"},
        dimensions=(40, 100),
        encoding="utf-8",
        timeout=60,
    )


def turn(child: pexpect.spawn, text: str) -> tuple[str, dict[str, object]]:
    """Say ``text``; the answer as shown, and the turn's usage line."""
    child.expect_exact("you> ")
    child.sendline(text)
    child.expect(TURN)
    shown = child.before
    prompt, cached, completion, cost, rid = child.match.groups()
    return shown, {
        "prompt": int(prompt),
        "cached": int(cached or 0),
        "completion": int(completion),
        "cost": Decimal(cost),
        "id": rid,
    }


def test_a_conversation_in_the_terminal(scripted_server: Server) -> None:
    key = scripted_server.create_key(name="terminal")
    child = chat(scripted_server, key["key"], "--model", "scripted")
    child.expect_exact("model scripted")

    shown, first = turn(child, "tell me about the sea")
    assert "scripted> " in shown
    row = ledger_row(scripted_server, str(first["id"]))
    # What the line says is what the ledger billed.
    assert row["key_id"] == key["id"] and row["model"] == "scripted"
    assert (first["prompt"], first["completion"]) == (
        row["prompt_tokens"],
        row["completion_tokens"],
    )
    assert first["cost"] == Decimal(row["cost_usd"]) > 0
    assert f"${row['cost_usd']} · " in child.after  # written as the ledger writes it

    # The conversation is kept: the second turn's prompt holds the first.
    _, second = turn(child, "tell me about the sea")
    assert second["prompt"] > first["prompt"]  # type: ignore[operator]
    # /reset forgets it: the same words again cost the first turn's prompt.
    child.expect_exact("you> ")
    child.sendline("/reset")
    child.expect_exact("(conversation forgotten)")
    _, third = turn(child, "tell me about the sea")
    assert third["prompt"] == first["prompt"]

    # /model lists, then switches.
    child.expect_exact("you> ")
    child.sendline("/model")
    child.expect(r"models: .*\*scripted\b.*scripted-64")
    child.expect_exact("you> ")
    child.sendline("/model no-such-model")
    child.expect_exact("no model 'no-such-model'")
    child.expect_exact("you> ")
    child.sendline("/model scripted-64")
    child.expect_exact("(model scripted-64")
    shown, fourth = turn(child, "and now?")
    assert "scripted-64> " in shown and fourth["completion"] == 64
    assert ledger_row(scripted_server, str(fourth["id"]))["model"] == "scripted-64"

    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_errors_are_a_line_and_the_chat_goes_on(scripted_server: Server) -> None:
    key = scripted_server.create_key(name="small", models=["scripted-tiny"])
    child = chat(scripted_server, key["key"])
    child.expect_exact("model scripted-tiny")  # the first model the key may use
    child.expect_exact("you> ")
    child.sendline("/model scripted")
    child.expect_exact("no model 'scripted' for this key")
    child.expect_exact("you> ")
    child.sendline("word " * 100)  # past the model's 64-token context
    child.expect(r"error: HTTP 400: .*context.*\(/reset starts a new one\)")
    _, ok = turn(child, "hi")
    assert ok["completion"] > 0 and ok["prompt"] < 64  # the refused turn was not kept
    child.expect_exact("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_answers_bounded_by_the_options(scripted_server: Server) -> None:
    child = chat(scripted_server, "sk-test-master", "--model", "scripted-64", "--max-tokens", "5")
    _, bounded = turn(child, "go on")
    assert bounded["completion"] == 5  # the model would say 64
    assert ledger_row(scripted_server, str(bounded["id"]))["completion_tokens"] == 5
    child.expect_exact("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_a_wrong_key_is_one_sentence(scripted_server: Server) -> None:
    child = chat(scripted_server, "tw-" + "n" * 43)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "HTTP 401" in child.before and "Traceback" not in child.before


@pytest.mark.slow
def test_chatting_with_the_real_model(model_server: Server) -> None:
    # Bounded answers: unbounded, a sampled answer can fill the slot's context,
    # and the next turn is then refused as too long.
    child = chat(model_server, "sk-test-master", "--max-tokens", "48", "--temperature", "0")
    child.expect_exact("model SmolLM2-135M-Instruct")
    shown, first = turn(child, "What is the capital of France? Answer in one word.")
    assert 0 < first["completion"] <= 48 and len(shown.split("SmolLM2-135M-Instruct> ")[-1]) > 0
    _, second = turn(child, "And of Italy?")
    # The cache keeps the first turn: it is not prefilled again.
    assert second["prompt"] > first["prompt"]  # type: ignore[operator]
    assert second["cached"] > 0
    assert ledger_row(model_server, str(second["id"]))["status"] in ("completed", "length")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
