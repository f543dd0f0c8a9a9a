"""Prove, before serving, that llama.cpp can generate on this CPU.

Two checks, both before ``/health`` says ``ready``:

1. the build: every CPU feature the loaded ggml library was compiled for
   (llama.cpp's own system-info string) must be one this CPU executes
   (``tokenwell.cpu``), and AMX is refused outright;
2. a decode: a child process loads the model and generates one token (an
   embedding model, task "embed", computes one embedding instead). An
   illegal instruction (or any other crash) kills the child, not the server,
   and is reported with its cause and the fix.

    python -m tokenwell.engines.llamacpp.selftest MODEL.gguf [--embed]   (the child)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tokenwell import cpu, faults
from tokenwell.errors import EngineUnusable

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 300.0


def system_info() -> str:
    from llama_cpp import llama_cpp as L

    return L.llama_print_system_info().decode("utf-8", errors="replace")


def verify(model_path: Path, *, embed: bool = False, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise EngineUnusable unless this build can decode ``model_path`` on this CPU."""
    try:
        cpu.check_build(system_info())
    except cpu.UnsupportedCpu as exc:
        raise EngineUnusable(str(exc)) from exc
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(cpu.__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
    )
    cmd = [sys.executable, "-m", "tokenwell.engines.llamacpp.selftest", str(model_path)]
    if embed:
        cmd.append("--embed")
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise EngineUnusable(
            f"the start-up self-test (one decode step of {model_path.name} in a child "
            f"process) did not finish within {timeout:.0f} s"
        ) from exc
    if done.returncode == 0:
        return
    raise EngineUnusable(_explain(done.returncode, done.stderr))


def _explain(returncode: int, stderr: str) -> str:
    tail = "\n".join(stderr.strip().splitlines()[-5:])
    if returncode == -signal.SIGILL:
        return (
            "llama.cpp died with SIGILL (illegal instruction) in the start-up self-test: "
            "the installed build uses a CPU instruction this machine does not execute "
            f"(this CPU runs: {cpu.describe()}). It was built on another machine or with "
            "native flags. Fix: rebuild it for this machine with `./dev serve` (or "
            "`python3 tools/build_llama.py --python .venv/bin/python --force`); the "
            "project's build never enables AMX."
        )
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return (
            f"llama.cpp crashed with {name} in the start-up self-test (one decode step in "
            f"a child process). {tail}".strip()
        )
    return f"the start-up self-test failed (exit {returncode}): {tail or 'no output'}"


def _probe(model_path: Path, embed: bool) -> None:  # runs in the child
    import ctypes

    from llama_cpp import llama_cpp as L

    faults.hit("selftest")
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(model_path).encode(), L.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp could not load {model_path}")
    params = L.llama_context_default_params()
    params.n_ctx = 64
    params.n_batch = 64
    params.n_threads = params.n_threads_batch = max(1, min(os.cpu_count() or 1, 4))
    params.no_perf = True
    if embed:
        params.embeddings = True
        params.n_ubatch = 64
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    vocab = L.llama_model_get_vocab(model)
    text = b"Hello"
    buf = (L.llama_token * 32)()
    n = L.llama_tokenize(vocab, text, len(text), buf, 32, True, True)
    if n <= 0:
        raise SystemExit("could not tokenize the probe prompt")
    if embed:
        _probe_embedding(L, model, ctx, buf, n)
        return
    # Prefill, then one more decode step of the sampled token: both kernels run.
    for step in range(2):
        batch = L.llama_batch_get_one(buf, n) if step == 0 else L.llama_batch_get_one(buf, 1)
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        logits = L.llama_get_logits_ith(ctx, -1)
        n_vocab = L.llama_vocab_n_tokens(vocab)
        row = ctypes.cast(logits, ctypes.POINTER(ctypes.c_float * n_vocab)).contents
        best = max(range(n_vocab), key=row.__getitem__)
        buf[0] = best
    L.llama_free(ctx)
    L.llama_model_free(model)


def _probe_embedding(L: Any, model: Any, ctx: Any, buf: Any, n: int) -> None:
    import math

    encoder_only = L.llama_model_has_encoder(model) and not L.llama_model_has_decoder(model)
    compute = L.llama_encode if encoder_only else L.llama_decode
    if compute(ctx, L.llama_batch_get_one(buf, n)) != 0:
        raise SystemExit("computing the probe embedding failed")
    n_embd = L.llama_model_n_embd(model)
    pooled = L.llama_pooling_type(ctx) != L.LLAMA_POOLING_TYPE_NONE
    ptr = L.llama_get_embeddings_seq(ctx, 0) if pooled else L.llama_get_embeddings_ith(ctx, -1)
    if not ptr:
        raise SystemExit("llama.cpp returned no embedding")
    vector = [ptr[i] for i in range(n_embd)]
    if not all(math.isfinite(x) for x in vector) or not any(vector):
        raise SystemExit("the probe embedding is not a finite, non-zero vector")
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    _probe(Path(sys.argv[1]), embed="--embed" in sys.argv[2:])
    sys.exit(0)
