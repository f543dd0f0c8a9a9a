"""The completions codec and request parsing, and an upstream's completions chunks
read as chat chunks: pure, no server."""

from __future__ import annotations

import orjson
import pytest

from tokenwell.engines.upstream.normalize import chat_chunk
from tokenwell.errors import InvalidRequest
from tokenwell.protocol.completions import CompletionsCodec, parse_completions_request
from tokenwell.protocol.events import Failed, Finish, Meter, TextDelta


def entry(token: str, logprob: float, *alts: tuple[str, float]) -> dict[str, object]:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in alts],
    }


def codec(n: int = 1, echo: list[str] | None = None, logprobs: bool = False) -> CompletionsCodec:
    return CompletionsCodec("m", "fp_x", n=n, echo=echo, logprobs=logprobs, include_usage=False)


def test_body_logprobs_in_the_completions_shape() -> None:
    c = codec(logprobs=True)
    c.add(TextDelta(0, "Hi", (entry("Hi", -0.1, ("Hi", -0.1), ("Yo", -2.0)),)))
    c.add(TextDelta(0, " there", (entry(" there", -0.5, (" there", -0.5)),)))
    c.add(Finish(0, "length"))
    body = c.body(Meter(3, 0, 2))
    [choice] = body["choices"]
    assert choice["text"] == "Hi there" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {
        "tokens": ["Hi", " there"],
        "token_logprobs": [-0.1, -0.5],
        "top_logprobs": [{"Hi": -0.1, "Yo": -2.0}, {" there": -0.5}],
        "text_offset": [0, 2],
    }
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")


def test_stream_chunks_echo_and_errors() -> None:
    c = codec(n=2, echo=["p", "p"])
    head = c.head(Meter())
    assert [orjson.loads(line[6:])["choices"][0]["text"] for line in head.split(b"\n\n")[:-1]] == [
        "p",
        "p",
    ]
    chunk = orjson.loads(c.render(TextDelta(1, "x"))[6:])
    assert chunk["choices"] == [{"text": "x", "index": 1, "logprobs": None, "finish_reason": None}]
    assert "usage" not in chunk
    assert c.render(TextDelta(0, "")) == b""
    failed = c.render(Failed("boom", "engine_error"))
    assert orjson.loads(failed[6:])["error"]["code"] == "engine_error"
    assert c.after_failure() == b"data: [DONE]\n\n"
    assert c.error("cut", "x").endswith(b"data: [DONE]\n\n")


def test_prompts_and_defaults() -> None:
    parsed = parse_completions_request(b'{"model": "m", "prompt": [[1, 2], [3]], "n": 2}')
    assert parsed.prompts == [(1, 2), (3,)] and parsed.n == 2
    assert {r.max_tokens for r in parsed.requests} == {16}
    assert {r.api for r in parsed.requests} == {"completions"}
    with pytest.raises(InvalidRequest) as info:
        parse_completions_request(b'{"model": "m", "prompt": "x", "max_tokens": 0}')
    assert info.value.param == "max_tokens"
    with pytest.raises(InvalidRequest) as info:
        parse_completions_request(b'{"model": "m", "prompt": [true]}')
    assert info.value.param == "prompt"


def test_an_upstream_completions_chunk_reads_as_a_chat_chunk() -> None:
    chunk = {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [
            {
                "index": 1,
                "text": "Hi",
                "finish_reason": None,
                "logprobs": {
                    "tokens": ["Hi"],
                    "token_logprobs": [-0.25],
                    "top_logprobs": [{"Hi": -0.25, "Yo": -3.0}],
                    "text_offset": [0],
                },
            }
        ],
        "usage": None,
    }
    [choice] = chat_chunk(chunk)["choices"]
    assert choice["index"] == 1 and choice["delta"] == {"content": "Hi"}
    assert choice["logprobs"]["content"] == [
        {
            "token": "Hi",
            "logprob": -0.25,
            "bytes": None,
            "top_logprobs": [
                {"token": "Hi", "logprob": -0.25, "bytes": None},
                {"token": "Yo", "logprob": -3.0, "bytes": None},
            ],
        }
    ]
    assert chat_chunk({"choices": [], "usage": {"prompt_tokens": 1}})["choices"] == []
