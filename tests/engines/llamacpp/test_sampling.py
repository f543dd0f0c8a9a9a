"""Temperature sampling (engines/llamacpp/sampling.py): exact, whatever the rows.

The draw is checked against its definition: the token t where the running
mass of softmax(logits / T), computed in float64, passes u times the total,
for the uniform u the sequence's own generator gives. It must hold for any
vocabulary size (a whole number of BLOCKs or not), any number of rows, with
the scheduler's kept buffers (``Scratch``) or without.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwell.engines.llamacpp.sampling import BLOCK, Scratch, _draw


class Seq:
    """What _draw reads of a sequence's sampler: its temperature and generator."""

    def __init__(self, temperature: float, seed: int) -> None:
        self.temperature = temperature
        self.rng = np.random.Generator(np.random.PCG64(seed))


def expected(row: np.ndarray, temperature: float, seed: int) -> tuple[np.ndarray, float]:
    """The running mass of the row's softmax numerators, and the draw's target."""
    scaled = (row - row.max()) * np.float32(1.0 / temperature)
    mass = np.cumsum(np.exp(scaled.astype(np.float32)), dtype=np.float64)
    u = np.random.Generator(np.random.PCG64(seed)).random()
    return mass, u * mass[-1]


rows_strategy = st.tuples(
    st.integers(1, 5),  # rows
    st.sampled_from([BLOCK, 3 * BLOCK, 1000, BLOCK + 1, 49152, 300]),  # vocabulary
    st.floats(0.05, 3.0),  # spread of the logits
    st.integers(0, 2**31),  # data seed
)


@settings(max_examples=60, deadline=None)
@given(rows_strategy, st.booleans())
def test_each_row_draws_the_token_its_uniform_falls_on(
    case: tuple[int, int, float, int], kept_buffers: bool
) -> None:
    n, vocab, spread, data_seed = case
    data = np.random.default_rng(data_seed)
    logits = (data.standard_normal((n, vocab)) * spread * 4).astype(np.float32)
    temperatures = [float(t) for t in data.choice([0.1, 0.7, 1.0, 2.0], size=n)]
    seeds = [int(s) for s in data.integers(0, 2**32, size=n)]
    seqs = [Seq(t, s) for t, s in zip(temperatures, seeds, strict=True)]
    if kept_buffers:
        scratch = Scratch()
        work = scratch.rows(n, vocab)
        work[:] = logits
        tokens = _draw(work, seqs, scratch.padded)
    else:
        tokens = _draw(logits.copy(), seqs)
    for j, token in enumerate(tokens):
        mass, target = expected(logits[j], temperatures[j], seeds[j])
        slack = 1e-9 * mass[-1]  # block sums and one running sum round apart
        assert 0 <= token < vocab
        assert (mass[token - 1] if token else 0.0) - slack <= target <= mass[token] + slack


def test_kept_buffers_are_reused_and_their_padding_stays_zero() -> None:
    scratch = Scratch()
    vocab = 2 * BLOCK + 7
    for step in range(5):
        n = 1 + step % 3
        work = scratch.rows(n, vocab)
        work[:] = np.random.default_rng(step).standard_normal((n, vocab)).astype(np.float32)
        _draw(work, [Seq(0.8, step * 10 + j) for j in range(n)], scratch.padded)
        assert scratch.padded.shape == (n, 3 * BLOCK)
        assert not scratch.padded[:, vocab:].any()


def test_a_token_with_no_mass_is_never_drawn() -> None:
    vocab = 4 * BLOCK
    row = np.zeros((1, vocab), dtype=np.float32)
    row[0, : vocab // 2] = -1e30  # what a logit bias of -100 and more leaves
    for seed in range(200):
        (token,) = _draw(row.copy(), [Seq(1.0, seed)])
        assert token >= vocab // 2
