"""The wire, byte for byte, against a real server on the scripted engine."""

from __future__ import annotations

import orjson

from tests.support import Server, sse_events


def post(server: Server, **body: object) -> tuple[int, dict[str, str], bytes]:
    body.setdefault("model", "scripted")
    body.setdefault("messages", [{"role": "user", "content": "Count to five."}])
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
        return r.status_code, dict(r.headers), r.content


def test_stream_framing_order_and_fields(scripted_server: Server) -> None:
    status, headers, body = post(scripted_server, stream=True)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in headers
    assert headers["x-request-id"].startswith("req_")
    # Every event is exactly "data: <compact json>\n\n", ending in [DONE].
    assert body.endswith(b"data: [DONE]\n\n")
    for block in body.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ") and b"\n" not in block
    payloads = sse_events(body)
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({(c["created"], c["model"], c["system_fingerprint"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert all(list(d) == ["content"] for d in deltas)
    assert "".join(d["content"] for d in deltas) == "You said: Count to five."
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all("usage" not in c for c in chunks)  # not asked for: no key at all


def test_include_usage_adds_null_usage_and_a_final_usage_chunk(scripted_server: Server) -> None:
    _, _, body = post(scripted_server, stream=True, stream_options={"include_usage": True})
    chunks = [orjson.loads(p) for p in sse_events(body)[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    usage = last["usage"]
    # "You said: Count to five." is 5 word tokens; prompt: 3 words + 4 framing + 2.
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens"] == 9
    assert usage["total_tokens"] == 14
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_max_tokens_cuts_with_length_at_exactly_that_many(scripted_server: Server) -> None:
    _, _, body = post(
        scripted_server,
        model="scripted-64",
        stream=True,
        max_tokens=7,
        stream_options={"include_usage": True},
    )
    chunks = [orjson.loads(p) for p in sse_events(body)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "".join(f" w{i}" for i in range(7))
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 7


def test_stop_string_is_never_emitted(scripted_server: Server) -> None:
    _, _, body = post(scripted_server, model="scripted-64", stream=True, stop=[" w5", "zz"])
    chunks = [orjson.loads(p) for p in sse_events(body)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == " w0 w1 w2 w3 w4"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_n_choices_each_have_index_role_and_finish(scripted_server: Server) -> None:
    _, _, body = post(scripted_server, stream=True, n=3, stream_options={"include_usage": True})
    chunks = [orjson.loads(p) for p in sse_events(body)[:-1]]
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 15  # every choice is billed


def test_tool_call_fragments_stream_in_order(scripted_server: Server) -> None:
    script = {
        "tool_calls": [
            {"name": "get_weather", "chunks": ['{"city"', ': "Paris"}']},
            {"name": "get_time", "arguments": "{}"},
        ]
    }
    _, _, body = post(
        scripted_server,
        stream=True,
        messages=[{"role": "user", "content": "!script " + orjson.dumps(script).decode()}],
    )
    chunks = [orjson.loads(p) for p in sse_events(body)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {
        "index": 0,
        "id": "call_0_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert calls[1] == {"index": 0, "function": {"arguments": '{"city"'}}
    assert calls[2] == {"index": 0, "function": {"arguments": ': "Paris"}'}}
    assert calls[3]["index"] == 1 and calls[3]["function"]["name"] == "get_time"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_error_after_the_stream_began_is_an_error_event_then_done(scripted_server: Server) -> None:
    script = {"text": "a b c d e", "fail_after": 2}
    status, _, body = post(
        scripted_server,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "!script " + orjson.dumps(script).decode()}],
    )
    assert status == 200
    payloads = sse_events(body)
    assert payloads[-1] == "[DONE]"
    error = orjson.loads(payloads[-2])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}


def test_non_streaming_completion(scripted_server: Server) -> None:
    status, headers, body = post(scripted_server, n=2)
    assert status == 200 and headers["content-type"] == "application/json"
    data = orjson.loads(body)
    assert data["object"] == "chat.completion"
    assert [c["message"]["content"] for c in data["choices"]] == ["You said: Count to five."] * 2
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 10


def test_keep_alive_comments_while_the_prompt_is_processed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.support import SCRIPTED_CONFIG

    with Server(tmp_path, "keepalive_seconds = 0.1\n" + SCRIPTED_CONFIG) as server:
        script = {"text": "late", "prefill_delay": 0.5}
        _, _, body = post(
            server,
            stream=True,
            messages=[{"role": "user", "content": "!script " + orjson.dumps(script).decode()}],
        )
    assert body.count(b": keep-alive\n\n") >= 3
    assert body.index(b": keep-alive") < body.index(b"data: ")
