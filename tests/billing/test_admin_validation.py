"""Hostile admin input: a 400 naming the field, nothing stored, listing never broken."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import KEY_SECRET, MASTER, Server
from tokenwell.billing.keys import parse_key_fields
from tokenwell.errors import InvalidRequest

BAD_FIELDS = [
    ({"expires_at": "0001-01-01T00:00:00+14:00"}, "expires_at"),
    ({"expires_at": "9999-12-31T23:59:59-14:00"}, "expires_at"),
    ({"expires_at": "1969-12-31T23:59:59Z"}, "expires_at"),
    ({"expires_at": 5}, "expires_at"),
    ({"budget_usd": 9.3e9}, "budget_usd"),
    ({"budget_usd": "9300000000"}, "budget_usd"),
    ({"budget_usd": "\u00b2"}, "budget_usd"),
    ({"budget_usd": True}, "budget_usd"),
    ({"budget_usd": "1e5"}, "budget_usd"),
    ({"rpm": 2**63}, "rpm"),
    ({"tpm": 2**63}, "tpm"),
    ({"rpm": 2**31}, "rpm"),
    ({"rpm": "60"}, "rpm"),
    ({"tpm": 1.5}, "tpm"),
    ({"rpm": True}, "rpm"),
    ({"models": [1]}, "models.[0]"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS)
def test_key_fields_are_strict_and_range_checked(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_key_fields({"name": "x", **fields}, creating=True)
    assert info.value.param == param


def test_good_key_fields_pass() -> None:
    fields, _ = parse_key_fields(
        {"name": "x", "budget_usd": "1000000000", "rpm": 2**31 - 1, "expires_at": "9998-01-01"},
        creating=True,
    )
    assert fields.rpm == 2**31 - 1
    fields, _ = parse_key_fields({"name": "x", "budget_usd": 2.5}, creating=True)
    assert str(fields.budget_usd) == "2.5"


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS)
def test_admin_api_refuses_and_stores_nothing(
    scripted_server: Server, fields: dict[str, object], param: str
) -> None:
    with scripted_server.http() as http:
        before = http.get("/admin/keys").json()["data"]
        r = http.post("/admin/keys", json={"name": "hostile", **fields})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        made = http.post("/admin/keys", json={"name": "patched"}).json()
        r = http.patch(f"/admin/keys/{made['id']}", json=fields)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        listed = http.get("/admin/keys")
        assert listed.status_code == 200, listed.text
        assert len(listed.json()["data"]) == len(before) + 1
        assert http.get(f"/admin/keys/{made['id']}").json()["expires_at"] is None


@pytest.mark.parametrize("limit", ["\u00b2", "\u0661", "0", "1001", "-1", "1.0"])
def test_request_listing_limit_must_be_ascii_digits(scripted_server: Server, limit: str) -> None:
    with scripted_server.http() as http:
        r = http.get("/admin/requests", params={"limit": limit})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "limit"


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenwell",
            *args,
            "--config",
            str(server.config_path),
            "--data-dir",
            str(server.data_dir),
        ],
        env={**server.env, "TOKENWELL_KEY_SECRET": KEY_SECRET, "TOKENWELL_MASTER_KEY": MASTER},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_refuses_out_of_range_keys_and_still_lists(scripted_server: Server) -> None:
    for option in (
        ("--expires", "0001-01-01T00:00:00+14:00"),
        ("--rpm", str(2**63)),
        ("--budget", "9300000000"),
    ):
        done = cli(scripted_server, "keys", "create", "--name", "cli-hostile", *option)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr, done.stderr
    listed = cli(scripted_server, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "cli-hostile" not in listed.stdout
