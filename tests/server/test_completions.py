"""``POST /v1/completions`` through the openai SDK and on the wire, on the scripted engine."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest

from tests.support import MASTER, Server, ledger_row, sse_events


def test_plain_completion_and_ledger_row(scripted_server: Server) -> None:
    raw = scripted_server.client().completions.with_raw_response.create(
        model="scripted", prompt="Hello there friend"
    )
    done = raw.parse()
    assert done.object == "text_completion"
    assert done.id.startswith("cmpl-")
    assert done.model == "scripted"
    [choice] = done.choices
    # The scripted engine echoes a raw prompt as it is: no chat template around it.
    assert choice.text == "You said: Hello there friend"
    assert choice.finish_reason == "stop" and choice.index == 0 and choice.logprobs is None
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 5)
    row = ledger_row(scripted_server, raw.headers["x-request-id"])
    assert row["api"] == "completions"
    assert row["status"] == "completed"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 5)


def test_default_max_tokens_is_16(scripted_server: Server) -> None:
    done = scripted_server.client().completions.create(model="scripted-64", prompt="Go")
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 16


def test_prompts_times_n_echo_and_stop(scripted_server: Server) -> None:
    client = scripted_server.client()
    done = client.completions.create(
        model="scripted", prompt=["a b", "c d e"], n=2, echo=True, max_tokens=50
    )
    # Choice i*n + j is sample j of prompt i, as OpenAI indexes them.
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert [c.text for c in done.choices] == [
        "a bYou said: a b",
        "a bYou said: a b",
        "c d eYou said: c d e",
        "c d eYou said: c d e",
    ]
    assert done.usage is not None
    assert done.usage.prompt_tokens == 2 + 3  # each prompt once, whatever n
    assert done.usage.completion_tokens == 2 * 4 + 2 * 5
    stopped = client.completions.create(model="scripted", prompt="x y z", stop=[" y"])
    assert stopped.choices[0].text == "You said: x"
    assert stopped.choices[0].finish_reason == "stop"


def test_token_id_prompts(scripted_server: Server) -> None:
    client = scripted_server.client()
    one = client.completions.create(model="scripted", prompt=[1, 2, 3, 4])
    assert one.usage is not None and one.usage.prompt_tokens == 4
    many = client.completions.create(model="scripted", prompt=[[1, 2], [3, 4, 5]])
    assert len(many.choices) == 2
    assert many.usage is not None and many.usage.prompt_tokens == 5


def test_stream_with_usage(scripted_server: Server) -> None:
    chunks = list(
        scripted_server.client().completions.create(
            model="scripted",
            prompt="one two",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.object for c in chunks} == {"text_completion"}
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "You said: one two"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 2 + 4
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_bytes(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        r = http.post(
            "/v1/completions",
            json={"model": "scripted", "prompt": "hi", "stream": True, "echo": True},
        )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    body = r.content
    assert body.endswith(b"data: [DONE]\n\n")
    for block in body.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ") and b"\n" not in block
    payloads = sse_events(body)
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"] == [
        {"text": "hi", "index": 0, "logprobs": None, "finish_reason": None}
    ]
    assert list(chunks[0]) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert chunks[-1]["choices"][0] == {
        "text": "",
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hiYou said: hi"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "scripted"}, "prompt"),
        ({"model": "scripted", "prompt": {"a": 1}}, "prompt"),
        ({"model": "scripted", "prompt": []}, "prompt"),
        ({"model": "scripted", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "scripted", "prompt": [1, 2], "echo": True}, "echo"),
        ({"model": "scripted", "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": "scripted", "prompt": "x", "stream_options": {}}, "stream_options"),
        ({"model": "scripted", "prompt": "x", "messages": []}, "messages"),
    ],
)
def test_bad_requests(scripted_server: Server, body: dict[str, object], param: str) -> None:
    with scripted_server.http() as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_sdk_errors(scripted_server: Server) -> None:
    client = scripted_server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        scripted_server.client(key="sk-wrong").completions.create(model="scripted", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="scripted-tiny", prompt="x", max_tokens=500)
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert info.value.body["param"] == "prompt"  # type: ignore[index]


def test_openapi_describes_completions(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        doc = http.get("/openapi.json").json()
    op = doc["paths"]["/v1/completions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CompletionRequest"
    )
    schema = doc["components"]["schemas"]["CompletionRequest"]
    assert {"prompt", "max_tokens", "echo", "suffix", "logprobs"} <= set(schema["properties"])
    assert len(schema["properties"]["prompt"]["anyOf"]) == 4


def test_through_an_upstream_gateway(scripted_server: Server, tmp_path: Path) -> None:
    """An upstream model gets /v1/completions as it came (suffix too), one prompt per
    upstream request; the upstream's usage is what the gateway bills."""
    config = (
        '[[models]]\nname = "relay"\nengine = "upstream"\n'
        f'urls = ["{scripted_server.base}/v1"]\nmodel = "scripted"\napi_key = "{MASTER}"\n'
        "price = { prompt = 1.0, completion = 2.0 }\n"
    )
    with Server(tmp_path, config) as gateway:
        client = gateway.client()
        raw = client.completions.with_raw_response.create(
            model="relay", prompt=["a b", "c d e"], n=2, echo=True, max_tokens=50
        )
        done = raw.parse()
        assert [c.text for c in done.choices] == [
            "a bYou said: a b",
            "a bYou said: a b",
            "c d eYou said: c d e",
            "c d eYou said: c d e",
        ]
        assert done.usage is not None
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 18)
        row = ledger_row(gateway, raw.headers["x-request-id"])
        assert row["api"] == "completions" and row["estimated"] is False
        assert (row["prompt_tokens"], row["completion_tokens"]) == (5, 18)
        streamed = client.completions.create(
            model="relay", prompt="one two", stream=True, stream_options={"include_usage": True}
        )
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "You said: one two"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        # The suffix goes to the upstream, which answers for it (the scripted one refuses).
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="relay", prompt="x", suffix="y")
        assert "suffix" in str(info.value)


def test_a_client_that_leaves_a_multi_prompt_stream_is_billed_what_was_made(
    scripted_server: Server,
) -> None:
    with (
        scripted_server.http() as http,
        http.stream(
            "POST",
            "/v1/completions",
            json={
                "model": "scripted-slow",
                "prompt": ["a", "b c"],
                "max_tokens": 400,
                "stream": True,
            },
        ) as r,
    ):
        request_id = r.headers["x-request-id"]
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    row = ledger_row(scripted_server, request_id)
    assert row["status"] == "client_disconnected"
    assert row["prompt_tokens"] == 1 + 2
    assert 0 < row["completion_tokens"] < 2 * 400
