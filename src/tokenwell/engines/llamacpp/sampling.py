"""Per-sequence sampler chains and logprobs.

Each sequence owns one ``llama_sampler`` chain, seeded from its request, so
the text a seed gives does not depend on what else shares the batch.
"""

from __future__ import annotations

import ctypes
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from llama_cpp import llama_cpp as L

from tokenwell.engines.llamacpp.model import Model


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = field(default_factory=lambda: secrets.randbits(32))
    logit_bias: tuple[tuple[int, float], ...] = ()
    # GBNF grammar constraining the output, and its root rule.
    grammar: str | None = None
    grammar_root: str = "root"


def seed32(seed: int | None, choice: int) -> int:
    """OpenAI seeds are any integer; llama.cpp takes 32 bits. Choices differ by index."""
    base = secrets.randbits(32) if seed is None else seed
    return (base + choice) & 0xFFFFFFFF


class SamplerError(Exception):
    """A grammar llama.cpp refused."""


def build_chain(model: Model, params: SamplingParams, penalty_window: int) -> Any:
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    add = L.llama_sampler_chain_add
    if params.logit_bias:
        arr = (L.llama_logit_bias * len(params.logit_bias))()
        for i, (token, bias) in enumerate(params.logit_bias):
            arr[i].token = token
            arr[i].bias = bias
        add(chain, L.llama_sampler_init_logit_bias(model.n_vocab, len(params.logit_bias), arr))
    if params.presence_penalty or params.frequency_penalty:
        add(
            chain,
            L.llama_sampler_init_penalties(
                penalty_window, 1.0, params.frequency_penalty, params.presence_penalty
            ),
        )
    if params.grammar is not None:
        grammar = L.llama_sampler_init_grammar(
            model.vocab, params.grammar.encode(), params.grammar_root.encode()
        )
        if not grammar:
            L.llama_sampler_free(chain)
            raise SamplerError("llama.cpp rejected the grammar")
        add(chain, grammar)
    if params.temperature <= 0:
        add(chain, L.llama_sampler_init_greedy())
        return chain
    # As OpenAI (and Hugging Face) do: temperature first, then nucleus.
    add(chain, L.llama_sampler_init_temp(params.temperature))
    if params.top_p < 1.0:
        add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
    add(chain, L.llama_sampler_init_dist(params.seed))
    return chain


def free_chain(chain: Any) -> None:
    if chain:
        L.llama_sampler_free(chain)


def logprob_entry(model: Model, ctx: Any, batch_index: int, token: int, top: int) -> dict[str, Any]:
    """OpenAI's logprob entry for ``token``, from the raw logits at ``batch_index``."""
    ptr = L.llama_get_logits_ith(ctx, batch_index)
    logits = np.ctypeslib.as_array(
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (model.n_vocab,)
    )
    peak = float(logits.max())
    lse = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    entry = _entry(model, token, float(logits[token]) - lse)
    tops: list[dict[str, Any]] = []
    if top > 0:
        best = np.argpartition(logits, -top)[-top:]
        best = best[np.argsort(-logits[best], kind="stable")]
        tops = [_entry(model, int(t), float(logits[t]) - lse) for t in best]
    entry["top_logprobs"] = tops
    return entry


def _entry(model: Model, token: int, logprob: float) -> dict[str, Any]:
    raw = model.piece(token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}
