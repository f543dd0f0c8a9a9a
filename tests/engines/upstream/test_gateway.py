"""tokenwell in front of real upstreams: another tokenwell, and fault-injecting ones."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.support import (
    MASTER,
    SCRIPTED_CONFIG,
    FakeUpstream,
    Server,
    gateway_config,
    ledger_row,
    sse_events,
)


@pytest.fixture(scope="module")
def upstream_tokenwell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second tokenwell (scripted engine) as a real OpenAI-compatible upstream."""
    with Server(tmp_path_factory.mktemp("up"), SCRIPTED_CONFIG) as server:
        yield server


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    upstream = FakeUpstream(tmp_path_factory.mktemp("fake"))
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream_tokenwell: Server, fake: FakeUpstream
) -> Iterator[Server]:
    base = f'url = "{upstream_tokenwell.base}/v1", api_key = "sk-test-master"'
    up = f'[{{ {base}, model = "scripted" }}]'
    up64 = f'[{{ {base}, model = "scripted-64" }}]'
    fakes = {
        f"fake-{mode}": f'[{{ url = "{fake.url}", model = "{mode}" }}]'
        for mode in (
            "ok",
            "nousage",
            "tools",
            "die",
            "hang",
            "error500",
            "error429",
            "error400",
            "malformed",
            "slow",
        )
    }
    config = gateway_config({"relay": up, "relay-64": up64, **fakes}, idle_timeout=1.5)
    with Server(tmp_path_factory.mktemp("gw"), config) as server:
        yield server


def stream(server: Server, model: str, **body: object) -> tuple[httpx.Response, list[str]]:
    with server.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "stream": True,
                "messages": [{"role": "user", "content": "hello there"}],
                **body,
            },
        )
    return r, sse_events(r.content) if r.status_code == 200 else []


def test_the_sdk_through_the_gateway_gets_the_upstreams_usage(
    gateway: Server, upstream_tokenwell: Server
) -> None:
    client = gateway.client()
    chunks = list(
        client.chat.completions.create(
            model="relay-64",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=20,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f" w{i}" for i in range(20))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 20
    done = client.chat.completions.create(
        model="relay", messages=[{"role": "user", "content": "yo"}]
    )
    assert done.choices[0].message.content == "You said: yo"
    assert done.usage is not None and done.usage.completion_tokens == 3


def test_usage_is_billed_exactly_when_the_client_asked_for_none(gateway: Server) -> None:
    r, events = stream(gateway, "relay-64", max_tokens=9)
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # stripped: the client did not ask
    row = ledger_row(gateway, r.headers["x-request-id"])
    assert row["status"] == "length" and row["completion_tokens"] == 9
    assert row["estimated"] is False  # the upstream's own count


def test_an_upstream_without_usage_is_estimated_and_says_so(gateway: Server) -> None:
    r, events = stream(gateway, "fake-nousage", stream_options={"include_usage": True})
    usage = orjson.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 10  # one per fragment: no tokenizer configured
    row = ledger_row(gateway, r.headers["x-request-id"])
    assert row["estimated"] is True and row["status"] == "completed"


def test_tool_calls_pass_through_normalised(gateway: Server) -> None:
    _, events = stream(
        gateway,
        "fake-tools",
        tools=[
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": {"type": "object"}},
            }
        ],
    )
    chunks = [orjson.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {
        "index": 0,
        "id": "call_x",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(set(c) == {"index", "function"} for c in calls[1:])  # id/name sent once
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Oslo"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_finish_reasons_are_normalised(gateway: Server) -> None:
    _, events = stream(gateway, "fake-ok")
    assert orjson.loads(events[-2])["choices"][0]["finish_reason"] == "stop"  # upstream said "eos"


def test_an_upstream_that_dies_mid_stream(gateway: Server) -> None:
    r, events = stream(gateway, "fake-die")
    assert r.status_code == 200 and events[-1] == "[DONE]"
    error = orjson.loads(events[-2])
    assert set(error) == {"error"}
    row = ledger_row(gateway, r.headers["x-request-id"])
    assert row["status"] == "upstream_error"
    assert row["completion_tokens"] == 5  # what was delivered before it died


def test_an_upstream_that_hangs_times_out(gateway: Server) -> None:
    started = time.monotonic()
    r, events = stream(gateway, "fake-hang")
    assert 1.4 < time.monotonic() - started < 10
    assert "error" in orjson.loads(events[-2]) and events[-1] == "[DONE]"
    assert ledger_row(gateway, r.headers["x-request-id"])["status"] == "upstream_error"


def test_malformed_sse_is_an_error_event(gateway: Server) -> None:
    r, events = stream(gateway, "fake-malformed")
    assert "malformed" in orjson.loads(events[-2])["error"]["message"]
    assert ledger_row(gateway, r.headers["x-request-id"])["status"] == "upstream_error"


def test_errors_before_the_first_byte_are_http_errors(gateway: Server) -> None:
    r, _ = stream(gateway, "fake-error500")
    assert r.status_code in (502, 503) and r.json()["error"]["type"] == "server_error"
    r, _ = stream(gateway, "fake-error429")
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_exceeded"
    r, _ = stream(gateway, "fake-error400")
    assert r.status_code == 400 and "bad prompt" in r.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        gateway.client().chat.completions.create(
            model="fake-error429", messages=[{"role": "user", "content": "x"}]
        )


def test_a_client_disconnect_cancels_the_upstream_request(
    gateway: Server, fake: FakeUpstream
) -> None:
    before = fake.stats()["cancelled"]
    with (
        gateway.http() as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "fake-slow",
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            },
        ) as r,
    ):
        rid = r.headers["x-request-id"]
        for i, _ in enumerate(r.iter_lines()):
            if i > 10:
                break
    deadline = time.monotonic() + 5
    while fake.stats()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.stats()["cancelled"] == before + 1
    row = ledger_row(gateway, rid)
    assert row["status"] == "client_disconnected" and 0 < row["completion_tokens"] < 400


