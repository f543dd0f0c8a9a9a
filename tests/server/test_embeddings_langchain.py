"""LangChain's ``OpenAIEmbeddings`` against tokenwell (scripted engine).

``check_embedding_ctx_length=False``: by default LangChain cuts inputs with
tiktoken's OpenAI vocabulary and sends those token ids, which mean nothing to
another model (and tiktoken would download its vocabulary).
"""

from __future__ import annotations

import pytest

from tests.support import MASTER, Server

langchain_openai = pytest.importorskip("langchain_openai")


def test_embed_documents_and_query(scripted_server: Server) -> None:
    embeddings = langchain_openai.OpenAIEmbeddings(
        model="scripted",
        base_url=f"{scripted_server.base}/v1",
        api_key=MASTER,
        check_embedding_ctx_length=False,
        chunk_size=2,  # inputs per request: 3 documents take two requests
    )
    docs = embeddings.embed_documents(["the cat sat", "a dog ran", "the cat sat"])
    assert len(docs) == 3 and all(len(d) == 64 for d in docs)
    assert docs[0] == pytest.approx(docs[2])
    query = embeddings.embed_query("the cat sat")
    assert query == pytest.approx(docs[0], abs=1e-6)
