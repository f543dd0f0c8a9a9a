"""Streams through a proxy that cuts connections at random points: nothing lost, billed once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.cutproxy import CuttingProxy
from tests.support import MASTER, SCRIPTED_CONFIG, Server
from tokenwell.client import AsyncResumingTransport, ChatAccumulator, Client, ResumingTransport

CONFIG = SCRIPTED_CONFIG + "\n[idempotency]\ngrace_seconds = 30\n"
WORDS = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "eta", "θeta", "iota", "kappa"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("cuts"), CONFIG) as s:
        yield s


def _prompt(rng: random.Random, i: int) -> str:
    return f"stream {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))


def _rows(server: Server, key_id: str) -> list[dict]:  # type: ignore[type-arg]
    with server.http() as http:
        return http.get("/admin/requests", params={"key_id": key_id, "limit": 1000}).json()[  # type: ignore[no-any-return]
            "data"
        ]


def _cut_streams(server: Server, streams: int, min_cuts: int, seed: int) -> None:
    key = server.create_key(name=f"cuts-{seed}")
    rng = random.Random(seed)
    prompts = [_prompt(rng, i) for i in range(streams)]
    texts: list[str] = []
    with CuttingProxy(server.port, seed=seed, cut_probability=0.75, max_offset=8000) as proxy:
        with Client(f"{proxy.base}/v1", key["key"], timeout=30) as client:
            client.transport.backoff = 0.005
            for prompt in prompts:
                stream = client.stream(
                    model="scripted", messages=[{"role": "user", "content": prompt}]
                )
                for _ in stream:
                    pass
                assert stream.complete, stream.error
                texts.append(stream.text())
                assert stream.accumulator.usage is not None
        cuts = proxy.cuts
    assert cuts >= min_cuts, f"only {cuts} cuts ({proxy.by_mode})"
    assert all(proxy.by_mode.values()), proxy.by_mode
    # The text each stream assembled is the uninterrupted text.
    assert texts == [f"You said: {p}" for p in prompts]
    # Billed once each: one ledger row per stream, completed, for the whole answer.
    rows = _rows(server, key["id"])
    assert len(rows) == streams
    assert {r["status"] for r in rows} == {"completed"}
    by_key = {r["idempotency_key"] for r in rows}
    assert len(by_key) == streams
    words = sorted(len(f"You said: {p}".split()) for p in prompts)
    assert sorted(r["completion_tokens"] for r in rows) == words


def test_cut_streams_assemble_the_whole_text_and_bill_once(server: Server) -> None:
    _cut_streams(server, streams=50, min_cuts=100, seed=1)


@pytest.mark.slow
def test_many_more_cut_streams(server: Server) -> None:
    _cut_streams(server, streams=300, min_cuts=600, seed=2)


def test_the_openai_sdk_with_the_transport_completes_every_request(server: Server) -> None:
    key = server.create_key(name="sdk-cuts")
    rng = random.Random(3)
    with CuttingProxy(server.port, seed=3, cut_probability=0.5, max_offset=6000) as proxy:
        transport = ResumingTransport(backoff=0.005)
        sdk = openai.OpenAI(
            base_url=f"{proxy.base}/v1",
            api_key=key["key"],
            max_retries=0,
            http_client=httpx.Client(transport=transport, timeout=30),
        )
        for i in range(24):
            prompt = _prompt(rng, i)
            messages = [{"role": "user", "content": prompt}]
            if i % 3 == 0:
                done = sdk.chat.completions.create(model="scripted", messages=messages)  # type: ignore[arg-type]
                assert done.choices[0].message.content == f"You said: {prompt}"
                continue
            acc = ChatAccumulator()
            for chunk in sdk.chat.completions.create(
                model="scripted",
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            ):
                acc.add(chunk)
            assert acc.text() == f"You said: {prompt}" and acc.finished
            assert acc.usage is not None
        assert proxy.cuts >= 10 and transport.resumes >= proxy.cuts // 2
    rows = _rows(server, key["id"])
    assert len(rows) == 24 and {r["status"] for r in rows} == {"completed"}


def test_the_async_sdk_with_the_async_transport_completes_every_request(server: Server) -> None:
    """AsyncOpenAI (as the OpenAI Agents SDK uses it) through AsyncResumingTransport,
    several requests at once through the cutting proxy."""
    key = server.create_key(name="async-sdk-cuts")
    rng = random.Random(5)
    prompts = [_prompt(rng, i) for i in range(24)]

    async def one(sdk: openai.AsyncOpenAI, i: int, prompt: str) -> None:
        messages = [{"role": "user", "content": prompt}]
        if i % 3 == 0:
            done = await sdk.chat.completions.create(model="scripted", messages=messages)  # type: ignore[arg-type]
            assert done.choices[0].message.content == f"You said: {prompt}"
            return
        acc = ChatAccumulator()
        stream = await sdk.chat.completions.create(
            model="scripted",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            acc.add(chunk)
        assert acc.text() == f"You said: {prompt}" and acc.finished
        assert acc.usage is not None

    async def run(proxy_base: str, transport: AsyncResumingTransport) -> None:
        async with httpx.AsyncClient(transport=transport, timeout=30) as http:
            sdk = openai.AsyncOpenAI(
                base_url=f"{proxy_base}/v1", api_key=key["key"], max_retries=0, http_client=http
            )
            for batch in range(0, len(prompts), 4):  # four at a time
                await asyncio.gather(*(one(sdk, i, prompts[i]) for i in range(batch, batch + 4)))

    with CuttingProxy(server.port, seed=5, cut_probability=0.5, max_offset=6000) as proxy:
        transport = AsyncResumingTransport(backoff=0.005)
        asyncio.run(run(proxy.base, transport))
        assert proxy.cuts >= 10 and transport.resumes >= proxy.cuts // 2
    rows = _rows(server, key["id"])
    assert len(rows) == 24 and {r["status"] for r in rows} == {"completed"}


def test_responses_through_the_transport_complete_every_request(server: Server) -> None:
    """The Responses API through the cutting proxy: streamed (raw events and the SDK's
    ``responses.stream`` helper) and not; every text whole, every request billed once."""
    key = server.create_key(name="responses-cuts")
    rng = random.Random(6)
    with CuttingProxy(server.port, seed=6, cut_probability=0.7, max_offset=6000) as proxy:
        transport = ResumingTransport(backoff=0.005)
        sdk = openai.OpenAI(
            base_url=f"{proxy.base}/v1",
            api_key=key["key"],
            max_retries=0,
            http_client=httpx.Client(transport=transport, timeout=30),
        )
        for i in range(24):
            prompt = _prompt(rng, i)
            if i % 3 == 0:
                done = sdk.responses.create(model="scripted", input=prompt)
                assert done.output_text == f"You said: {prompt}"
            elif i % 3 == 1:
                events = list(sdk.responses.create(model="scripted", input=prompt, stream=True))
                numbers = [e.sequence_number for e in events]
                assert numbers == list(range(len(events)))  # none lost, none repeated
                assert events[-1].type == "response.completed"
                text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
                assert text == f"You said: {prompt}"
            else:
                with sdk.responses.stream(model="scripted", input=prompt) as stream:
                    final = stream.get_final_response()
                assert final.output_text == f"You said: {prompt}" and final.usage is not None
        assert proxy.cuts >= 8 and transport.resumes >= proxy.cuts // 2
    rows = _rows(server, key["id"])
    assert len(rows) == 24 and {r["status"] for r in rows} == {"completed"}
    assert {r["api"] for r in rows} == {"responses"}


def test_without_the_transport_a_cut_stream_loses_text(server: Server) -> None:
    """The control: the same proxy breaks a plain SDK stream (so the tests above can fail)."""
    with CuttingProxy(server.port, seed=4, cut_probability=1.0, max_offset=3000) as proxy:
        sdk = openai.OpenAI(base_url=f"{proxy.base}/v1", api_key=MASTER, max_retries=0)
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for _ in sdk.chat.completions.create(
                model="scripted",
                messages=[{"role": "user", "content": "x " * 500}],
                stream=True,
            ):
                pass