def test_failover_balancing_and_health(tmp_path: Path) -> None:
    good = FakeUpstream(tmp_path)
    bad = FakeUpstream(tmp_path)
    try:
        urls = f'[{{ url = "{good.url}", model = "ok" }}, {{ url = "{bad.url}", model = "ok" }}]'
        config = gateway_config({"pair": urls}, health_interval=0.5)
        with Server(tmp_path / "gw", config) as gw, gw.http() as http:
            body = {"model": "pair", "messages": [{"role": "user", "content": "x"}]}
            for _ in range(6):
                assert http.post("/v1/chat/completions", json=body).status_code == 200
            # Both replicas served: requests were balanced.
            assert good.stats()["requests"] > 0 and bad.stats()["requests"] > 0
            bad.stop()  # a replica dies: requests still succeed, retried on the other
            for _ in range(6):
                assert http.post("/v1/chat/completions", json=body).status_code == 200
            health = http.get("/health").json()["models"]["pair"]["upstreams"]
            assert [u["healthy"] for u in health] == [True, False]
            # It comes back when it answers its health checks again.
            revived = FakeUpstream(tmp_path, port=bad.port)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                ups = http.get("/health").json()["models"]["pair"]["upstreams"]
                if all(u["healthy"] for u in ups):
                    break
                time.sleep(0.1)
            assert all(u["healthy"] for u in ups)
            revived.stop()
    finally:
        good.stop()
        bad.stop()


