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
# them with prompts: without those the prompt coefficient is unknown).
REFIT_EVERY = 16
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
        if self._new >= REFIT_EVERY and len(self._steps) >= MIN_STEPS:
            self._new = 0
            self._fit()

    def _fit(self) -> None:
        rows = np.array(self._steps, dtype=np.float64)
        if np.count_nonzero(rows[:, 1]) < MIN_PROMPT_STEPS:
            return
        x = np.column_stack([np.ones(len(rows)), rows[:, 0], rows[:, 1]])
        y = rows[:, 2]
        coef, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
        if rank < 3:
            return
        # Steps slowed by something else (another process took a core) are
        # outliers of a shared machine: fit again without them.
        residual = np.abs(y - x @ coef)
        keep = residual <= 3 * max(float(np.median(residual)), 1e-4)
        if keep.sum() >= MIN_STEPS // 2 and np.count_nonzero(rows[keep, 1]) >= MIN_PROMPT_STEPS:
            coef, _, rank, _ = np.linalg.lstsq(x[keep], y[keep], rcond=None)
        if rank < 3 or not np.all(np.isfinite(coef)):
            return
        # A noisy machine can fit a negative part; no part of a step is free.
        fixed, per_token, per_prompt = (max(float(c), 0.0) for c in coef)
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
