"""Idempotency-Key and resumable streams, against real server processes."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from tests.support import MASTER, SCRIPTED_CONFIG, Server, connect, ledger_row, raw_request
from tokenwell.errors import InvalidRequest
from tokenwell.protocol.sse import SSEDecoder
from tokenwell.server.idempotent import _canonical, _printable, fingerprint, parse_idempotency_key

STALL_TOKENS = 30_000  # ~7 MB of events: more than the socket buffers hold (4 MB)
CONFIG = (
    SCRIPTED_CONFIG
    + f"""
[[models]]
name = "scripted-long"
engine = "scripted"
reply_tokens = {STALL_TOKENS}
context = 1000000
price = {{ prompt = 1.0, completion = 2.0 }}

[idempotency]
grace_seconds = 1.5
max_log_bytes = 33554432
"""
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("idem"), CONFIG) as s:
        yield s


def _key() -> str:
    return "k-" + "".join(random.choices(string.ascii_letters, k=16))


def slow(text_tokens: int, delay: float) -> str:
    script = {"tokens": [f" t{i}" for i in range(text_tokens)], "delay": delay}
    return "!script " + orjson.dumps(script).decode()


def events(body: bytes) -> list[tuple[str | None, str]]:
    return [(e.id, e.data) for e in SSEDecoder().feed(body)]


def post(server: Server, body: dict[str, Any], **headers: str) -> httpx.Response:
    with server.http() as http:
        return http.post("/v1/chat/completions", json=body, headers=headers)


# ------------------------------------------------------------------ the header


def _valid(value: str) -> bool:
    return 1 <= len(value) <= 255 and all(32 <= ord(c) <= 126 for c in value)


@given(st.text(max_size=300))
@settings(max_examples=300)
def test_key_validation_accepts_exactly_printable_ascii_up_to_255(value: str) -> None:
    headers = Headers(raw=[(b"idempotency-key", value.encode("latin-1", "replace"))])
    as_sent = headers["idempotency-key"]
    try:
        parsed = parse_idempotency_key(headers)
    except InvalidRequest as exc:
        assert not _valid(as_sent)
        assert exc.status == 400 and exc.param == "Idempotency-Key"
    else:
        assert _valid(as_sent) and parsed == as_sent


@given(
    st.one_of(
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1),
        st.text(min_size=256, max_size=300, alphabet="ab"),
        # obs-text: HTTP lets it through, the key rules do not.
        st.binary(min_size=1, max_size=20)
        .map(lambda b: bytes(x if x >= 0x80 or 0x20 < x < 0x7F else 0x80 for x in b))
        .filter(lambda b: any(x >= 0x80 for x in b)),
    )
)
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_malformed_keys_are_400_over_http(server: Server, value: str | bytes) -> None:
    raw = value if isinstance(value, bytes) else value.encode()
    raw = raw.replace(b"\r", b"x").replace(b"\n", b"x").replace(b"\0", b"x").strip() or b"x"
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": raw})
    ok = _valid(raw.decode("latin-1"))
    if ok:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "Idempotency-Key"


def test_fingerprint_is_canonical() -> None:
    a = fingerprint(b'{"model": "m", "temperature": 1.0, "messages": []}')
    b = fingerprint(b'{"messages":[],"temperature":1,"model":"m"}')
    c = fingerprint(b'{"messages":[],"temperature":1.5,"model":"m"}')
    assert a == b != c


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(_json)
def test_fingerprint_reads_floats_wherever_a_body_may_hold_one(value: Any) -> None:
    """The float check is only a shortcut: the same fingerprint as canonicalizing always."""
    body = orjson.dumps(value)
    canonical = orjson.dumps(_canonical(orjson.loads(body)), option=orjson.OPT_SORT_KEYS)
    expected = hashlib.sha256(b"chat.completions\n" + canonical).hexdigest()
    assert fingerprint(body) == expected


@given(st.text(max_size=40))
def test_a_key_is_printable_ascii_exactly(value: str) -> None:
    assert _printable(value) == all(" " <= ch <= "~" for ch in value)


def test_last_event_id_needs_a_key_and_a_number(server: Server) -> None:
    body = {"model": "scripted", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    r = post(server, body, **{"Last-Event-ID": "3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID"
    r = post(server, body, **{"Last-Event-ID": "x", "Idempotency-Key": _key()})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID"


# ------------------------------------------------------------------ replay


def test_without_a_key_the_wire_has_no_ids(server: Server) -> None:
    body = {"model": "scripted", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    r = post(server, body)
    assert b"\nid:" not in r.content and not r.content.startswith(b"id:")
    assert "idempotent-replayed" not in r.headers


def test_stream_replay_is_the_same_events_and_billed_once(server: Server) -> None:
    key = _key()
    body = {
        "model": "scripted",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "replay me"}],
    }
    first = post(server, body, **{"Idempotency-Key": key})
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    got = events(first.content)
    assert [i for i, _ in got] == [str(n) for n in range(len(got))]
    assert got[-1][1] == "[DONE]"
    again = post(server, body, **{"Idempotency-Key": key})
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["x-request-id"] == first.headers["x-request-id"]
    resumed = post(server, body, **{"Idempotency-Key": key, "Last-Event-ID": "2"})
    assert events(resumed.content) == got[3:]
    row = ledger_row(server, first.headers["x-request-id"])
    assert row["status"] == "completed" and row["idempotency_key"] == key
    assert row["replays"] == 2 and row["attachments"] == 0
    with server.http() as http:
        rows = http.get("/admin/requests", params={"limit": 1000}).json()["data"]
    assert [r["id"] for r in rows if r["idempotency_key"] == key] == [row["id"]]


def test_json_replay_and_a_different_body_is_422(server: Server) -> None:
    key = _key()
    body = {"model": "scripted", "messages": [{"role": "user", "content": "json please"}]}
    first = post(server, body, **{"Idempotency-Key": key})
    again = post(server, body, **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    other = post(server, {**body, "temperature": 0.5}, **{"Idempotency-Key": key})
    assert other.status_code == 422
    assert other.json()["error"]["param"] == "Idempotency-Key"
    # Scoped to the API key: another key may use the same idempotency key.
    alice = server.create_key(name="alice")
    with server.http(key=alice["key"]) as http:
        mine = http.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
    assert mine.status_code == 200 and "idempotent-replayed" not in mine.headers
    assert mine.headers["x-request-id"] != first.headers["x-request-id"]


def test_a_refused_request_releases_its_key(server: Server) -> None:
    key = _key()
    too_long = {"model": "scripted-tiny", "messages": [{"role": "user", "content": "w " * 200}]}
    assert post(server, too_long, **{"Idempotency-Key": key}).status_code == 400
    fine = {"model": "scripted", "messages": [{"role": "user", "content": "now"}]}
    r = post(server, fine, **{"Idempotency-Key": key})
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers


# ------------------------------------------------------------------ attach, resume, grace


def test_attach_while_running_gets_every_event(server: Server) -> None:
    key = _key()
    body = {
        "model": "scripted",
        "stream": True,
        "messages": [{"role": "user", "content": slow(30, 0.02)}],
    }

    async def go() -> list[bytes]:
        headers = {"Authorization": "Bearer sk-test-master", "Idempotency-Key": key}
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as c:
            first = asyncio.create_task(c.post("/v1/chat/completions", json=body, headers=headers))
            await asyncio.sleep(0.25)
            second = await c.post("/v1/chat/completions", json=body, headers=headers)
            assert second.headers["idempotent-replayed"] == "true"
            return [(await first).content, second.content]

    a, b = asyncio.run(go())
    assert a == b and events(a)[-1][1] == "[DONE]"
    row = ledger_row(server, httpx_request_id(server, key))
    assert row["attachments"] == 1 and row["completion_tokens"] == 30


def httpx_request_id(server: Server, key: str) -> str:
    with server.http() as http:
        rows = http.get("/admin/requests", params={"limit": 1000}).json()["data"]
    (rid,) = [r["id"] for r in rows if r["idempotency_key"] == key]
    return str(rid)


def _read_some(server: Server, body: dict[str, Any], key: str, count: int) -> list[Any]:
    """Read ``count`` events of a stream, then drop the connection."""
    got: list[Any] = []
    headers = {"Idempotency-Key": key}
    with (
        server.http() as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        decoder = SSEDecoder()
        for raw in response.iter_raw():
            got.extend(decoder.feed(raw))
            if len(got) >= count:
                break
    return got[:count]


def test_resume_after_a_drop_continues_where_it_left(server: Server) -> None:
    key = _key()
    body = {
        "model": "scripted",
        "stream": True,
        "messages": [{"role": "user", "content": slow(40, 0.02)}],
    }
    seen = _read_some(server, body, key, 5)
    last = seen[-1].id
    time.sleep(0.3)  # it goes on without us
    rest = post(server, body, **{"Idempotency-Key": key, "Last-Event-ID": last})
    after = events(rest.content)
    assert after[0][0] == str(int(last) + 1) and after[-1][1] == "[DONE]"
    text = "".join(
        orjson.loads(d)["choices"][0]["delta"].get("content", "")
        for d in [e.data for e in seen] + [d for _, d in after[:-1]]
    )
    assert text == "".join(f" t{i}" for i in range(40))
    row = ledger_row(server, httpx_request_id(server, key))
    assert row["status"] == "completed" and row["completion_tokens"] == 40


def _dechunk(raw: bytes) -> bytes:
    """An HTTP/1.1 chunked body, whole."""
    parts, at = [], 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(parts)
        parts.append(raw[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


def test_a_reader_that_stalls_gets_every_event_and_generation_goes_on(server: Server) -> None:
    """A keyed stream whose client reads nothing for a while (a 4 KB receive
    window): its sends wait for the socket, which the producer hands to the
    reader's own task (``requestlog._finish_send``) and generates on; once the
    client reads, it gets every event once, in order, to [DONE]."""
    key = _key()
    body = {
        "model": "scripted-long",
        "stream": True,
        "messages": [{"role": "user", "content": "go"}],
    }
    sock = connect(server, rcvbuf=4096)
    sock.settimeout(30)
    try:
        sock.sendall(
            raw_request("POST", "/v1/chat/completions", body, headers={"Idempotency-Key": key})
        )
        # Generated and billed in full while the client has read nothing.
        deadline = time.monotonic() + 20
        while True:
            with server.http() as http:
                rows = http.get("/admin/requests", params={"limit": 1000}).json()["data"]
            mine = [r for r in rows if r["idempotency_key"] == key]
            if (mine and mine[0]["status"] == "completed") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert mine and mine[0]["status"] == "completed", mine
        assert mine[0]["completion_tokens"] == STALL_TOKENS
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # now read it fast
        parts: list[bytes] = []
        tail = b""
        while not tail.endswith(b"\r\n0\r\n\r\n"):  # the last chunk
            part = sock.recv(1 << 20)
            assert part, "the connection closed before the end"
            parts.append(part)
            tail = (tail + part)[-7:]
        raw = b"".join(parts)
    finally:
        sock.close()
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    got = events(_dechunk(chunked))
    assert [i for i, _ in got] == [str(n) for n in range(len(got))]
    assert got[-1][1] == "[DONE]"
    text = "".join(orjson.loads(d)["choices"][0]["delta"].get("content", "") for _, d in got[:-1])
    assert text == "".join(f" w{i}" for i in range(STALL_TOKENS))


def test_a_client_that_never_returns_is_cancelled_after_the_grace(server: Server) -> None:
    key = _key()
    body = {
        "model": "scripted",
        "stream": True,
        "messages": [{"role": "user", "content": slow(400, 0.02)}],
    }
    _read_some(server, body, key, 3)
    rid = httpx_request_id(server, key)
    time.sleep(0.8)  # within the grace (1.5 s) it still generates
    with server.http() as http:
        assert http.get(f"/admin/requests/{rid}").json()["status"] == "open"
    row = ledger_row(server, rid, timeout=10)
    assert row["status"] == "client_disconnected"
    # Billed for what was generated: more than it read, well short of 400.
    assert 3 < row["completion_tokens"] < 400
    # Abandoned, nothing whole was answered: the key is released, a retry generates anew.
    retry = {**body, "messages": [{"role": "user", "content": slow(3, 0)}]}
    r = post(server, retry, **{"Idempotency-Key": key})
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers
    assert r.headers["x-request-id"] != rid


def test_concurrent_duplicates_generate_once(server: Server) -> None:
    key = _key()
    body = {
        "model": "scripted",
        "stream": True,
        "messages": [{"role": "user", "content": slow(20, 0.005)}],
    }

    async def go() -> list[httpx.Response]:
        headers = {"Authorization": "Bearer sk-test-master", "Idempotency-Key": key}
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=server.base, timeout=60, limits=limits) as c:
            calls = [c.post("/v1/chat/completions", json=body, headers=headers) for _ in range(20)]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(go())
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert len({r.headers["x-request-id"] for r in responses}) == 1
    assert sum("idempotent-replayed" in r.headers for r in responses) == 19
    row = ledger_row(server, httpx_request_id(server, key))  # one row: exactly one
    assert row["replays"] + row["attachments"] == 19 and row["completion_tokens"] == 20


@pytest.fixture
def db_path(server: Server) -> Path:
    return server.data_dir / "tokenwell.db"


def test_keep_alives_between_numbered_events_do_not_break_the_sdks(tmp_path: Path) -> None:
    """On a stream whose events carry ``id:`` lines, the openai and anthropic SDKs'
    decoders keep the last id (as the SSE spec says) and then dispatch any
    blank line, a keep-alive comment's included, as an event with empty data,
    which they cannot parse (a background response in CI failed so: its
    stream paused for a keep-alive). Keep-alives there are comment lines that
    end no block: every SDK reads the stream whole."""
    import anthropic

    config = "keepalive_seconds = 0.1\n" + CONFIG
    with Server(tmp_path, config) as server:
        pause = "!script " + orjson.dumps({"tokens": [" a", " b", " c"], "delay": 0.35}).decode()
        key = _key()
        stream = server.client().chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": pause}],
            stream=True,
            extra_headers={"Idempotency-Key": key},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == " a b c"
        # The raw bytes: numbered events, and keep-alives between them.
        with server.http() as http:
            body = http.post(
                "/v1/chat/completions",
                json={
                    "model": "scripted",
                    "messages": [{"role": "user", "content": pause}],
                    "stream": True,
                },
                headers={"Idempotency-Key": _key()},
            ).content
        assert b"id: 1\n" in body and body.count(b": keep-alive\n") >= 2
        assert b": keep-alive\n\n" not in body
        response = server.client().responses.create(
            model="scripted", input=pause, stream=True, extra_headers={"Idempotency-Key": _key()}
        )
        assert [e.type for e in response][-1] == "response.completed"
        messages = anthropic.Anthropic(
            base_url=server.base, auth_token=MASTER, max_retries=0
        ).messages.create(
            model="scripted",
            max_tokens=16,
            messages=[{"role": "user", "content": pause}],
            stream=True,
            extra_headers={"Idempotency-Key": _key()},
        )
        assert [e.type for e in messages][-1] == "message_stop"
