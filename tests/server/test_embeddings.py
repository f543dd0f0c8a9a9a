"""``POST /v1/embeddings`` through the openai SDK, on the scripted engine (hashed bags
of words: deterministic, 64 dimensions) and, marked slow, on the real embedded model."""

from __future__ import annotations

import base64
import math
import struct
from pathlib import Path

import openai
import pytest

from tests.support import MASTER, Server, ledger_row, model_config

MODEL = "SmolLM2-135M-Instruct"


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_one_input_and_ledger_row(scripted_server: Server) -> None:
    raw = scripted_server.client().embeddings.with_raw_response.create(
        model="scripted", input="the cat sat"
    )
    done = raw.parse()
    assert done.object == "list" and done.model == "scripted"
    [item] = done.data
    assert item.object == "embedding" and item.index == 0
    assert len(item.embedding) == 64
    assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, rel_tol=1e-6)
    assert (done.usage.prompt_tokens, done.usage.total_tokens) == (3, 3)
    row = ledger_row(scripted_server, raw.headers["x-request-id"])
    assert row["api"] == "embeddings" and row["status"] == "completed"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 0)
    assert row["cost_usd"] == "0.000003"  # no embedding price: the prompt price, $1/M


def test_many_inputs_token_ids_and_base64(scripted_server: Server) -> None:
    client = scripted_server.client()
    texts = ["a b", "c d e", "a b"]
    floats = client.embeddings.create(model="scripted", input=texts)
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.data[0].embedding == floats.data[2].embedding
    assert floats.usage.prompt_tokens == 7
    # The SDK asks for base64 by default when none is given and decodes it; ask for it
    # explicitly over HTTP to see the string.
    with scripted_server.http() as http:
        body = http.post(
            "/v1/embeddings",
            json={"model": "scripted", "input": texts, "encoding_format": "base64"},
        ).json()
    for item, expected in zip(body["data"], floats.data, strict=True):
        raw = base64.b64decode(item["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert decoded == pytest.approx(expected.embedding, abs=1e-7)
    ids = client.embeddings.create(model="scripted", input=[[1, 2, 3], [4]])
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 4
    one = client.embeddings.create(model="scripted", input=[5, 6])
    assert len(one.data) == 1 and one.usage.prompt_tokens == 2


def test_dimensions(scripted_server: Server) -> None:
    client = scripted_server.client()
    same = client.embeddings.create(model="scripted", input="x", dimensions=64)
    assert len(same.data[0].embedding) == 64
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="scripted", input="x", dimensions=8)
    assert info.value.body["param"] == "dimensions"  # type: ignore[index]
    assert "64" in info.value.body["message"]  # type: ignore[index]


def test_embedding_price_and_truncation(tmp_path: Path) -> None:
    config = (
        '[[models]]\nname = "emb"\nengine = "scripted"\nembedding_truncate = true\n'
        "price = { prompt = 1.0, completion = 2.0, embedding = 0.5 }\n"
    )
    with Server(tmp_path, config) as server:
        raw = server.client().embeddings.with_raw_response.create(
            model="emb", input=["one two three four"], dimensions=16
        )
        vector = raw.parse().data[0].embedding
        assert len(vector) == 16
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-6)
        row = ledger_row(server, raw.headers["x-request-id"])
        assert row["cost_usd"] == "0.000002"  # 4 tokens at $0.50 per million


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "scripted"}, "input"),
        ({"model": "scripted", "input": ""}, "input"),
        ({"model": "scripted", "input": ["a", ""]}, "input.[1]"),
        ({"model": "scripted", "input": []}, "input"),
        ({"model": "scripted", "input": [[1], "a"]}, "input"),
        ({"model": "scripted", "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "scripted", "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": "scripted", "input": "a", "extra": 1}, "extra"),
    ],
)
def test_bad_requests(scripted_server: Server, body: dict[str, object], param: str) -> None:
    with scripted_server.http() as http:
        r = http.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_sdk_errors(scripted_server: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        scripted_server.client().embeddings.create(model="nope", input="x")
    with pytest.raises(openai.AuthenticationError):
        scripted_server.client(key="sk-wrong").embeddings.create(model="scripted", input="x")


@pytest.mark.slow
def test_real_model_embeddings(tmp_path: Path) -> None:
    """Same text, same vector across calls and batch sizes; a paraphrase ranks above
    an unrelated sentence."""
    with Server(tmp_path, model_config(parallel=2)) as server:
        client = server.client()
        texts = [
            "The cat sat on the mat.",
            "A cat was sitting on the rug.",
            "Stock markets fell sharply today.",
        ]
        batch = [d.embedding for d in client.embeddings.create(model=MODEL, input=texts).data]
        alone = client.embeddings.create(model=MODEL, input=texts[0]).data[0].embedding
        again = client.embeddings.create(model=MODEL, input=texts[0]).data[0].embedding
        assert len(alone) == 576
        assert math.isclose(math.sqrt(sum(x * x for x in alone)), 1.0, rel_tol=1e-5)
        assert alone == pytest.approx(again, abs=1e-6)
        assert alone == pytest.approx(batch[0], abs=1e-4)
        assert cosine(batch[0], batch[1]) > cosine(batch[0], batch[2])
        # While a chat stream runs, embeddings are computed between its steps.
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell a story."}],
            max_tokens=40,
            stream=True,
        )
        first = next(iter(stream))
        during = client.embeddings.create(model=MODEL, input=texts[0]).data[0].embedding
        assert during == pytest.approx(alone, abs=1e-4)
        assert first.id and sum(1 for _ in stream) > 0


def test_openapi_describes_embeddings(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        doc = http.get("/openapi.json").json()
    assert "/v1/embeddings" in doc["paths"]
    schema = doc["components"]["schemas"]["EmbeddingRequest"]
    assert {"model", "input", "encoding_format", "dimensions"} <= set(schema["properties"])
    assert len(schema["properties"]["input"]["anyOf"]) == 4


def test_through_an_upstream_gateway(scripted_server: Server, tmp_path: Path) -> None:
    """An upstream model's embeddings come from the upstream's /v1/embeddings; its
    usage is billed; base64 is encoded by the gateway; its 400s reach the client."""
    config = (
        '[[models]]\nname = "relay"\nengine = "upstream"\n'
        f'urls = ["{scripted_server.base}/v1"]\nmodel = "scripted"\napi_key = "{MASTER}"\n'
        "price = { prompt = 1.0, completion = 2.0, embedding = 0.5 }\n"
    )
    direct = scripted_server.client().embeddings.create(model="scripted", input=["a b", "c"])
    with Server(tmp_path, config) as gateway:
        raw = gateway.client().embeddings.with_raw_response.create(
            model="relay", input=["a b", "c"], encoding_format="base64"
        )
        done = raw.parse()
        for got, expected in zip(done.data, direct.data, strict=True):
            assert isinstance(got.embedding, str)  # asked for explicitly: left encoded
            raw_bytes = base64.b64decode(got.embedding)
            decoded = struct.unpack(f"<{len(raw_bytes) // 4}f", raw_bytes)
            assert decoded == pytest.approx(expected.embedding, abs=1e-7)
        assert done.usage.prompt_tokens == 3 and done.model == "relay"
        row = ledger_row(gateway, raw.headers["x-request-id"])
        assert row["api"] == "embeddings" and row["estimated"] is False
        assert row["prompt_tokens"] == 3
        with pytest.raises(openai.BadRequestError) as info:
            gateway.client().embeddings.create(model="relay", input="x", dimensions=8)
        assert "dimensions" in str(info.value)
