"""An embedding model with its own GGUF (``task = "embed"``), served beside a chat model.

The embedding model's GGUF is a copy of the built-in one with its chat template
removed (``gguf-new-metadata`` from the ``gguf`` package, as an embedding
GGUF has none): a chat model refuses to load it, the embedding model serves
it. Same weights and the same pooling as the chat model's own embeddings, so
both must give the same vectors.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.support import Server, ledger_row, model_config
from tokenwell.billing.money import nanos_to_usd
from tokenwell.engines.llamacpp.model import Model, builtin_model_path
from tokenwell.errors import ConfigError

pytestmark = pytest.mark.slow

CHAT = "SmolLM2-135M-Instruct"
EMBED = "smol-embed"
TEXTS = ["The cat sat on the mat.", "A cat was sitting on the rug.", "Stock markets fell."]


@pytest.fixture(scope="module")
def embed_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "smollm2-embed.gguf"
    tool = Path(sys.executable).parent / "gguf-new-metadata"
    done = subprocess.run(
        [
            str(tool),
            "--remove-metadata",
            "tokenizer.chat_template",
            "--force",
            str(builtin_model_path()),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embed_gguf: Path) -> Server:
    config = (
        model_config(parallel=1)
        + f"""
[[models]]
name = "{EMBED}"
engine = "llamacpp"
task = "embed"
path = "{embed_gguf}"
context = 512
price = {{ embedding = 0.02 }}
"""
    )
    with Server(tmp_path_factory.mktemp("embed-server"), config) as server:
        yield server  # type: ignore[misc]


def test_the_copy_is_not_a_chat_model(embed_gguf: Path) -> None:
    with pytest.raises(ConfigError, match="has no chat template"):
        Model(embed_gguf)


def test_it_embeds_as_the_chat_model_does_and_is_billed_its_price(server: Server) -> None:
    client = server.client()
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=TEXTS)
    own = [d.embedding for d in raw.parse().data]
    chat = [d.embedding for d in client.embeddings.create(model=CHAT, input=TEXTS).data]
    assert len(own[0]) == 576
    for a, b in zip(own, chat, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert math.isclose(math.sqrt(sum(x * x for x in a)), 1.0, rel_tol=1e-5)
    row = ledger_row(server, raw.headers["x-request-id"])
    assert row["api"] == "embeddings" and row["model"] == EMBED
    tokens = raw.parse().usage.prompt_tokens
    assert row["prompt_tokens"] == tokens and row["completion_tokens"] == 0
    assert row["cost_usd"] == nanos_to_usd(tokens * 20)  # $0.02 per million: 20 n$ a token


def test_it_generates_nothing_and_says_so_in_each_api(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert chat.value.body["param"] == "model"  # type: ignore[index]
    assert "embedding model" in chat.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMBED, prompt="Once upon")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=EMBED, input="hi")
    with server.http() as http:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        usage = http.get("/v1/usage").json()
    assert models[EMBED]["meta"]["task"] == "embed"
    assert models[CHAT]["meta"]["task"] == "generate"
    # Refused before admission: no ledger row for any of the three.
    assert usage["in_flight"] == 0
    with server.http() as http:
        rows = http.get("/admin/requests", params={"limit": 1000}).json()["data"]
    assert {r["api"] for r in rows if r["model"] == EMBED} == {"embeddings"}
