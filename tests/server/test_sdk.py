"""The official openai SDK against a real server on the real embedded model."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support import Server

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
COUNT = [{"role": "user", "content": "Count to five."}]


def test_sync_create(model_server: Server) -> None:
    done = model_server.client().chat.completions.create(
        model=MODEL, messages=COUNT, max_completion_tokens=16, temperature=0
    )
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.total_tokens == (
        done.usage.prompt_tokens + done.usage.completion_tokens
    )


def test_sync_stream_with_usage_matches_the_non_streamed_text(model_server: Server) -> None:
    client = model_server.client()
    args = dict(model=MODEL, messages=COUNT, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]


def test_async_stream(model_server: Server) -> None:
    async def go() -> tuple[str, str | None]:
        client = model_server.async_client()
        stream = await client.chat.completions.create(
            model=MODEL, messages=COUNT, max_tokens=12, stream=True
        )
        text, finish = "", None
        async for chunk in stream:
            assert chunk.usage is None
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        await client.close()
        return text, finish

    text, finish = asyncio.run(go())
    assert text and finish in ("stop", "length")


def test_stream_helper_final_completion(model_server: Server) -> None:
    client = model_server.client()
    # The helper refuses a "length" finish, so ask for something short.
    with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=300,
        temperature=0,
        stream_options={"include_usage": True},
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(deltas) == final.choices[0].message.content
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None and 0 < final.usage.completion_tokens < 300


def test_length_is_exactly_max_tokens(model_server: Server) -> None:
    done = model_server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long essay about the ocean."}],
        max_completion_tokens=20,
        temperature=0,
    )
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 20  # type: ignore[union-attr]


def test_same_seed_same_text(model_server: Server) -> None:
    client = model_server.client()
    args = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=30,
        seed=1234,
        temperature=1.0,
    )
    a = client.chat.completions.create(**args).choices[0].message.content  # type: ignore[call-overload]
    b = client.chat.completions.create(**args).choices[0].message.content  # type: ignore[call-overload]
    c = client.chat.completions.create(**{**args, "seed": 99}).choices[0].message.content  # type: ignore[call-overload]
    assert a == b
    assert a != c


def test_stop_sequence_is_not_in_the_output(model_server: Server) -> None:
    client = model_server.client()
    base = (
        client.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=40, temperature=0)
        .choices[0]
        .message.content
        or ""
    )
    assert len(base) > 6
    stop = base[3:6]  # a string the model will produce, likely across tokens
    cut = client.chat.completions.create(
        model=MODEL, messages=COUNT, max_tokens=40, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == base[: base.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_n_choices_and_logprobs(model_server: Server) -> None:
    done = model_server.client().chat.completions.create(
        model=MODEL,
        messages=COUNT,
        max_tokens=8,
        n=2,
        seed=7,
        logprobs=True,
        top_logprobs=3,
    )
    assert [c.index for c in done.choices] == [0, 1]
    assert (
        done.usage.completion_tokens
        == sum(  # type: ignore[union-attr]
            len(c.logprobs.content)
            for c in done.choices  # type: ignore[union-attr]
            if c.finish_reason == "length"
        )
        or done.usage.completion_tokens > 0
    )  # type: ignore[union-attr]
    for choice in done.choices:
        entries = choice.logprobs.content  # type: ignore[union-attr]
        assert entries and all(e.logprob <= 0 for e in entries)
        assert all(len(e.top_logprobs) == 3 for e in entries)
        assert "".join(e.token for e in entries) == choice.message.content


def test_multibyte_text_is_never_split(model_server: Server) -> None:
    stream = model_server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Translate to Chinese and Japanese: I love tea. 我"}],
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    text = "".join(pieces)
    assert any(ord(ch) > 0x2E80 for ch in text), text  # it did write CJK
    assert "\ufffd" not in text


def test_roles_and_text_parts(model_server: Server) -> None:
    done = model_server.client().chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
            },
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2+2?"},
        ],
        max_tokens=10,
        user="u-1",
        metadata={"purpose": "test"},
    )
    assert done.choices[0].message.content


def test_context_length_exceeded(model_server: Server) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        model_server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello " * 3000}]
        )
    assert info.value.code == "context_length_exceeded"


def test_disconnect_stops_generation_and_frees_the_slot(model_server: Server) -> None:
    def stats() -> dict:  # type: ignore[type-arg]
        return httpx.get(f"{model_server.base}/health").json()["models"][MODEL]  # type: ignore[no-any-return]

    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 1500,
        "messages": [{"role": "user", "content": "Write a very long story."}],
    }
    with model_server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
    # The client is gone: the slot frees within a step or so.
    deadline = time.monotonic() + 5
    while stats()["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats()["busy_slots"] == 0
    before = stats()["tokens_generated"]
    time.sleep(0.3)
    assert stats()["tokens_generated"] == before  # nothing keeps generating
    started = time.monotonic()
    model_server.client().chat.completions.create(model=MODEL, messages=COUNT, max_tokens=2)
    assert time.monotonic() - started < 5


def test_health_answers_while_a_long_generation_runs(model_server: Server) -> None:
    import threading

    def long() -> None:
        model_server.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a long story."}],
            max_tokens=400,
            temperature=0.8,
        )

    worker = threading.Thread(target=long)
    worker.start()
    time.sleep(0.3)
    slowest = 0.0
    for _ in range(10):
        t = time.monotonic()
        assert httpx.get(f"{model_server.base}/health").status_code == 200
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.05)
    worker.join()
    assert slowest < 0.5


def test_penalties_and_logit_bias_change_what_is_generated(model_server: Server) -> None:
    client = model_server.client()
    ask = COUNT  # greedy, its answer repeats itself ("I'm … I'm …")
    plain = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=40, temperature=0, logprobs=True
    )
    penalised = client.chat.completions.create(
        model=MODEL,
        messages=ask,
        max_tokens=40,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )
    assert penalised.choices[0].message.content != plain.choices[0].message.content
    # Ban the token greedy decoding picks first: it is never picked at all.
    first = plain.choices[0].logprobs.content[0]  # type: ignore[union-attr,index]
    banned = client.chat.completions.create(
        model=MODEL,
        messages=ask,
        max_tokens=40,
        temperature=0,
        logprobs=True,
        logit_bias={str(_token_id(first.bytes)): -100},
    )
    tokens = [e.token for e in banned.choices[0].logprobs.content]  # type: ignore[union-attr]
    assert tokens and first.token not in tokens


def _token_id(raw: list[int] | None) -> int:
    from tokenwell.engines.llamacpp.model import Model, builtin_model_path

    model = Model(builtin_model_path())
    try:
        ids = model.tokenize(bytes(raw or []).decode(), special=False)
    finally:
        model.free()
    assert len(ids) == 1
    return ids[0]
