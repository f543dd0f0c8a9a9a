"""Every change to a key is seen at once by every running server (issue 18).

Revocation and expiry were already re-checked when the ledger row is written;
a key's models (and limits) come from the server's key cache, so a change
must reach every cache: through Redis between replicas, through a stamp file
between the CLI and a server on SQLite.
"""

from __future__ import annotations

import httpx

from tests.billing.test_admin_keys import chat, run_cli
from tests.billing.test_replicas import replicas  # noqa: F401  (the fixture)
from tests.support import Server

BODY = {"messages": [{"role": "user", "content": "x"}]}


def _ask(server: Server, key: str, model: str) -> int:
    with server.http(key=key) as http:
        return http.post("/v1/chat/completions", json={**BODY, "model": model}).status_code


def _patch(server: Server, key_id: str, **fields: object) -> None:
    with server.http() as http:
        response: httpx.Response = http.patch(f"/admin/keys/{key_id}", json=fields)
    assert response.status_code == 200, response.text


def test_models_changed_on_one_replica_are_enforced_by_the_other_at_once(
    replicas: tuple[Server, Server],  # noqa: F811
) -> None:
    a, b = replicas
    key = a.create_key(name="models", models=["scripted", "scripted-64"])
    for _ in range(5):
        assert _ask(b, key["key"], "scripted") == 200  # b has the key cached now
        _patch(a, key["id"], models=["scripted-64"])
        assert _ask(b, key["key"], "scripted") == 403
        assert _ask(b, key["key"], "scripted-64") == 200
        _patch(a, key["id"], models=None)
        assert _ask(b, key["key"], "scripted") == 200
        _patch(a, key["id"], models=["scripted"])
    with b.http(key=key["key"]) as http:
        listed = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["scripted"]


def test_cli_models_change_is_seen_by_a_running_server_at_once(scripted_server: Server) -> None:
    key = scripted_server.create_key(name="cli-models", models=["scripted", "scripted-64"])
    assert chat(scripted_server, key["key"]).status_code == 200  # cached
    run_cli(scripted_server, "keys", "update", key["id"], "--models", "scripted-64")
    assert chat(scripted_server, key["key"]).status_code == 403
    assert _ask(scripted_server, key["key"], "scripted-64") == 200
    run_cli(scripted_server, "keys", "update", key["id"], "--models", "scripted,scripted-64")
    assert chat(scripted_server, key["key"]).status_code == 200
