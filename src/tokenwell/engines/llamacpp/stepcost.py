"""What a decode step costs on this machine, learnt from the steps themselves.

A step's time is close to ``fixed + per_token * generating + per_prompt * prompt``:
a fixed part (reading the weights once, the graph, the threads' start) and a
part for each token in the batch, which differs between a generating
sequence's one token and a prompt's tokens. Where the fixed part dominates
(a GPU, a large CPU with fast matrix kernels) a step of four prompts costs
hardly more than a step of one; where the per-token part dominates (a small
CPU: measured here ~2.3 ms per prompt token and ~4 ms per generating token
against ~4 ms fixed) four prompts in one step make each of them wait for all
four. The scheduler asks ``worth_joining`` before it adds one more prompt to a
step, so that time to first token is as short as this machine allows: the
fit is refreshed from the last ``WINDOW`` steps, with no constant tuned to a
machine.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

log = logging.getLogger(__name__)

WINDOW = 512
# Refit after this many new steps, once at least MIN_STEPS are known (some of
# them with prompts: without those the prompt coefficient is unknown); every
# LEARN_EVERY steps until a fit is found. A fit runs on the decode thread
# between two decodes, with cold caches (~1 ms): the cost of a step moves
# slowly, and refitting it every 16 steps cost ~0.5% of the tokens/s.
REFIT_EVERY = 64
LEARN_EVERY = 16
MIN_STEPS = 32
MIN_PROMPT_STEPS = 4
# While streams generate, a step computes at least this many prompt tokens,
# however slow prompt tokens are: a chat prompt of a few lines is read in one
# step (split, its first token would wait a step more); only long prompts are
# read in bounded chunks.
MIN_CHUNK = 128


class StepCost:
    def __init__(self) -> None:
        self._steps: deque[tuple[int, int, float]] = deque(maxlen=WINDOW)
        self._new = 0
        # Seconds: per step, per generating sequence's token, per prompt token;
        # None until the steps seen say enough.
        self.fixed: float | None = None
        self.per_token = 0.0
        self.per_prompt = 0.0

    def add(self, generating: int, prompt: int, seconds: float) -> None:
        self._steps.append((generating, prompt, seconds))
        self._new += 1
        every = LEARN_EVERY if self.fixed is None else REFIT_EVERY
        if self._new >= every and len(self._steps) >= MIN_STEPS:
            self._new = 0
            self._fit()

    def _fit(self) -> None:
        rows = np.array(self._steps, dtype=np.float64)
        if np.count_nonzero(rows[:, 1]) < MIN_PROMPT_STEPS:
            return
        y = rows[:, 2]
        keep = np.ones(len(rows), dtype=bool)
        x = _design(rows, True, True)
        free = _solve(x, y)
        if free is not None:
            # Steps slowed by something else (another process took a core) are
            # outliers of a shared machine: fit again without them.
            residual = np.abs(y - x @ free)
            kept = residual <= 3 * max(float(np.median(residual)), 1e-4)
            if kept.sum() >= MIN_STEPS // 2 and np.count_nonzero(rows[kept, 1]) >= MIN_PROMPT_STEPS:
                keep = kept
        # The first plausible fit: every part at least 0 (no part of a step is
        # free), and a generating sequence's token at least a prompt token's price
        # (it is the same token through the same layers, plus its logits). The
        # free fit fails that where the steps cannot tell the parts apart: with
        # about as many streams generating in every step (4 streams, 4 tokens a
        # step) the fixed part and the per-token part are one number, and a free
        # fit split it at random (seen: 22 ms fixed + 1.2 ms a token beside 3.5 ms
        # a prompt token), which priced a drafted token far below its cost. Then
        # one price per token, with a fixed part, then without one.
        for intercept, split in ((True, True), (True, False), (False, True), (False, False)):
            coef = _solve(_design(rows[keep], intercept, split), y[keep])
            if coef is None:
                continue
            parts = [float(c) for c in coef]
            fixed = parts.pop(0) if intercept else 0.0
            per_token, per_prompt = parts if split else (parts[0], parts[0])
            if min(fixed, per_token, per_prompt) >= 0 and per_token >= per_prompt:
                break
        else:
            return
        self.fixed, self.per_token, self.per_prompt = fixed, per_token, per_prompt
        log.debug(
            "a step costs %.2f ms + %.2f ms per generating sequence + %.2f ms per prompt token",
            fixed * 1000,
            per_token * 1000,
            per_prompt * 1000,
        )

    def snapshot(self) -> dict[str, float] | None:
        """The fit in milliseconds (``/health``); None while unknown."""
        if self.fixed is None:
            return None
        return {
            "fixed_ms": round(self.fixed * 1000, 3),
            "per_token_ms": round(self.per_token * 1000, 3),
            "per_prompt_token_ms": round(self.per_prompt * 1000, 4),
        }

    def worth_joining(self, prompts: int, tokens: int, generating: int) -> bool:
        """Whether a prompt of ``tokens`` (to compute now) should join a step that
        already holds ``prompts`` prompts and ``generating`` sequences' tokens.

        Joining delays the prompts already in the step by what its tokens cost;
        waiting delays it by one more step, whose batch holds the sequences
        generating then (these and the prompts now ending). It joins when that
        lowers the sum of their times to first token (always, the first prompt
        of a step, or while the fit is unknown)."""
        if prompts == 0 or self.fixed is None:
            return True
        delay_others = prompts * self.per_prompt * tokens
        next_step = self.fixed + self.per_token * (generating + prompts)
        return delay_others < next_step

    def prompt_room(self, generating: int, step_seconds: float) -> int | None:
        """How many prompt tokens a step may compute beside ``generating``
        sequences' tokens and still take about ``step_seconds`` (the streams'
        inter-token latency while a long prompt is read); None while the fit
        is unknown or no bound is asked for."""
        if self.fixed is None or step_seconds <= 0 or self.per_prompt <= 0:
            return None
        spare = step_seconds - self.fixed - self.per_token * generating
        return max(MIN_CHUNK, int(spare / self.per_prompt))

    def draft_room(self, generating: int, step_seconds: float) -> int | None:
        """How many drafted tokens (speculative decoding) a step of ``generating``
        sequences may add and still take about ``step_seconds``: drafts come in
        bursts, and a stream waits a whole step for its next burst; None while
        the fit is unknown or no bound is asked for."""
        if self.fixed is None or step_seconds <= 0 or self.per_token <= 0:
            return None
        spare = step_seconds - self.fixed - self.per_token * generating
        return max(0, int(spare / self.per_token))


def _design(rows: np.ndarray, intercept: bool, split: bool) -> np.ndarray:
    """The fit's columns: [1,] generating, prompt tokens (or their sum)."""
    columns = [rows[:, 0], rows[:, 1]] if split else [rows[:, 0] + rows[:, 1]]
    if intercept:
        columns.insert(0, np.ones(len(rows)))
    return np.column_stack(columns)


def _solve(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Least squares; None where the columns do not determine the coefficients."""
    coef, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    if rank < x.shape[1] or not np.all(np.isfinite(coef)):
        return None
    return coef
