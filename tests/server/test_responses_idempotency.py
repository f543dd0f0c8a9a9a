"""``Idempotency-Key`` on ``POST /v1/responses``: generated once, billed once, resumable.

The same machinery as chat completions (server/idempotent.py), with the
Responses wire: a keyed stream numbers its ``event:``/``data:`` events with
``id:`` lines, a reconnect with ``Last-Event-ID`` gets the rest, and a stream
that cannot go on ends with a Responses ``error`` event, never chat's
``[DONE]``. Against a real server, through the official SDK and raw bytes.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.support import MASTER, SCRIPTED_CONFIG, Server, ledger_row
from tokenwell.protocol.sse import SSEDecoder

CONFIG = SCRIPTED_CONFIG + "\n[idempotency]\ngrace_seconds = 5\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("resp-idem"), CONFIG) as s:
        yield s


def _key() -> str:
    return "r-" + "".join(random.choices(string.ascii_letters, k=16))


def _slow(tokens: int, delay: float) -> str:
    script = {"tokens": [f" t{i}" for i in range(tokens)], "delay": delay}
    return "!script " + orjson.dumps(script).decode()


def _post(server: Server, body: dict[str, Any], **headers: str) -> httpx.Response:
    with server.http() as http:
        return http.post("/v1/responses", json=body, headers=headers)


def _events(raw: bytes) -> list[tuple[str | None, str | None, dict[str, Any]]]:
    return [(e.id, e.event, orjson.loads(e.data)) for e in SSEDecoder().feed(raw)]


def _rows(server: Server, key: str) -> list[dict[str, Any]]:
    """The key's ledger rows, once closed (a close commits just after the answer)."""
    with server.http() as http:
        rows = http.get("/admin/requests", params={"limit": 1000}).json()["data"]
    return [ledger_row(server, r["id"]) for r in rows if r["idempotency_key"] == key]


def _counted(server: Server, key: str, replays_and_attachments: int) -> dict[str, Any]:
    """The key's one row once the connections it answered are counted on it."""
    deadline = time.monotonic() + 20
    while True:
        (row,) = _rows(server, key)
        if row["replays"] + row["attachments"] >= replays_and_attachments:
            return row
        assert time.monotonic() < deadline, row
        time.sleep(0.05)


def test_a_retried_response_is_the_same_response_billed_once(server: Server) -> None:
    key = _key()
    client = server.client()
    first = client.responses.with_raw_response.create(
        model="scripted", input="same answer", extra_headers={"Idempotency-Key": key}
    )
    again = client.responses.with_raw_response.create(
        model="scripted", input="same answer", extra_headers={"Idempotency-Key": key}
    )
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.parse().id == first.parse().id  # the same response, not a second one
    assert again.parse().output_text == first.parse().output_text
    row = _counted(server, key, 1)
    assert row["api"] == "responses" and row["replays"] == 1
    # Stored once: retrieving it gives the same object.
    assert client.responses.retrieve(first.parse().id).output_text == first.parse().output_text


def test_another_body_with_the_key_is_422_and_the_key_is_per_api(server: Server) -> None:
    key = _key()
    assert _post(
        server, {"model": "scripted", "input": "one"}, **{"Idempotency-Key": key}
    ).is_success
    other = _post(server, {"model": "scripted", "input": "two"}, **{"Idempotency-Key": key})
    assert other.status_code == 422
    assert other.json()["error"]["param"] == "Idempotency-Key"
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    # The same key on chat completions is another request's body: refused too, not replayed.
    with server.http() as http:
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "scripted", "messages": [{"role": "user", "content": "one"}]},
            headers={"Idempotency-Key": key},
        )
    assert chat.status_code == 422


def test_a_keyed_stream_is_numbered_and_resumes_after_a_drop(server: Server) -> None:
    key = _key()
    body = {"model": "scripted", "stream": True, "input": _slow(30, 0.02)}
    seen: list[Any] = []
    with (
        server.http() as http,
        http.stream("POST", "/v1/responses", json=body, headers={"Idempotency-Key": key}) as r,
    ):
        decoder = SSEDecoder()
        for raw in r.iter_raw():
            seen.extend(decoder.feed(raw))
            if len(seen) >= 6:
                break  # the connection drops here
    assert [e.id for e in seen[:6]] == [str(n) for n in range(6)]
    last = seen[5].id
    rest = _post(server, body, **{"Idempotency-Key": key, "Last-Event-ID": last})
    assert rest.headers["idempotent-replayed"] == "true"
    after = _events(rest.content)
    assert [i for i, _, _ in after] == [str(n) for n in range(6, 6 + len(after))]
    assert after[-1][1] == "response.completed"
    # Nothing lost, nothing repeated: the sequence numbers run on without a gap.
    numbers = [orjson.loads(e.data)["sequence_number"] for e in seen[:6]] + [
        d["sequence_number"] for _, _, d in after
    ]
    assert numbers == list(range(len(numbers)))
    text = "".join(
        d["delta"]
        for d in [orjson.loads(e.data) for e in seen[:6]] + [d for _, _, d in after]
        if d["type"] == "response.output_text.delta"
    )
    assert text == "".join(f" t{i}" for i in range(30))
    (row,) = _rows(server, key)
    assert row["status"] == "completed" and row["completion_tokens"] == 30


def test_concurrent_duplicates_generate_once(server: Server) -> None:
    key = _key()
    body = {"model": "scripted", "stream": True, "input": _slow(20, 0.005)}

    async def go() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {MASTER}", "Idempotency-Key": key}
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as c:
            calls = [c.post("/v1/responses", json=body, headers=headers) for _ in range(10)]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(go())
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    row = _counted(server, key, 9)
    assert row["replays"] + row["attachments"] == 9 and row["completion_tokens"] == 20
    done = _events(responses[0].content)[-1][2]
    assert done["type"] == "response.completed" and done["response"]["usage"]["output_tokens"] == 20


def test_a_retried_background_request_is_the_same_background_response(server: Server) -> None:
    key = _key()
    client = server.client()
    first = client.responses.create(
        model="scripted",
        input=_slow(10, 0.01),
        background=True,
        extra_headers={"Idempotency-Key": key},
    )
    again = client.responses.create(
        model="scripted",
        input=_slow(10, 0.01),
        background=True,
        extra_headers={"Idempotency-Key": key},
    )
    assert again.id == first.id and first.status == "queued"
    (row,) = _rows(server, key)
    final = ledger_row(server, row["id"])
    assert final["completion_tokens"] == 10


def test_without_a_key_there_are_no_ids_and_a_bad_key_is_400(server: Server) -> None:
    plain = _post(server, {"model": "scripted", "stream": True, "input": "x"})
    assert all(e.id is None for e in SSEDecoder().feed(plain.content))
    bad = _post(server, {"model": "scripted", "input": "x"}, **{"Idempotency-Key": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"
    orphan = _post(server, {"model": "scripted", "input": "x"}, **{"Last-Event-ID": "3"})
    assert orphan.status_code == 400
    assert orphan.json()["error"]["code"] == "missing_idempotency_key"
    with pytest.raises(openai.BadRequestError) as too_long:
        server.client().responses.create(
            model="scripted", input="x", extra_headers={"Idempotency-Key": "k" * 256}
        )
    assert too_long.value.body["param"] == "Idempotency-Key"  # type: ignore[index]
