"""``/v1/responses`` through the official openai SDK and raw bytes (scripted engine)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from pydantic import BaseModel

from tests.conftest import REDIS_URL
from tests.support import SCRIPTED_CONFIG, Server, gateway_config, ledger_row
from tokenwell.protocol.sse import SSEDecoder


def script(**fields: Any) -> str:
    return "!script " + orjson.dumps(fields).decode()


def raw_events(body: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    return [(e.event, orjson.loads(e.data)) for e in SSEDecoder().feed(body)]


class GetWeather(BaseModel):
    city: str


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_create_plain(scripted_server: Server) -> None:
    client = scripted_server.client()
    response = client.responses.create(model="scripted", input=script(text="Hello there world"))
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text == "Hello there world"
    assert response.usage is not None
    assert response.usage.output_tokens == 3
    assert response.usage.total_tokens == response.usage.input_tokens + 3
    # Stored by default, and scoped to the key.
    again = client.responses.retrieve(response.id)
    assert again.output_text == "Hello there world"
    assert again.usage == response.usage


def test_one_ledger_row_billed_with_the_meter(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        reply = http.post("/v1/responses", json={"model": "scripted", "input": "hi you"})
    assert reply.status_code == 200
    body = reply.json()
    row = ledger_row(scripted_server, reply.headers["x-request-id"])
    assert row["status"] == "completed"
    assert row["api"] == "responses"
    assert row["prompt_tokens"] == body["usage"]["input_tokens"]
    assert row["completion_tokens"] == body["usage"]["output_tokens"]


def test_stream_raw_bytes(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        # The SDK sends Accept: application/json even when streaming: `stream` decides.
        reply = http.post(
            "/v1/responses",
            json={"model": "scripted", "input": script(text="one two three"), "stream": True},
            headers={"Accept": "application/json"},
        )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = raw_events(reply.content)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert b"[DONE]" not in reply.content
    final = events[-1][1]["response"]
    assert final["usage"]["output_tokens"] == 3
    assert final["output"][0]["content"][0]["text"] == "one two three"


def test_max_output_tokens_is_incomplete(scripted_server: Server) -> None:
    client = scripted_server.client()
    response = client.responses.create(model="scripted-64", input="x", max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 5


def test_sdk_stream_and_helper(scripted_server: Server) -> None:
    client = scripted_server.client()
    stream = client.responses.create(model="scripted", input=script(text="a b c"), stream=True)
    types = [event.type for event in stream]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    with client.responses.stream(model="scripted", input=script(text="x y")) as helper:
        deltas = [e.delta for e in helper if e.type == "response.output_text.delta"]
        final = helper.get_final_response()
    assert "".join(deltas) == "x y"
    assert final.output_text == "x y"
    assert final.usage is not None and final.usage.output_tokens == 2


def test_function_calling_over_two_turns(scripted_server: Server) -> None:
    client = scripted_server.client()
    first = client.responses.create(
        model="scripted",
        input=script(tool_calls=[{"name": "get_weather", "chunks": ['{"city":', ' "Oslo"}']}]),
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and call.arguments == '{"city": "Oslo"}'
    second = client.responses.create(
        model="scripted",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "4 C"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert second.status == "completed"
    assert second.previous_response_id == first.id
    # The conversation went in: the echo engine saw more than this turn's input.
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]


def test_stream_function_call_events(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        reply = http.post(
            "/v1/responses",
            json={
                "model": "scripted",
                "input": script(tool_calls=[{"name": "get_weather", "chunks": ["{", "}"]}]),
                "tools": [WEATHER_TOOL],
                "stream": True,
            },
        )
    names = [name for name, _ in raw_events(reply.content)]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_delete_and_store_false(scripted_server: Server) -> None:
    client = scripted_server.client()
    kept = client.responses.create(model="scripted", input="keep")
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)
    gone = client.responses.create(model="scripted", input="forget", store=False)
    assert gone.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(gone.id)


def test_responses_are_scoped_to_their_key(scripted_server: Server) -> None:
    other = scripted_server.create_key(name="other")["key"]
    mine = scripted_server.client().responses.create(model="scripted", input="secret")
    with pytest.raises(openai.NotFoundError):
        scripted_server.client(other).responses.retrieve(mine.id)
    with pytest.raises(openai.BadRequestError) as err:
        scripted_server.client(other).responses.create(
            model="scripted", input="x", previous_response_id=mine.id
        )
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_input_tokens(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        counted = http.post(
            "/v1/responses/input_tokens", json={"model": "scripted", "input": "one two"}
        ).json()
        made = http.post("/v1/responses", json={"model": "scripted", "input": "one two"}).json()
    assert counted["object"] == "response.input_tokens"
    assert counted["input_tokens"] == made["usage"]["input_tokens"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.[0].content.[0].type",
        ),
        ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_errors_before_the_first_byte(
    scripted_server: Server, body: dict[str, Any], param: str
) -> None:
    with scripted_server.http() as http:
        reply = http.post("/v1/responses", json={"model": "scripted", "stream": True, **body})
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_what_real_clients_send_is_accepted(scripted_server: Server) -> None:
    body = {
        "model": "scripted",
        "instructions": "You are a coding agent.",
        "input": [
            {"type": "message", "role": "developer", "id": "m1", "content": "be nice"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        ],
        "tools": [WEATHER_TOOL, {"type": "web_search"}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "thread-1",
        "client_metadata": {"session": "x"},
        "text": {"verbosity": "low"},
    }
    with scripted_server.http() as http:
        reply = http.post("/v1/responses", json=body)
    assert reply.status_code == 200, reply.text
    events = raw_events(reply.content)
    assert events[-1][0] == "response.completed"


def test_text_format_json_schema(scripted_server: Server) -> None:
    client = scripted_server.client()

    class City(BaseModel):
        name: str

    parsed = client.responses.parse(
        model="scripted", input=script(tokens=['{"name": ', '"Oslo"}']), text_format=City
    )
    assert parsed.output_parsed == City(name="Oslo")


def _wait_status(client: openai.OpenAI, response_id: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        response = client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_background_poll_and_resume(scripted_server: Server) -> None:
    client = scripted_server.client()
    raw = client.responses.with_raw_response.create(
        model="scripted", input=script(text="a b c d e f", delay=0.05), background=True
    )
    started = raw.parse()
    assert started.status == "queued"
    assert started.background is True
    stream = client.responses.retrieve(started.id, stream=True, starting_after=2)
    numbers = [event.sequence_number for event in stream]
    assert numbers[0] == 3
    assert numbers == list(range(3, numbers[-1] + 1))
    done = _wait_status(client, started.id)
    assert done.status == "completed"
    assert done.output_text == "a b c d e f"
    # One ledger row, billed once, with the response's usage.
    row = ledger_row(scripted_server, raw.headers["x-request-id"])
    assert row["status"] == "completed"
    assert done.usage is not None
    assert row["completion_tokens"] == done.usage.output_tokens == 6
    assert row["prompt_tokens"] == done.usage.input_tokens


def test_background_streamed_from_the_start(scripted_server: Server) -> None:
    client = scripted_server.client()
    events = list(
        client.responses.create(
            model="scripted", input=script(text="p q r"), background=True, stream=True
        )
    )
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    response_id = events[-1].response.id  # type: ignore[union-attr]
    assert _wait_status(client, response_id).output_text == "p q r"


def test_background_cancel_bills_what_was_generated(scripted_server: Server) -> None:
    client = scripted_server.client()
    raw = client.responses.with_raw_response.create(
        model="scripted-slow", input="go", background=True
    )
    started = raw.parse()
    time.sleep(0.3)
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    assert cancelled.usage is not None
    generated = cancelled.usage.output_tokens
    assert 0 < generated < 400
    assert client.responses.retrieve(started.id).status == "cancelled"
    # Cancelling again answers the same response.
    assert client.responses.cancel(started.id).status == "cancelled"
    row = ledger_row(scripted_server, raw.headers["x-request-id"])
    assert row["status"] == "cancelled"
    assert row["completion_tokens"] == generated
    # A response that was not made in the background cannot be cancelled.
    plain = client.responses.create(model="scripted", input="x")
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(plain.id)


def test_unknown_response(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        reply = http.get("/v1/responses/resp_nope")
        assert reply.status_code == 404
        assert reply.json()["error"]["param"] == "response_id"
        assert http.post("/v1/responses/resp_nope/cancel").status_code == 404
        assert http.get("/v1/responses/resp_nope/input_items").status_code == 404


def test_bad_key_is_a_401_in_the_error_shape(scripted_server: Server) -> None:
    reply = httpx.post(
        f"{scripted_server.base}/v1/responses",
        json={"model": "scripted", "input": "x", "stream": True},
        headers={"Authorization": "Bearer nope"},
    )
    assert reply.status_code == 401
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_background_stream_on_another_replica(tmp_path: Path, pg_url: str) -> None:
    """Started on one replica, its events read on the other through Redis."""
    env = {"TOKENWELL_DATABASE_URL": pg_url, "TOKENWELL_REDIS_URL": REDIS_URL}
    with (
        Server(tmp_path / "a", SCRIPTED_CONFIG, env=env) as a,
        Server(tmp_path / "b", SCRIPTED_CONFIG, env=env) as b,
    ):
        started = a.client().responses.create(
            model="scripted", input=script(text="u v w x y z", delay=0.05), background=True
        )
        events = list(b.client().responses.retrieve(started.id, stream=True, starting_after=1))
        assert [e.sequence_number for e in events] == list(range(2, len(events) + 2))
        assert events[-1].type == "response.completed"
        assert _wait_status(b.client(), started.id).output_text == "u v w x y z"


def test_background_polled_and_cancelled_on_another_replica(tmp_path: Path, pg_url: str) -> None:
    """Polled elsewhere it is ``in_progress`` (not ``queued``); cancelled elsewhere, the
    replica running it stops it: ``cancelled``, billed once for what was generated."""
    env = {"TOKENWELL_DATABASE_URL": pg_url, "TOKENWELL_REDIS_URL": REDIS_URL}
    with (
        Server(tmp_path / "a", SCRIPTED_CONFIG, env=env) as a,
        Server(tmp_path / "b", SCRIPTED_CONFIG, env=env) as b,
    ):
        raw = a.client().responses.with_raw_response.create(
            model="scripted-slow", input="go", background=True
        )
        started = raw.parse()
        other = b.client()
        deadline = time.monotonic() + 30
        while (polled := other.responses.retrieve(started.id)).status == "queued":
            assert time.monotonic() < deadline, "never shown in progress on the other replica"
            time.sleep(0.05)
        assert polled.status == "in_progress"
        cancelled = other.responses.cancel(started.id)
        assert cancelled.status == "cancelled"
        assert cancelled.usage is not None
        generated = cancelled.usage.output_tokens
        assert 0 < generated < 400  # stopped, not run to its end
        assert a.client().responses.retrieve(started.id).status == "cancelled"
        row = ledger_row(a, raw.headers["x-request-id"])
        assert row["status"] == "cancelled"
        assert row["completion_tokens"] == generated


def test_a_cancel_elsewhere_without_redis_is_a_409(tmp_path: Path, pg_url: str) -> None:
    env = {"TOKENWELL_DATABASE_URL": pg_url}
    with (
        Server(tmp_path / "a", SCRIPTED_CONFIG, env=env) as a,
        Server(tmp_path / "b", SCRIPTED_CONFIG, env=env) as b,
    ):
        started = a.client().responses.create(model="scripted-slow", input="go", background=True)
        with b.http() as http:
            reply = http.post(f"/v1/responses/{started.id}/cancel")
        assert reply.status_code == 409
        error = reply.json()["error"]
        assert error["code"] == "response_elsewhere" and "Redis" in error["message"]
        assert a.client().responses.cancel(started.id).status == "cancelled"


def test_a_background_response_ends_with_its_server(tmp_path: Path) -> None:
    server = Server(tmp_path / "s", SCRIPTED_CONFIG).start()
    try:
        raw = server.client().responses.with_raw_response.create(
            model="scripted-slow", input="go", background=True
        )
        started = raw.parse()
        time.sleep(0.3)
    finally:
        server.stop()
    again = Server(tmp_path / "s", SCRIPTED_CONFIG).start()
    try:
        ended = again.client().responses.retrieve(started.id)
        assert ended.status == "failed"
        assert ended.usage is not None and 0 < ended.usage.output_tokens < 400
        row = ledger_row(again, raw.headers["x-request-id"])
        assert row["status"] == "interrupted"
        assert row["completion_tokens"] == ended.usage.output_tokens
    finally:
        again.stop()


def test_through_the_upstream_gateway_usage_is_the_upstreams(tmp_path: Path) -> None:
    """An upstream that speaks chat completions serves /v1/responses; its usage is billed."""
    with Server(tmp_path / "up", SCRIPTED_CONFIG) as upstream:
        base = f'url = "{upstream.base}/v1", api_key = "sk-test-master"'
        config = gateway_config({"relay": f'[{{ {base}, model = "scripted" }}]'})
        with Server(tmp_path / "gw", config) as gateway:
            client = gateway.client()
            raw = client.responses.with_raw_response.create(
                model="relay",
                input=script(tool_calls=[{"name": "get_weather", "arguments": '{"city":"Rome"}'}]),
                tools=[WEATHER_TOOL],  # type: ignore[list-item]
            )
            called = raw.parse()
            (call,) = [i for i in called.output if i.type == "function_call"]
            assert call.name == "get_weather" and call.arguments == '{"city":"Rome"}'
            with client.responses.stream(
                model="relay", input=script(text="from the upstream")
            ) as stream:
                final = stream.get_final_response()
            assert final.output_text == "from the upstream"
            assert final.usage is not None and final.usage.output_tokens == 3
            row = ledger_row(gateway, raw.headers["x-request-id"])
            assert called.usage is not None
            assert row["prompt_tokens"] == called.usage.input_tokens
            assert row["completion_tokens"] == called.usage.output_tokens
            assert row["estimated"] in (False, 0)  # the upstream's own usage


def test_a_streams_last_bytes_do_not_wait_for_its_row(tmp_path: Path) -> None:
    """On SQLite a stored response's last bytes go out before its row commits
    (ResponseStore.commits_in_step): while another writer holds the database
    the stream still ends, and a retrieve sent right after it waits for the
    row instead of answering 404."""
    import sqlite3
    import threading

    with Server(tmp_path, SCRIPTED_CONFIG) as server:
        client = server.client()
        client.responses.create(model="scripted", input="warm")  # tables and connections
        locker = sqlite3.connect(
            server.data_dir / "tokenwell.db", isolation_level=None, check_same_thread=False
        )
        released = threading.Event()

        def release() -> None:
            time.sleep(1.0)
            locker.execute("COMMIT")
            released.set()

        try:
            events = []
            with client.responses.create(
                model="scripted", input=script(text="kept while locked", delay=0.1), stream=True
            ) as stream:
                for event in stream:
                    if not events:  # admitted (its ledger row is open): lock the database
                        locker.execute("BEGIN IMMEDIATE")
                    events.append(event)
            assert not released.is_set()  # the stream ended while the lock was held
            final = events[-1]
            assert final.type == "response.completed"
            threading.Thread(target=release, daemon=True).start()
            again = client.responses.retrieve(final.response.id)
            assert released.is_set()  # the retrieve waited for the row
            assert again.output_text == "kept while locked"
        finally:
            locker.close()
