"""Resumable streams across two replicas on one PostgreSQL and one Redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import REDIS_URL
from tests.support import MASTER, SCRIPTED_CONFIG, Server, ledger_row
from tokenwell.protocol.sse import SSEDecoder

CONFIG = SCRIPTED_CONFIG + "\n[idempotency]\ngrace_seconds = 1\n"


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[tuple[Server, Server]]:
    env = {"TOKENWELL_DATABASE_URL": pg_url, "TOKENWELL_REDIS_URL": REDIS_URL}
    a = Server(tmp_path / "a", CONFIG, env=env).start()
    b = Server(tmp_path / "b", CONFIG, env=env).start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def _body(tokens: int, delay: float) -> dict[str, Any]:
    script = {"tokens": [f" t{i}" for i in range(tokens)], "delay": delay}
    return {
        "model": "scripted",
        "stream": True,
        "messages": [{"role": "user", "content": "!script " + orjson.dumps(script).decode()}],
    }


def _read_some(server: Server, body: dict[str, Any], key: str, count: int) -> list[Any]:
    got: list[Any] = []
    with (
        server.http() as http,
        http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"Idempotency-Key": key}
        ) as response,
    ):
        assert response.status_code == 200, response.read()
        decoder = SSEDecoder()
        for raw in response.iter_raw():
            got.extend(decoder.feed(raw))
            if len(got) >= count:
                break
    return got[:count]


def _text(datas: list[str]) -> str:
    out = []
    for data in datas:
        chunk = orjson.loads(data)
        if chunk.get("choices"):
            out.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(out)


def _rid(server: Server, key: str) -> str:
    with server.http() as http:
        rows = http.get("/admin/requests", params={"limit": 1000}).json()["data"]
    (rid,) = [r["id"] for r in rows if r["idempotency_key"] == key]
    return str(rid)


def test_a_stream_started_on_one_replica_resumes_on_the_other(
    replicas: tuple[Server, Server],
) -> None:
    a, b = replicas
    key = "resume-" + secrets.token_hex(4)
    body = _body(60, 0.04)  # ~2.4 s: longer than the grace (1 s)
    seen = _read_some(a, body, key, 5)
    with b.http() as http:
        rest = http.post(
            "/v1/chat/completions",
            json=body,
            headers={"Idempotency-Key": key, "Last-Event-ID": seen[-1].id},
        )
    assert rest.headers["idempotent-replayed"] == "true"
    after = SSEDecoder().feed(rest.content)
    assert [e.id for e in after] == [str(n) for n in range(5, 5 + len(after))]
    assert after[-1].data == "[DONE]"
    assert _text([e.data for e in seen] + [e.data for e in after[:-1]]) == "".join(
        f" t{i}" for i in range(60)
    )
    # B's reader kept the generation on A alive past A's grace: completed, billed once.
    row = ledger_row(b, _rid(b, key))
    assert row["status"] == "completed" and row["completion_tokens"] == 60
    assert row["attachments"] >= 1
    # Finished: replayed from the database by either replica.
    with a.http() as http:
        again = http.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
    assert SSEDecoder().feed(again.content)[5:] == after


def test_when_the_generating_replica_dies_the_stream_ends_with_an_error(
    replicas: tuple[Server, Server],
) -> None:
    a, b = replicas
    key = "dies-" + secrets.token_hex(4)
    body = _body(400, 0.02)
    seen = _read_some(a, body, key, 4)
    a.kill9()
    with b.http() as http:
        rest = http.post(
            "/v1/chat/completions",
            json=body,
            headers={"Idempotency-Key": key, "Last-Event-ID": seen[-1].id},
        )
    after = SSEDecoder().feed(rest.content)
    assert after[-1].data == "[DONE]"
    error = orjson.loads(after[-2].data)
    assert error["error"]["code"] == "interrupted"
    # Every event the log held came first, in order, then the error.
    numbers = [int(e.id) for e in after]
    assert numbers == list(range(4, 4 + len(after)))
    tokens = _text([e.data for e in seen] + [e.data for e in after[:-2]])
    assert tokens == "".join(f" t{i}" for i in range(len(tokens.split())))


def test_concurrent_duplicates_on_two_replicas_generate_once(
    replicas: tuple[Server, Server],
) -> None:
    a, b = replicas
    key = "dup-" + secrets.token_hex(4)
    body = _body(20, 0.01)

    async def go() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {MASTER}", "Idempotency-Key": key}
        async with httpx.AsyncClient(timeout=60) as c:
            calls = [
                c.post(f"{(a, b)[i % 2].base}/v1/chat/completions", json=body, headers=headers)
                for i in range(16)
            ]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(go())
    assert {r.status_code for r in responses} == {200}, [r.text for r in responses]
    assert len({r.headers["x-request-id"] for r in responses}) == 1
    texts = {_text([e.data for e in SSEDecoder().feed(r.content)][:-1]) for r in responses}
    assert texts == {"".join(f" t{i}" for i in range(20))}
    row = ledger_row(a, _rid(a, key))
    assert row["completion_tokens"] == 20 and row["replays"] + row["attachments"] == 15
