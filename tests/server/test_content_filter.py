"""The operator's content policy, on input and on streamed output."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.support import SCRIPTED_CONFIG, Server, ledger_row, model_config, sse_events

POLICY = """
[content_filter]
terms = ["forbidden"]
patterns = ['\\d{3}-\\d{2}-\\d{4}']
classifier = "tests.fakes.classifier:flags"
window = 16
"""


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("filtered"), POLICY + SCRIPTED_CONFIG) as server:
        yield server


def script(tokens: list[str], **extra: object) -> list[dict[str, str]]:
    body = orjson.dumps({"tokens": tokens, **extra}).decode()
    return [{"role": "user", "content": "!script " + body}]


def run(server: Server, messages: list[dict[str, str]], **body: object) -> tuple[str, str, str]:
    with server.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": "scripted",
                "stream": True,
                "messages": messages,
                **body,
            },
        )
    chunks = [orjson.loads(p) for p in sse_events(r.content)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    return text, finish, r.headers["x-request-id"]


def test_a_term_split_across_tokens_is_never_sent(filtered: Server) -> None:
    tokens = ["Hello", " there,", " this", " is", " for", "bidden", " text", " after", " it"]
    text, finish, rid = run(filtered, script(tokens))
    assert (text, finish) == ("Hello there, this is ", "content_filter")
    ledger = ledger_row(filtered, rid)
    assert ledger["status"] == "content_filter"
    assert 6 <= ledger["completion_tokens"] <= len(tokens)  # generated is billed


def test_a_pattern_and_the_classifier_end_the_choice(filtered: Server) -> None:
    text, finish, _ = run(filtered, script(["My", " number", " is", " 123", "-45", "-6789", "."]))
    assert finish == "content_filter" and "123" not in text and text.startswith("My number is")
    text, finish, _ = run(filtered, script(["All", " is", " calm", " BO", "OM", " loud"]))
    assert (text, finish) == ("", "content_filter")  # nothing held back was sent


def test_clean_text_passes_whole(filtered: Server) -> None:
    text, finish, _ = run(filtered, script(["A", " perfectly", " fine", " answer", "."]))
    assert (text, finish) == ("A perfectly fine answer.", "stop")


def test_non_streaming_and_several_choices(filtered: Server) -> None:
    with filtered.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": "scripted",
                "n": 2,
                "messages": script(["ok", " forb", "idden", " x"]),
            },
        )
    data = r.json()
    assert [c["finish_reason"] for c in data["choices"]] == ["content_filter"] * 2
    assert [c["message"]["content"] for c in data["choices"]] == ["ok "] * 2


def test_tool_calls_pass_and_the_input_is_checked(filtered: Server) -> None:
    _, finish, _ = run(filtered, script([], tool_calls=[{"name": "f", "arguments": "{}"}]))
    assert finish == "tool_calls"
    with filtered.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": "scripted",
                "messages": [{"role": "user", "content": "say FORBIDDEN"}],
            },
        )
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("content_policy_violation", "messages.[0].content")


@pytest.mark.slow
def test_the_real_model_is_stopped_and_billed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = '[content_filter]\nterms = [" the "]\ninput = false\n' + model_config(parallel=2)
    with Server(tmp_path, config) as server:
        model = "SmolLM2-135M-Instruct"

        def generated() -> int:
            stats = httpx.get(f"{server.base}/health").json()["models"][model]
            return int(stats["tokens_generated"])

        before = generated()
        with server.http() as http:
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "stream": True,
                    "max_tokens": 400,
                    "seed": 1,
                    "messages": [
                        {"role": "user", "content": "Tell me a long story about the sea."}
                    ],
                },
            )
        chunks = [orjson.loads(p) for p in sse_events(r.content)[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert " the " not in text.lower()
        ledger = ledger_row(server, r.headers["x-request-id"])
        assert ledger["status"] == "content_filter"
        time.sleep(0.2)
        assert ledger["completion_tokens"] == generated() - before < 400
