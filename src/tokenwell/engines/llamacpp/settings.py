"""Settings of the embedded llama.cpp engine: the keys of a ``[[models]]`` table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenwell.config import engine_settings


class LlamaCppSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A GGUF file; the built-in SmolLM2-135M-Instruct when absent.
    path: Path | None = None
    # "generate": chat, completions and embeddings (the GGUF needs a chat
    # template); "embed": /v1/embeddings only, as llama-server --embeddings: no
    # chat template needed, no generation context or slots allocated.
    task: Literal["generate", "embed"] = "generate"
    # Sequences decoded together (llama.cpp n_seq_max), and KV cells for each.
    parallel: int = Field(default=8, ge=1, le=256)
    context: int = Field(default=2048, ge=64)
    # Tokens per decode step (llama.cpp n_batch) and per compute pass (n_ubatch).
    batch: int = Field(default=2048, ge=32)
    ubatch: int = Field(default=512, ge=32)
    # While sequences generate, a prompt is prefilled this many tokens per step
    # at most, and fewer where a step would then take longer than step_ms (its
    # cost learnt from the steps: the streams' inter-token latency while long
    # prompts are read stays about step_ms; 0: prefill_chunk alone decides).
    prefill_chunk: int = Field(default=512, ge=16)
    step_ms: float = Field(default=150, ge=0)
    # Requests waiting for a slot; beyond this → 503 with Retry-After.
    max_queue: int = Field(default=256, ge=0)
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    # Host memory (MiB) for the KV state of prompts that left their slot, written
    # back when a prompt with that prefix returns (promptcache.py); 0: off.
    cache_ram: int = Field(default=1024, ge=0)
    # Speculative decoding by n-gram lookup in the sequence's own tokens
    # (draft.py): at most this many tokens drafted per sequence and step, and
    # only where the learnt acceptance rate and step cost say it pays, and no
    # more than keeps a step near step_ms (a stream's wait between bursts); 0: off.
    draft_max: int = Field(default=16, ge=0, le=256)
    # All slots share one KV pool (better for shared prefixes) or each has its own.
    kv_unified: bool = False
    # Before serving, prove in a child process that this build can decode on
    # this CPU (engines/llamacpp/selftest.py); off only to save a second.
    self_test: bool = True


def parse_settings(model: str, options: dict[str, object]) -> LlamaCppSettings:
    return engine_settings(LlamaCppSettings, model, options)
