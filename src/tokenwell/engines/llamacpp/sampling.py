"""Sampling: one state per sequence, one vectorised pass per step.

Each sequence owns its random generator (seeded from its request) and its
penalty counts, so the text a seed gives does not depend on what else shares
the batch.

Plain temperature sampling — the common case — is done for every sequence of
a step at once in NumPy: softmax numerators in float32 over the [rows, vocab]
logits, float64 sums over blocks of 256, then an exact inverse-CDF draw that
only scans one block. Measured here on SmolLM2 (49 152 tokens), 16 rows take
~1/2 of what 16 calls of llama.cpp's temp+dist chain take; the chain is kept
for what needs it: grammars and nucleus (top_p) sampling.
"""

from __future__ import annotations

import ctypes
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from llama_cpp import llama_cpp as L

from tokenwell.engines.llamacpp.model import Model

BLOCK = 256


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
    """OpenAI seeds are any integer; 32 bits are used. Choices differ by index."""
    base = secrets.randbits(32) if seed is None else seed
    return (base + choice) & 0xFFFFFFFF


class SamplerError(Exception):
    """A grammar llama.cpp refused."""


class SeqSampler:
    """The sampling state of one sequence."""

    def __init__(self, model: Model, params: SamplingParams) -> None:
        self.params = params
        self.temperature = params.temperature
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        self.counts: dict[int, int] | None = (
            {} if (params.presence_penalty or params.frequency_penalty) else None
        )
        self.bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
        self.bias_values = np.array([b for _, b in params.logit_bias], dtype=np.float32)
        self.chain: Any = None
        if params.grammar is not None or params.top_p < 1.0:
            self.chain = _build_chain(model, params)

    @property
    def adjusts(self) -> bool:
        return bool(self.counts) or self.bias_ids.size > 0

    def adjust(self, row: np.ndarray) -> None:
        """Logit bias and OpenAI's presence/frequency penalties, in place."""
        if self.bias_ids.size:
            row[self.bias_ids] += self.bias_values
        if self.counts:
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(ids))
            row[ids] -= counts * self.params.frequency_penalty + self.params.presence_penalty

    def accept(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1

    def free(self) -> None:
        if self.chain:
            L.llama_sampler_free(self.chain)
            self.chain = None


def sample(
    ctx: Any,
    n_vocab: int,
    n_outputs: int,
    rows: list[tuple[SeqSampler, int, int]],
    scratch: Scratch,
) -> list[int]:
    """One token for each (sampler, output row, batch index), in order."""
    tokens = [0] * len(rows)
    fast: list[int] = []
    for i, (sampler, _, batch_index) in enumerate(rows):
        if sampler.chain is not None:
            tokens[i] = _chain_sample(sampler, ctx, batch_index)
        else:
            fast.append(i)
    if not fast:
        return tokens
    logits = np.ctypeslib.as_array(
        ctypes.cast(L.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float)),
        shape=(n_outputs, n_vocab),
    )
    # A copy in a buffer kept between steps (no 3 MB allocation and page faults
    # per step): adjusted and exponentiated in place.
    work = scratch.rows(len(fast), n_vocab)
    np.take(logits, [rows[i][1] for i in fast], axis=0, out=work)
    for j, i in enumerate(fast):
        if rows[i][0].adjusts:
            rows[i][0].adjust(work[j])
    greedy = [j for j, i in enumerate(fast) if rows[i][0].temperature <= 0]
    for j in greedy:
        tokens[fast[j]] = int(np.argmax(work[j]))
    hot = [j for j, i in enumerate(fast) if rows[i][0].temperature > 0]
    if hot:
        picked = _draw(
            work if len(hot) == len(fast) else work[hot], [rows[fast[j]][0] for j in hot]
        )
        for j, token in zip(hot, picked, strict=True):
            tokens[fast[j]] = token
    for (sampler, _, _), token in zip(rows, tokens, strict=True):
        sampler.accept(token)
    return tokens


class Scratch:
    """Logit rows kept between steps; one per scheduler, used by its thread only."""

    def __init__(self) -> None:
        self._buf = np.empty((0, 0), dtype=np.float32)

    def rows(self, rows: int, vocab: int) -> np.ndarray:
        if self._buf.shape[0] < rows or self._buf.shape[1] != vocab:
            self._buf = np.empty((max(rows, 16), vocab), dtype=np.float32)
        return self._buf[:rows]


def _draw(work: np.ndarray, samplers: list[SeqSampler]) -> list[int]:
    """Exact temperature sampling for every row of ``work`` (modified in place)."""
    n, vocab = work.shape
    inv_t = np.array([1.0 / s.temperature for s in samplers], dtype=np.float32)[:, None]
    work -= work.max(axis=1, keepdims=True)
    work *= inv_t
    np.exp(work, out=work)
    blocks = -(-vocab // BLOCK)
    if blocks * BLOCK != vocab:
        padded = np.zeros((n, blocks * BLOCK), dtype=np.float32)
        padded[:, :vocab] = work
        work = padded
    sums = np.cumsum(work.reshape(n, blocks, BLOCK).sum(axis=2, dtype=np.float64), axis=1)
    targets = np.array([s.rng.random() for s in samplers]) * sums[:, -1]
    block = np.minimum((sums < targets[:, None]).sum(axis=1), blocks - 1)
    before = np.where(block > 0, sums[np.arange(n), np.maximum(block - 1, 0)], 0.0)
    rest = targets - before
    starts = block * BLOCK
    inside = work[np.arange(n)[:, None], starts[:, None] + np.arange(BLOCK)]
    cum = np.cumsum(inside, axis=1, dtype=np.float64)
    offset = np.minimum((cum < rest[:, None]).sum(axis=1), BLOCK - 1)
    picked = starts + offset
    return [min(int(t), vocab - 1) for t in picked]


def _build_chain(model: Model, params: SamplingParams) -> Any:
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
                model.n_ctx_train, 1.0, params.frequency_penalty, params.presence_penalty
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


def _chain_sample(sampler: SeqSampler, ctx: Any, batch_index: int) -> int:
    return int(L.llama_sampler_sample(sampler.chain, ctx, batch_index))


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
