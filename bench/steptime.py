"""What one llama.cpp decode step costs on this machine, by the tokens in it.

Speculative decoding (issue 17) pays only where a step of k tokens costs much
less than k steps of one: this times llama.cpp alone (no server, no Python
per token) on the built-in GGUF, one sequence at position ``--position``,
every token of the step with logits (as drafted tokens have), ``--threads``
threads, the median of ``--repeat`` steps per size. The printed ratio
``k * t(1) / t(k)`` is the most any draft of k - 1 tokens could gain.

    ./dev bench steptime [--sizes 1,2,4,8,16,64] [--position 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from llama_cpp import llama_cpp as L

from tokenwell.engines.llamacpp.model import Model, builtin_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8,16,64")
    parser.add_argument("--position", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    model = Model(builtin_model_path())
    params = L.llama_context_default_params()
    params.n_ctx = args.position + max(sizes) + 16
    params.n_batch = params.n_ubatch = max(args.position, max(sizes))
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = args.threads
    params.no_perf = True
    ctx = L.llama_init_from_model(model.ptr, params)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(params.n_batch, 0, 1)

    def decode(start: int, count: int, logits: bool) -> float:
        batch.n_tokens = count
        for i in range(count):
            batch.token[i] = 100 + (start + i) % 1000
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = logits or i == count - 1
        began = time.perf_counter()
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        return time.perf_counter() - began

    decode(0, args.position, False)  # the context the steps read
    times: dict[int, float] = {}
    for size in sizes:
        samples = []
        for _ in range(args.repeat + 2):
            samples.append(decode(args.position, size, True))
            L.llama_memory_seq_rm(mem, 0, args.position, -1)
        times[size] = statistics.median(samples[2:])
    one = times[sizes[0]] if sizes[0] == 1 else None
    print(f"| tokens in the step | {' | '.join(str(s) for s in sizes)} |")
    print(f"| --- | {' | '.join('---' for _ in sizes)} |")
    print(f"| ms | {' | '.join(f'{times[s] * 1000:.1f}' for s in sizes)} |")
    if one is not None:
        print(f"| k·t(1) / t(k) | {' | '.join(f'{s * one / times[s]:.2f}' for s in sizes)} |")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    model.free()


if __name__ == "__main__":
    main()
