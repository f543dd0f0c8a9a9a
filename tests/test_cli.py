"""The ``tokenwell`` command as an operator uses it, in an 80-column terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pexpect
import pytest

from tests.support import KEY_SECRET, MASTER, SCRIPTED_CONFIG, Server

pytestmark = pytest.mark.timeout(180)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def env() -> dict[str, str]:
    return {
        **os.environ,
        "TOKENWELL_MASTER_KEY": MASTER,
        "TOKENWELL_KEY_SECRET": KEY_SECRET,
        "TERM": "xterm",
        "COLUMNS": "80",
    }


def in_terminal(*args: str) -> str:
    """``tokenwell ARGS`` in a pseudo-terminal 80 columns wide; what it showed."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "tokenwell", *args],
        env=env(),
        dimensions=(40, 80),
        encoding="utf-8",
        timeout=60,
    )
    child.expect(pexpect.EOF)
    child.close()
    text = ANSI.sub("", child.before or "")
    assert child.exitstatus == 0, text
    return text


def piped(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tokenwell", *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_key_ids_survive_a_narrow_terminal(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data"), "--config", str(tmp_path / "c.toml")]
    (tmp_path / "c.toml").write_text(SCRIPTED_CONFIG)
    shown = in_terminal(
        "keys", "create", "--name", "alice with a long name", "--budget", "5", "--rpm", "60",
        "--tpm", "100000", "--models", "scripted,scripted-64", "--expires", "2031-01-01", *data,
    )  # fmt: skip
    created = json.loads(piped("keys", "list", "--json", *data))[0]
    assert created["id"] in shown  # whole, on one line
    listed = in_terminal("keys", "list", *data)
    assert created["id"] in listed
    assert all(len(line) <= 80 for line in listed.splitlines())
    # `keys show` takes the id as printed.
    shown_key = in_terminal("keys", "show", created["id"], *data)
    assert "alice with a long name" in shown_key
    assert "100000" in shown_key and "requests" in shown_key
    details = json.loads(piped("keys", "show", created["id"], "--json", *data))
    assert details["usage"]["requests"] == 0 and Decimal(details["budget_usd"]) == 5


def test_the_request_log_and_reports_name_keys(tmp_path: Path) -> None:
    with Server(tmp_path, SCRIPTED_CONFIG) as server:
        alice = server.create_key(name="alice")
        bob = server.create_key(name="bob")
        ids = {}
        for who, model in ((alice, "scripted"), (bob, "scripted-64"), (bob, "scripted")):
            with server.http(key=who["key"]) as http:
                r = http.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                )
                assert r.status_code == 200
                ids[(who["name"], model)] = r.headers["x-request-id"]
        data = ["--data-dir", str(server.data_dir), "--config", str(server.config_path)]
        # Closes commit just after the response: wait for the last one.
        from tests.support import ledger_row

        for rid in ids.values():
            ledger_row(server, rid)

        rows = json.loads(piped("requests", "list", "--key", bob["id"], "--json", *data))
        assert {r["id"] for r in rows} == {ids[("bob", "scripted-64")], ids[("bob", "scripted")]}
        assert {r["key_name"] for r in rows} == {"bob"}
        only = json.loads(
            piped("requests", "list", "--key", bob["id"], "--model", "scripted-64", "--json", *data)
        )
        assert [r["id"] for r in only] == [ids[("bob", "scripted-64")]]
        assert json.loads(piped("requests", "list", "--since", "2999-01-01", "--json", *data)) == []

        table = in_terminal("requests", "list", *data)
        for rid in ids.values():
            assert rid in table
        assert "alice" in table and "bob" in table

        row = json.loads(piped("requests", "show", ids[("alice", "scripted")], *data))
        assert row["key_id"] == alice["id"] and row["status"] == "completed"
        assert row["completion_tokens"] > 0

        report = in_terminal("usage", "--by", "key", *data)
        assert "alice" in report and "bob" in report and alice["id"] in report
        with server.http() as http:
            usage = http.get("/admin/usage", params={"group_by": "key"}).json()["data"]
        assert {u["key_name"] for u in usage} == {"alice", "bob"}
        with server.http() as http:
            r = http.get("/admin/requests", params={"model": "scripted-64"})
            assert [x["id"] for x in r.json()["data"]] == [ids[("bob", "scripted-64")]]
            bad = http.get("/admin/requests", params={"since": "yesterday"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