@pytest.mark.slow
def test_llama_cpp_server_as_upstream_is_estimated_with_a_tokenizer(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support import free_port
    from tokenwell.engines.llamacpp.model import builtin_model_path

    gguf = builtin_model_path()
    port = free_port()
    log = (tmp_path / "llama_cpp_server.log").open("wb")
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--model_alias",
            "smol",
            # By default llama_cpp.server cuts a running stream short when another
            # request arrives, the gateway's health probe of /v1/models included: on a
            # busy machine the stream lasts long enough to meet one.
            "--interrupt_requests",
            "False",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        config = gateway_config(
            {"smol-upstream": f'[{{ url = "http://127.0.0.1:{port}/v1", model = "smol" }}]'},
            tokenizer=f'"{gguf}"',
        )
        with Server(tmp_path / "gw", config) as gw:
            chunks = list(
                gw.client().chat.completions.create(
                    model="smol-upstream",
                    messages=[{"role": "user", "content": "Count to five."}],
                    max_tokens=12,
                    stream=True,
                    stream_options={"include_usage": True},
                    temperature=0,
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text and chunks[-2].choices[0].finish_reason in ("stop", "length")
            usage = chunks[-1].usage
            assert usage is not None and 0 < usage.completion_tokens <= 12
            # llama_cpp.server reports no usage: counted with the tokenizer, and flagged.
            with gw.http() as http:
                rows = http.get("/admin/requests").json()["data"]
            assert rows[0]["estimated"] is True
            assert rows[0]["completion_tokens"] == usage.completion_tokens
    finally:
        upstream.kill()
        upstream.wait(10)
        log.close()


@pytest.mark.slow
def test_a_tokenwell_on_the_real_model_as_upstream(tmp_path: Path, model_server: Server) -> None:
    urls = f'[{{ url = "{model_server.base}/v1", api_key = "sk-test-master" }}]'
    config = gateway_config({"SmolLM2-135M-Instruct": urls})
    with Server(tmp_path, config) as gw:
        client = gw.client()
        done = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=10,
            temperature=0,
            seed=1,
        )
        direct = model_server.client().chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=10,
            temperature=0,
            seed=1,
        )
        assert done.choices[0].message.content == direct.choices[0].message.content
        assert done.usage is not None and direct.usage is not None
        assert done.usage.completion_tokens == direct.usage.completion_tokens
        assert done.usage.prompt_tokens == direct.usage.prompt_tokens


def test_messages_through_the_gateway(gateway: Server) -> None:
    """/v1/messages in front of an upstream: sent as chat completions, usage exact."""
    headers = {"x-api-key": MASTER, "anthropic-version": "2023-06-01"}
    ask = {"model": "relay-64", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}
    with gateway.http(key=None) as http:
        r = http.post("/v1/messages", json=ask, headers=headers)
        assert r.status_code == 200, r.text
        message = r.json()
        assert message["content"] == [{"type": "text", "text": "".join(f" w{i}" for i in range(9))}]
        assert message["stop_reason"] == "max_tokens"
        assert message["usage"]["output_tokens"] == 9
        row = ledger_row(gateway, r.headers["x-request-id"])
        assert (row["api"], row["completion_tokens"], row["estimated"]) == ("messages", 9, False)
        streamed = http.post(
            "/v1/messages",
            json={
                "model": "fake-tools",
                "max_tokens": 100,
                "stream": True,
                "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
                "messages": [{"role": "user", "content": "weather?"}],
            },
            headers=headers,
        )
    frames = [
        orjson.loads(line[6:]) for line in streamed.content.split(b"\n") if line[:6] == b"data: "
    ]
    kinds = [f["type"] for f in frames if f["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    partial = "".join(
        f["delta"]["partial_json"]
        for f in frames
        if f["type"] == "content_block_delta" and f["delta"]["type"] == "input_json_delta"
    )
    assert orjson.loads(partial) == {"city": "Oslo"}
    delta = next(f for f in frames if f["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"


def test_a_sessions_requests_go_to_one_replica(tmp_path: Path) -> None:
    """A placement hint (prompt_cache_key, else the end user) keeps a session on
    the replica that holds its prompt cache; the hint is passed on upstream."""
    one, two = FakeUpstream(tmp_path), FakeUpstream(tmp_path)
    try:
        urls = f'[{{ url = "{one.url}", model = "ok" }}, {{ url = "{two.url}", model = "ok" }}]'
        with Server(tmp_path / "gw", gateway_config({"pair": urls})) as gw:
            client = gw.client()
            # Which replica a session's hash picks depends on the replicas' URLs
            # (random ports): with 24 sessions, all on one has odds of 2**-23.
            sessions = [f"session-{i}" for i in range(24)]
            turns = 3
            for turn in range(turns):
                for key in sessions:
                    client.chat.completions.create(
                        model="pair",
                        messages=[{"role": "user", "content": f"turn {turn}"}],
                        prompt_cache_key=key,
                    )
            client.responses.create(model="pair", input="hi", prompt_cache_key="session-0")
            seen = [one.stats()["cache_keys"], two.stats()["cache_keys"]]
            for key in sessions:
                counts = [replica.get(key, 0) for replica in seen]
                assert sorted(counts) == [0, turns + (key == "session-0")], (key, seen)
            # The sessions are spread over both replicas, not all on one.
            assert seen[0] and seen[1]
            # An end user is the hint when there is no prompt_cache_key.
            served = []
            for _ in range(4):
                a, b = one.stats()["requests"], two.stats()["requests"]
                client.chat.completions.create(
                    model="pair", messages=[{"role": "user", "content": "x"}], user="alice"
                )
                served.append((one.stats()["requests"] - a, two.stats()["requests"] - b))
            assert len(set(served)) == 1, served
    finally:
        one.stop()
        two.stop()
