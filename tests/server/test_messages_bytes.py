"""``/v1/messages`` on the wire, against a real server on the scripted engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import MASTER, Server, ledger_row
from tokenwell.protocol.sse import SSEDecoder


def script(**plan: object) -> str:
    return "!script " + orjson.dumps(plan).decode()


def post(
    server: Server, path: str = "/v1/messages", headers: dict[str, str] | None = None, **body: Any
) -> Any:
    body.setdefault("model", "scripted")
    body.setdefault("max_tokens", 64)
    body.setdefault("messages", [{"role": "user", "content": "Count to five."}])
    body = {k: v for k, v in body.items() if v is not None}
    with server.http(key=None) as http:
        sent = {"x-api-key": MASTER, "anthropic-version": "2023-06-01", **(headers or {})}
        return http.post(path, json=body, headers=sent)


def events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for e in SSEDecoder().feed(body):
        data = orjson.loads(e.data)
        assert e.event == data["type"], "the event name is its data's type"
        out.append((e.event, data))
    return out


def test_plain_message(scripted_server: Server) -> None:
    r = post(scripted_server)
    assert r.status_code == 200, r.text
    message = r.json()
    assert message["id"].startswith("msg_")
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "scripted"
    assert message["content"] == [{"type": "text", "text": "You said: Count to five."}]
    assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
    # "Count to five." is 3 word tokens + 4 framing + 2; the reply 5 tokens.
    assert message["usage"] == {
        "input_tokens": 9,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 5,
    }
    row = ledger_row(scripted_server, r.headers["x-request-id"])
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == ("completed", 9, 5)
    assert row["api"] == "messages"


def test_stream_order_names_and_usage(scripted_server: Server) -> None:
    r = post(scripted_server, stream=True)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    got = events(r.content)
    names = [name for name, _ in got if name != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    start = got[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 9
    text = "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta")
    assert text == "You said: Count to five."
    assert all(d["index"] == 0 for n, d in got if n.startswith("content_block"))
    delta = next(d for n, d in got if n == "message_delta")
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 5 and delta["usage"]["input_tokens"] == 9
    # Every frame is "event: <name>\ndata: <json>\n\n".
    for frame in r.content.split(b"\n\n")[:-1]:
        event, data = frame.split(b"\n")
        assert event.startswith(b"event: ") and data.startswith(b"data: ")


def test_stream_tool_use_blocks_and_partial_json(scripted_server: Server) -> None:
    plan = script(
        text="Let me look.",
        tool_calls=[
            {"name": "get_weather", "chunks": ['{"ci', 'ty": "Os', 'lo"}']},
            {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        ],
    )
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    r = post(
        scripted_server, stream=True, tools=tools, messages=[{"role": "user", "content": plan}]
    )
    got = [(n, d) for n, d in events(r.content) if n != "ping"]
    starts = [d for n, d in got if n == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "text"),
        (1, "tool_use"),
        (2, "tool_use"),
    ]
    assert starts[1]["content_block"]["id"].startswith("toolu_")
    assert starts[1]["content_block"]["input"] == {}
    stops = [d["index"] for n, d in got if n == "content_block_stop"]
    assert stops == [0, 1, 2]
    for index, expected in ((1, {"city": "Oslo"}), (2, {"city": "Rome"})):
        parts = [
            d["delta"]["partial_json"]
            for n, d in got
            if n == "content_block_delta" and d["index"] == index
        ]
        assert orjson.loads("".join(parts)) == expected
    # Each block's deltas come between its start and its stop.
    order = [(n, d.get("index")) for n, d in got if n.startswith("content_block")]
    for index in (0, 1, 2):
        at = [i for i, (_, idx) in enumerate(order) if idx == index]
        assert order[at[0]][0] == "content_block_start"
        assert order[at[-1]][0] == "content_block_stop"
        assert at == list(range(at[0], at[-1] + 1))
    delta = next(d for n, d in got if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"


def test_non_streamed_tool_use(scripted_server: Server) -> None:
    plan = script(tool_calls=[{"name": "get_weather", "arguments": '{"city": "Rome"}'}])
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    r = post(scripted_server, tools=tools, messages=[{"role": "user", "content": plan}])
    message = r.json()
    assert message["stop_reason"] == "tool_use"
    [block] = message["content"]
    assert block["type"] == "tool_use" and block["input"] == {"city": "Rome"}
    assert block["name"] == "get_weather" and block["id"].startswith("toolu_")


def test_max_tokens_is_clamped_and_reached(scripted_server: Server) -> None:
    r = post(scripted_server, model="scripted-64", max_tokens=128_000)
    assert r.status_code == 200, r.text
    assert r.json()["stop_reason"] == "end_turn"
    r = post(scripted_server, model="scripted-64", max_tokens=10)
    message = r.json()
    assert message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 10


def test_what_clients_send_is_accepted(scripted_server: Server) -> None:
    r = post(
        scripted_server,
        path="/v1/messages?beta=true",
        headers={"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "system", "content": "A reminder."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}],
            },
        ],
        thinking={"type": "adaptive"},
        context_management={"edits": []},
        output_config={"effort": "high"},
        metadata={"user_id": "user_abc"},
        temperature=1,
        top_k=40,
        max_tokens=32_000,
    )
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == "You said: Hi"


def test_bearer_auth_works_too(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        r = http.post(
            "/v1/messages",
            json={
                "model": "scripted",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("change", "status", "kind"),
    [
        ({"model": "nope"}, 404, "not_found_error"),
        ({"max_tokens": None}, 400, "invalid_request_error"),
        ({"bogus": 1}, 400, "invalid_request_error"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "base64"}}],
                    }
                ]
            },
            400,
            "invalid_request_error",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            400,
            "invalid_request_error",
        ),
    ],
)
def test_errors_in_anthropic_shape(
    scripted_server: Server, change: dict[str, Any], status: int, kind: str
) -> None:
    body: dict[str, Any] = {
        "model": "scripted",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
    }
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    with scripted_server.http(key=None) as http:
        r = http.post("/v1/messages", json=body, headers={"x-api-key": MASTER})
    assert r.status_code == status, r.text
    payload = r.json()
    assert set(payload) == {"type", "error"} and payload["type"] == "error"
    assert payload["error"]["type"] == kind
    assert set(payload["error"]) == {"type", "message"}


def test_image_is_refused_naming_the_field(scripted_server: Server) -> None:
    r = post(
        scripted_server,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image"}]}
        ],
    )
    assert r.status_code == 400
    assert "messages.[0].content.[1].type" in r.json()["error"]["message"]


def test_bad_key_is_an_authentication_error(scripted_server: Server) -> None:
    with scripted_server.http(key=None) as http:
        r = http.post(
            "/v1/messages",
            json={"model": "scripted", "max_tokens": 5, "messages": [], "stream": True},
            headers={"x-api-key": "sk-wrong"},
        )
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["type"] == "authentication_error"


def test_mid_stream_failure_is_an_error_event(scripted_server: Server) -> None:
    r = post(
        scripted_server,
        stream=True,
        messages=[{"role": "user", "content": script(text="a b c d e", fail_after=2)}],
    )
    got = events(r.content)
    assert got[0][0] == "message_start"
    name, data = got[-1]
    assert name == "error" and data["error"]["type"] == "api_error"
    assert "message_stop" not in [n for n, _ in got]


def test_count_tokens(scripted_server: Server) -> None:
    r = post(scripted_server, path="/v1/messages/count_tokens", max_tokens=None)
    assert r.status_code == 200, r.text
    assert r.json() == {"input_tokens": 9}


def test_chat_errors_keep_the_openai_shape(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert set(r.json()) == {"error"}


def test_aliases_reach_the_model_in_every_api(scripted_server: Server) -> None:
    r = post(scripted_server, model="claude-sonnet-4-5-20250929", max_tokens=3)
    assert r.status_code == 200, r.text
    message = r.json()
    assert message["model"] == "claude-sonnet-4-5-20250929"  # as asked
    assert message["usage"]["output_tokens"] == 3 and message["stop_reason"] == "max_tokens"
    row = ledger_row(scripted_server, r.headers["x-request-id"])
    assert row["model"] == "scripted-64"  # billed as the model
    with scripted_server.http() as http:
        chat = http.post(
            "/v1/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["model"] == "scripted-64"
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed["scripted-64"]["aliases"] == ["claude-sonnet-*", "gpt-4o-mini"]
        assert "aliases" not in listed["scripted"]
        assert http.get("/v1/models/gpt-4o-mini").json()["id"] == "scripted-64"


def test_ping_events_keep_a_waiting_stream_alive(tmp_path: Path) -> None:
    config = 'keepalive_seconds = 0.2\n[[models]]\nname = "scripted"\nengine = "scripted"\n'
    with Server(tmp_path, config) as server:
        r = post(
            server,
            stream=True,
            messages=[{"role": "user", "content": script(text="late", prefill_delay=0.9)}],
        )
    names = [name for name, _ in events(r.content)]
    assert names[0] == "message_start"
    first_block = names.index("content_block_start")
    assert names[1:first_block].count("ping") >= 3  # 0.9 s of waiting, a ping every 0.2 s
    assert names[-1] == "message_stop"
