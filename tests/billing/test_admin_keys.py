"""Keys through the admin HTTP API and the CLI, used for real requests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import KEY_SECRET, MASTER, Server


def chat(server: Server, key: str, model: str = "scripted", **extra: object):  # type: ignore[no-untyped-def]
    with server.http(key=key) as http:
        return http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "hi"}],
                **extra,
            },
        )


def test_create_use_list_update_revoke(scripted_server: Server) -> None:
    created = scripted_server.create_key(name="alice", budget_usd="5", rpm=100, models=["scripted"])
    secret = created["key"]
    assert secret.startswith("tw-") and created["id"].startswith("key_")
    assert created["budget_usd"] == "5.0" and created["models"] == ["scripted"]
    assert chat(scripted_server, secret).status_code == 200
    # Allowed models only: 403 for the others.
    denied = chat(scripted_server, secret, model="scripted-64")
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    with scripted_server.http() as http:
        listed = http.get("/admin/keys").json()["data"]
        mine = next(k for k in listed if k["id"] == created["id"])
        assert "key" not in mine and mine["prefix"] == secret[:10]
        patched = http.patch(f"/admin/keys/{created['id']}", json={"models": None, "rpm": 5})
        assert patched.status_code == 200 and patched.json()["rpm"] == 5
    assert chat(scripted_server, secret, model="scripted-64").status_code == 200
    with scripted_server.http() as http:
        assert http.delete(f"/admin/keys/{created['id']}").json()["status"] == "revoked"
    refused = chat(scripted_server, secret)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_admin_api_needs_the_master_key(scripted_server: Server) -> None:
    secret = scripted_server.create_key(name="bob")["key"]
    with scripted_server.http(key=secret) as http:
        r = http.get("/admin/keys")
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/admin/keys", {"name": "x", "budget_usd": -1}, 400, "budget_usd"),
        ("POST", "/admin/keys", {"budget_usd": 1}, 400, "name"),
        ("POST", "/admin/keys", {"name": "x", "rpm": 0}, 400, "rpm"),
        ("POST", "/admin/keys", {"name": "x", "expires_at": "soon"}, 400, "expires_at"),
        ("POST", "/admin/keys", {"name": "x", "colour": "red"}, 400, "colour"),
        ("PATCH", "/admin/keys/key_nope", {"rpm": 3}, 404, "id"),
        ("DELETE", "/admin/keys/key_nope", None, 404, "id"),
        ("GET", "/admin/requests/req_nope", None, 404, "id"),
        ("GET", "/admin/usage?group_by=colour", None, 400, "group_by"),
        ("GET", "/admin/usage?since=yesterday", None, 400, "since"),
    ],
)
def test_bad_admin_input(
    scripted_server: Server, method: str, path: str, body: object, status: int, param: str
) -> None:
    with scripted_server.http() as http:
        r = http.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_key_is_401(scripted_server: Server) -> None:
    for key in ("tw-", "not a key at all", "tw-" + "x" * 500):
        assert chat(scripted_server, key).status_code == 401


def test_expired_key_is_refused(scripted_server: Server) -> None:
    secret = scripted_server.create_key(name="old", expires_at="2000-01-01")["key"]
    assert chat(scripted_server, secret).status_code == 401


def run_cli(server: Server, *args: str) -> str:
    done = subprocess.run(
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
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_keys_work_against_a_running_server(scripted_server: Server) -> None:
    made = json.loads(
        run_cli(
            scripted_server,
            "keys",
            "create",
            "--name",
            "cli",
            "--budget",
            "2",
            "--models",
            "scripted,scripted-64",
            "--json",
        )
    )
    assert chat(scripted_server, made["key"]).status_code == 200
    listed = json.loads(run_cli(scripted_server, "keys", "list", "--json"))
    assert any(k["id"] == made["id"] and k["budget_usd"] == "2.0" for k in listed)
    updated = json.loads(
        run_cli(scripted_server, "keys", "update", made["id"], "--tpm", "999", "--json")
    )
    assert updated["tpm"] == 999
    run_cli(scripted_server, "keys", "revoke", made["id"])
    # Refused at once: the server's cached lookup is re-checked when the ledger row is written.
    assert chat(scripted_server, made["key"]).status_code == 401
    table = run_cli(scripted_server, "usage", "--by", "key,model")
    assert made["id"] in table
