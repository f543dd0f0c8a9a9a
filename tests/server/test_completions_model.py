"""``/v1/completions`` on the real embedded model (SmolLM2-135M): a raw prompt, no template."""

from __future__ import annotations

import pytest

from tests.support import Server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


def test_raw_prompt_logprobs_and_stream(model_server: Server) -> None:
    client = model_server.client()
    prompt = "The capital of France is"
    done = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2
    )
    [choice] = done.choices
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert done.usage is not None
    # The raw prompt alone (no chat template would make it this short).
    assert done.usage.prompt_tokens <= 8
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == choice.text
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == choice.text
