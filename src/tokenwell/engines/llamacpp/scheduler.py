"""Continuous batching: many sequences share one llama.cpp context.

One dedicated thread owns the context (llama.cpp keeps an OpenMP thread team
per calling thread; decoding from changing threads was measured ~3x slower).
Each step it builds one batch of
  - one token for every generating sequence, then
  - chunks of waiting prompts, up to the batch budget,
decodes it once (ctypes releases the GIL, so the event loop runs meanwhile),
samples every sequence at its batch index with its own sampler chain, and
hands the step's events to the event loop in one callback. New requests join
between steps; a finished or cancelled sequence frees its slot at once.

Embeddings (``/v1/embeddings``) run on this thread too, in a second context
with embeddings on: a step may first compute the next waiting inputs (about
``prefill_chunk`` tokens while streams run, and only as often as
``EMBED_SHARE`` of the streams' own time allows; whole batches otherwise).

A slot keeps its KV cells after a request ends: the next request is placed in
the free slot sharing the longest token prefix with its prompt, and only the
rest of the prompt is computed (``cached_tokens``). Before a slot's cells are
given away, its state may be kept in host memory and written back later into
any slot (promptcache.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from llama_cpp import llama_cpp as L

from tokenwell import faults
from tokenwell.engines.base import Generation
from tokenwell.engines.llamacpp.draft import Drafter, Odds, Prices, choose
from tokenwell.engines.llamacpp.model import Model
from tokenwell.engines.llamacpp.promptcache import Kept, PromptStore, common_prefix
from tokenwell.engines.llamacpp.sampling import (
    SamplingParams,
    Scratch,
    SeqSampler,
    logprob_entry,
    sample,
)
from tokenwell.engines.llamacpp.settings import LlamaCppSettings
from tokenwell.engines.llamacpp.stepcost import StepCost
from tokenwell.engines.llamacpp.toolcalls import ToolCallParser
from tokenwell.engines.text import TextAssembler
from tokenwell.engines.timings import LatencyHistogram
from tokenwell.errors import Overloaded
from tokenwell.protocol.events import Event, Failed, Finish, TextDelta

log = logging.getLogger(__name__)

# Inputs computed together in one embeddings decode (sequences of its context).
EMBED_SEQS = 64
# While streams generate, embeddings may take this share of the time the streams'
# own steps take (their inter-token latency grows by about this much, at most).
EMBED_SHARE = 0.4
# A slot's state is kept in host memory before it is given away when it would
# lose at least this many tokens; a kept state is written back into a slot when
# it saves at least RESTORE_MIN tokens more than the best free slot (a copy of
# the state costs about as much as computing a few tokens); so is a busy slot's.
KEEP_MIN = 64
RESTORE_MIN = 32
# Waiting prompts looked at per step for a prefix that another slot is computing.
DEFER_MAX = 16


@dataclass(eq=False)
class Job:
    """One request: its prompt and its choices (``n``), as the scheduler sees it."""

    generation: Generation
    prompt: list[int]
    n: int
    max_tokens: int
    stops: tuple[str, ...]
    sampling: list[SamplingParams]  # one per choice
    logprobs: bool = False
    top_logprobs: int = 0
    # A lazy grammar's trigger, and whether the output is parsed for tool calls.
    trigger: str | None = None
    tools: bool = False
    # The request's placement hint (ChatRequest.cache_key).
    cache_key: str | None = None
    # Set by the event loop; read by the scheduler at the next step.
    cancelled: bool = False
    # Scheduler state.
    seqs: list[Seq] = field(default_factory=list)
    prefill_pos: int = 0
    # Where the prompt's last token sits in the batch that ends it, and its output row.
    logits_index: int = -1
    logits_output: int = -1
    # When it was submitted, given its slots, and its first token sampled
    # (perf_counter), for the engine's first-token timings.
    submitted_at: float = field(default_factory=time.perf_counter)
    placed_at: float = 0.0
    sampled_at: float = 0.0
    # Left out of a step for the prompts before it (prompt_chunks): it joins the next.
    deferred: bool = False


@dataclass(eq=False)
class EmbedJob:
    """One ``/v1/embeddings`` request: its inputs' tokens, computed a few at a time
    between decode steps, in the scheduler's own embeddings context."""

    inputs: list[list[int]]
    future: asyncio.Future[list[list[float]]]
    results: list[list[float] | None] = field(default_factory=list)
    next: int = 0  # the next input to compute
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.inputs)


@dataclass(eq=False)
class Slot:
    id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV cells this slot holds
    busy: bool = False
    last_used: float = 0.0
    # The placement hint of the request that last used it: the session whose
    # cells these are (see Scheduler._claim).
    owner: str | None = None


@dataclass(eq=False)
class Seq:
    job: Job
    choice: int
    slot: Slot
    sampler: SeqSampler
    text: TextAssembler
    calls: ToolCallParser | None = None
    generated: int = 0
    next_token: int = -1  # sampled, to be decoded next step
    batch_index: int = -1
    output_index: int = -1  # row of the batch's logits
    done: bool = False
    # Speculative decoding (draft.py): the sequence's tokens for n-gram lookup,
    # the tokens drafted in this step after next_token, and their batch rows
    # (batch index, output row).
    drafter: Drafter | None = None
    draft: list[int] = field(default_factory=list)
    draft_rows: list[tuple[int, int]] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        model: Model,
        settings: LlamaCppSettings,
        loop: asyncio.AbstractEventLoop,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.model = model
        # Called on the scheduler thread if it dies of an unexpected error.
        self.on_fatal = on_fatal
        self.dead: BaseException | None = None
        self.settings = settings
        self.loop = loop
        self.slots = [Slot(i) for i in range(settings.parallel if settings.task != "embed" else 0)]
        self._inbox: deque[Job] = deque()
        self._waiting: deque[Job] = deque()
        self._prefilling: deque[Job] = deque()
        self._running: list[Seq] = []
        self._embed_inbox: deque[EmbedJob] = deque()
        self._embeds: deque[EmbedJob] = deque()
        self.embed_ctx: Any = None
        self.embed_pooled = True
        # Seconds of decoding embeddings may use now while streams run (see _step).
        self._embed_credit = 0.0
        self.embed_batch: Any = None
        self.embeddings_computed = 0
        self._wake = threading.Condition()
        self._stopping = False
        # Written by one thread each, so their difference needs no lock.
        self.submitted = 0
        self.admitted = 0
        self.steps = 0
        self.tokens_generated = 0
        # Prompt tokens computed, and found cached (in a slot or the host store).
        self.prompt_tokens_computed = 0
        self.prompt_tokens_cached = 0
        self.store = PromptStore(settings.cache_ram << 20)
        # Prompt states copied from a busy slot into a free one (and their tokens).
        self.slot_copies = 0
        self.slot_copied_tokens = 0
        # Speculative decoding: tokens decoded as drafts, and those kept.
        self.draft_tokens = 0
        self.draft_accepted = 0
        self.odds = Odds()
        # Where the scheduler's time goes (seconds): in llama_decode, in sampling,
        # and in its own bookkeeping; for /metrics and the benchmarks.
        self.decode_seconds = 0.0
        self.sample_seconds = 0.0
        self.step_seconds = 0.0
        # Where a request's time to its first token goes, engine side (/metrics).
        self.queue_wait = LatencyHistogram(
            "tokenwell_engine_queue_wait_seconds",
            "From a request's submission to the engine until it is given its slots",
        )
        self.prefill = LatencyHistogram(
            "tokenwell_engine_prefill_seconds",
            "From a request's slots to its first token sampled (its prompt computed)",
        )
        self.handoff = LatencyHistogram(
            "tokenwell_engine_handoff_seconds",
            "From a request's first token sampled to its events on the event loop",
        )
        self.first_token = LatencyHistogram(
            "tokenwell_engine_first_token_seconds",
            "From a request's submission to the engine to its first token on the event loop",
        )
        # Jobs whose first token was sampled and is not yet handed over.
        self._first: list[Job] = []
        # What a step costs here (stepcost.py): how many prompts share a step.
        self.cost = StepCost()
        self.ctx: Any = None
        self.batch: Any = None
        self.n_outputs = 0
        self.scratch = Scratch()
        # Events of the last step, handed to the event loop at the next decode.
        self._outbox: dict[Generation, list[Event]] = {}
        self._outbox_closed: list[Generation] = []
        self._thread = threading.Thread(target=self._run, name="llamacpp-scheduler", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        return self.submitted - self.admitted

    def submit(self, job: Job) -> None:
        if self.dead is not None:
            raise Overloaded(
                "The model's decode thread has stopped; this server cannot generate.",
                code="engine_unavailable",
            )
        job.generation.on_cancel(lambda: self.cancel(job))
        self.submitted += 1
        with self._wake:
            self._inbox.append(job)
            self._wake.notify()

    def submit_embed(self, job: EmbedJob) -> None:
        if self.dead is not None:
            raise Overloaded(
                "The model's decode thread has stopped; this server cannot compute.",
                code="engine_unavailable",
            )
        with self._wake:
            self._embed_inbox.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    # ------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        try:
            if self.settings.task == "embed":
                # An embedding model: its embeddings context now (a model that
                # cannot compute them fails at start), no generation context.
                self._open_embed_context()
                self.n_ctx_slot = self.settings.context
            else:
                self._open_context()
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                with self._wake:
                    while (
                        not self._stopping
                        and not self._inbox
                        and not self._embed_inbox
                        and not self._active()
                    ):
                        self._wake.wait()
                    if self._stopping:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                    self._embeds.extend(self._embed_inbox)
                    self._embed_inbox.clear()
                faults.hit("decode-loop")
                self._step()
        except BaseException as exc:
            # A bug, not a request's failure (those are caught per step): no
            # request can be served any more. Never leave a server that accepts
            # connections and answers nothing.
            self.dead = exc
            log.critical("the llama.cpp scheduler thread died", exc_info=exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
        finally:
            self._shutdown()

    def _active(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._embeds)

    def _open_context(self) -> None:
        s = self.settings
        params = L.llama_context_default_params()
        params.n_ctx = s.context * s.parallel
        params.n_batch = s.batch
        params.n_ubatch = min(s.ubatch, s.batch)
        params.n_seq_max = s.parallel
        params.n_threads = s.threads
        params.n_threads_batch = s.threads
        params.kv_unified = s.kv_unified
        params.no_perf = True
        self.ctx = L.llama_init_from_model(self.model.ptr, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(s.batch, 0, 1)
        self.n_ctx_slot = L.llama_n_ctx(self.ctx) // s.parallel

    def _shutdown(self) -> None:
        self._flush()
        events: dict[Generation, list[Event]] = {}
        closed: list[Generation] = []
        for job in [*self._inbox, *self._waiting, *self._prefilling, *self._jobs_running()]:
            events[job.generation] = [Failed("the server is shutting down", "shutting_down")]
            closed.append(job.generation)
            self._release(job)
        self._deliver(events, closed, [])
        for embed in [*self._embed_inbox, *self._embeds]:
            self._embed_fail(embed, Overloaded("the server is shutting down"))
        if self.embed_batch is not None:
            L.llama_batch_free(self.embed_batch)
            self.embed_batch = None
        if self.embed_ctx:
            L.llama_free(self.embed_ctx)
            self.embed_ctx = None
        if self.batch is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None

    def _jobs_running(self) -> list[Job]:
        return list(dict.fromkeys(seq.job for seq in self._running))

    def _deliver(
        self, events: dict[Generation, list[Event]], closed: list[Generation], firsts: list[Job]
    ) -> None:
        if not events and not closed:
            return

        def apply() -> None:
            for gen, items in events.items():
                gen.push(items)
            for gen in closed:
                gen.close()
            if firsts:
                self._handed_over(firsts)

        # RuntimeError: the loop is gone, and nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(apply)

    # -- one step

    def _step(self) -> None:
        events: dict[Generation, list[Event]] = {}
        closed: list[Generation] = []
        self._drop_cancelled(closed)
        self._admit(events, closed)
        if self._embeds:
            busy = bool(self._running or self._prefilling)
            if not busy or self._embed_credit >= 0:
                spent = self._embed_step(busy)
                if busy:
                    self._embed_credit -= spent
        else:
            self._embed_credit = 0.0
        if not self._running and not self._prefilling:
            self._hold(events, closed)
            self._flush()
            return
        started = time.perf_counter()
        try:
            completed = self._fill_batch()
            # The last step's tokens go to the event loop now, so that it renders
            # and sends them while this thread is inside llama_decode (GIL
            # released) instead of both wanting the GIL between steps.
            self._hold(events, closed)
            self._flush()
            events, closed = {}, []
            decode_at = time.perf_counter()
            rc = L.llama_decode(self.ctx, self.batch)
            sample_at = time.perf_counter()
            self.decode_seconds += sample_at - decode_at
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.steps += 1
            seqs = list(self._running)
            for job in completed:
                seqs.extend(self._start_choices(job))
            tokens = sample(
                self.ctx,
                self.model.n_vocab,
                self.n_outputs,
                [(seq.sampler, seq.output_index, seq.batch_index) for seq in seqs],
                self.scratch,
            )
            sampled_at = time.perf_counter()
            self.sample_seconds += sampled_at - sample_at
            for job in completed:
                job.sampled_at = sampled_at
                self.prefill.observe(sampled_at - job.placed_at)
                self._first.append(job)
            resampled = self._verify(list(zip(seqs, tokens, strict=True)), events, closed)
            # The step's cost: decoding and sampling (not the text's processing),
            # every token with logits from a running sequence (drafts included)
            # counted as a generating one.
            generating = self.n_outputs - len(completed)
            self.cost.add(
                generating, self.batch.n_tokens - generating, sampled_at - decode_at + resampled
            )
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "step %d: %d tokens (%d generating, %d prompts ending), batch built "
                    "in %.1f ms, decode %.1f ms, sample %.1f ms",
                    self.steps,
                    self.batch.n_tokens,
                    generating,
                    len(completed),
                    (decode_at - started) * 1000,
                    (sample_at - decode_at) * 1000,
                    (sampled_at - sample_at) * 1000,
                )
        except Exception as exc:
            log.exception("decode step failed; failing the requests in it")
            self._fail_all(events, closed, f"generation failed: {exc}")
        self._hold(events, closed)
        if not self._running and not self._prefilling:
            self._flush()  # no next decode to overlap with
        took = time.perf_counter() - started
        self.step_seconds += took
        if self._embeds:
            # Embeddings may take EMBED_SHARE of the time streams get (at most
            # one step's worth saved up), so that streams keep their pace.
            share = EMBED_SHARE * took
            self._embed_credit = min(self._embed_credit + share, share)

    def _hold(self, events: dict[Generation, list[Event]], closed: list[Generation]) -> None:
        for gen, items in events.items():
            self._outbox.setdefault(gen, []).extend(items)
        self._outbox_closed.extend(closed)

    def _flush(self) -> None:
        if self._outbox or self._outbox_closed:
            events, closed, firsts = self._outbox, self._outbox_closed, self._first
            self._outbox, self._outbox_closed, self._first = {}, [], []
            self._deliver(events, closed, firsts)

    def _handed_over(self, jobs: list[Job]) -> None:
        """On the event loop: these jobs' first tokens have just been pushed."""
        now = time.perf_counter()
        for job in jobs:
            self.handoff.observe(now - job.sampled_at)
            self.first_token.observe(now - job.submitted_at)
            if log.isEnabledFor(logging.DEBUG):
                meter = job.generation.meter
                log.debug(
                    "first token %.1f ms after submit: queued %.1f, prefill %.1f "
                    "(%d prompt tokens, %d cached), hand-off %.1f",
                    (now - job.submitted_at) * 1000,
                    (job.placed_at - job.submitted_at) * 1000,
                    (job.sampled_at - job.placed_at) * 1000,
                    meter.prompt_tokens,
                    meter.cached_tokens,
                    (now - job.sampled_at) * 1000,
                )

    def _drop_cancelled(self, closed: list[Generation]) -> None:
        for queue in (self._waiting, self._prefilling):
            if any(job.cancelled for job in queue):
                keep = [job for job in queue if not job.cancelled]
                for job in queue:
                    if job.cancelled:
                        if queue is self._waiting:
                            self.admitted += 1
                        self._release(job)
                        closed.append(job.generation)
                queue.clear()
                queue.extend(keep)
        if any(seq.job.cancelled for seq in self._running):
            for job in {seq.job for seq in self._running if seq.job.cancelled}:
                self._release(job)
                closed.append(job.generation)

    def _admit(self, events: dict[Generation, list[Event]], closed: list[Generation]) -> None:
        deferred: list[Job] = []
        while self._waiting:
            job = self._waiting[0]
            free = [slot for slot in self.slots if not slot.busy]
            if len(free) < job.n:
                break
            self._waiting.popleft()
            if len(deferred) < DEFER_MAX and self._wait_for_shared(job):
                deferred.append(job)
                continue
            self.admitted += 1
            try:
                self._place(job, free)
            except Exception as exc:
                log.exception("could not start a request")
                self._release(job)
                events[job.generation] = [Failed(f"could not start generation: {exc}")]
                closed.append(job.generation)
                continue
            self._prefilling.append(job)
        self._waiting.extendleft(reversed(deferred))

    def _wait_for_shared(self, job: Job) -> bool:
        """Whether another slot is computing a prefix this prompt shares, beyond
        what is computed anywhere yet: then it waits, and copies it when done
        (sessions that start together behind one long system prompt compute it
        once, not once per slot)."""
        if not self.store.enabled or not self._prefilling:
            return False
        limit = len(job.prompt) - 1
        wanted = 0
        for other in self._prefilling:
            shared = min(common_prefix(other.prompt, job.prompt), limit)
            if shared - other.prefill_pos >= RESTORE_MIN:
                wanted = max(wanted, shared)
        if not wanted:
            return False
        return self._available(job.prompt) + RESTORE_MIN <= wanted

    def _available(self, prompt: list[int]) -> int:
        """The longest prefix of ``prompt`` computed anywhere: a slot, or the store."""
        best = max((common_prefix(slot.tokens, prompt) for slot in self.slots), default=0)
        return max(best, self.store.best(prompt)[1])

    def _place(self, job: Job, free: list[Slot]) -> None:
        prompt = job.prompt
        limit = len(prompt) - 1  # the last token is always computed (its logits)

        # The free slot holding the longest prefix of this prompt; among those
        # that hold less than RESTORE_MIN tokens of it (a chat template's first
        # tokens), and among equals, the one whose cells matter least to other
        # sessions (_claim).
        def choice(slot: Slot) -> tuple[int, int, int, float]:
            shared = common_prefix(slot.tokens, prompt)
            rank, recent = self._claim(slot, job.cache_key)
            return (shared if shared >= RESTORE_MIN else 0), rank, shared, recent

        primary = max(free, key=choice)
        reuse = min(common_prefix(primary.tokens, prompt), limit)
        copied = False
        source, length = self._best_source(prompt) if self.store.enabled else (None, 0)
        if source is not None and min(length, limit) >= reuse + RESTORE_MIN:
            # A kept state, or a busy slot, shares more: copy it into the free
            # slot whose cells matter least (empty, or kept already, else least
            # recently used).
            target = max(free, key=lambda s: (self._expendable(s), self._claim(s, job.cache_key)))
            self._keep(target)
            copied = self._copy(source, target, min(length, limit))
            if copied:
                primary, reuse = target, min(length, limit)
            else:
                reuse = min(common_prefix(primary.tokens, prompt), limit)
        others = sorted((s for s in free if s is not primary), key=lambda s: s.last_used)
        slots = [primary, *others[: job.n - 1]]
        if not copied and len(primary.tokens) - reuse >= KEEP_MIN:
            # (A copy's cells are kept already, or live in their busy slot.)
            self._keep(primary)
        for slot in slots[1:]:  # n > 1: these get a copy of the prompt's cells
            self._keep(slot)
        if not L.llama_memory_seq_rm(self.mem, primary.id, reuse, -1):
            L.llama_memory_seq_rm(self.mem, primary.id, -1, -1)
            reuse = 0
        del primary.tokens[reuse:]
        job.placed_at = job.generation.started_at = time.perf_counter()
        self.queue_wait.observe(job.placed_at - job.submitted_at)
        meter = job.generation.meter
        meter.prompt_tokens = len(prompt)
        meter.cached_tokens = reuse
        self.prompt_tokens_cached += reuse
        job.prefill_pos = reuse
        for choice, slot in enumerate(slots):
            slot.busy = True
            slot.owner = job.cache_key
            sampler = SeqSampler(self.model, job.sampling[choice], job.trigger)
            calls = ToolCallParser(choice) if job.tools else None
            text = TextAssembler(job.stops, job.logprobs)
            job.seqs.append(Seq(job, choice, slot, sampler, text, calls))

    @staticmethod
    def _claim(slot: Slot, key: str | None) -> tuple[int, float]:
        """How readily a request with placement hint ``key`` takes this free slot
        over another that holds as much of its prompt (higher: sooner): the
        slot its own session used last (its cells are that session's, which
        this request carries on or replaces); then one no other session
        claims; then, the least recently used, so that the caches other
        sessions will come back to live longest. Without hints, every slot
        ranks alike: least recently used first."""
        if key is not None and slot.owner == key:
            rank = 2
        elif slot.owner is None:
            rank = 1
        else:
            rank = 0
        return rank, -slot.last_used

    # -- the host-memory prompt store

    def _expendable(self, slot: Slot) -> bool:
        return len(slot.tokens) < KEEP_MIN or self.store.covers(slot.tokens)

    def _keep(self, slot: Slot) -> None:
        """Copy a free slot's state into host memory before its cells are reused
        (unless it is short, or a kept state already starts with all of it)."""
        if not self.store.enabled or self._expendable(slot):
            return
        size = L.llama_state_seq_get_size(self.ctx, slot.id)
        if not self.store.fits(size):
            return
        data = (ctypes.c_uint8 * size)()
        written = L.llama_state_seq_get_data(self.ctx, data, size, slot.id)
        if written:
            self.store.put(slot.tokens, data, written)

    def _donors(self) -> list[Slot]:
        """Busy slots whose cells may be copied: every computed token is in its
        cells between steps (not so a choice of n > 1 whose copy of the prompt
        llama.cpp makes at the next decode)."""
        slots = [seq.slot for seq in self._running if seq.job.n == 1]
        slots.extend(job.seqs[0].slot for job in self._prefilling)
        return slots

    def _best_source(self, prompt: list[int]) -> tuple[Kept | Slot | None, int]:
        source: Kept | Slot | None
        source, length = self.store.best(prompt)
        for slot in self._donors():
            n = common_prefix(slot.tokens, prompt)
            if n > length:
                source, length = slot, n
        return source, length

    def _copy(self, source: Kept | Slot, slot: Slot, reuse: int) -> bool:
        """Write a kept state, or a busy slot's state, into a free slot (its own
        cells dropped first); ``reuse`` of its tokens serve the new prompt."""
        if isinstance(source, Slot):
            size = L.llama_state_seq_get_size(self.ctx, source.id)
            data = (ctypes.c_uint8 * size)()
            size = L.llama_state_seq_get_data(self.ctx, data, size, source.id)
            tokens = list(source.tokens)
        else:
            data, size, tokens = source.data, source.size, list(source.tokens)
        L.llama_memory_seq_rm(self.mem, slot.id, -1, -1)
        slot.tokens.clear()
        if not size or not L.llama_state_seq_set_data(self.ctx, data, size, slot.id):
            L.llama_memory_seq_rm(self.mem, slot.id, -1, -1)
            log.warning("could not copy a prompt's state into a slot; computing the prompt")
            return False
        slot.tokens = tokens
        if isinstance(source, Slot):
            self.slot_copies += 1
            self.slot_copied_tokens += reuse
        else:
            self.store.used(source, reuse)
        return True

    def _fill_batch(self) -> list[Job]:
        """Fill the batch; returns the jobs whose prompt ends in it.

        Running sequences get one token each; the rest of the budget goes to
        waiting prompts, first come first served, as long as one more prompt
        in this step shortens the prompts' times to first token on this
        machine (``StepCost.worth_joining``), and none waits more than one
        step for the others (``prompt_chunks``). The batch is then laid out in
        slot order: llama.cpp decodes a batch whose sequence ids are out of
        order ~1.8x slower (measured here at 16 streams), and choosing slots by
        shared prefix shuffles them.
        """
        capacity = self.settings.batch
        room = capacity - len(self._running)
        if self._running:
            room = min(room, self.settings.prefill_chunk)
            bound = self.cost.prompt_room(len(self._running), self.settings.step_ms / 1000)
            if bound is not None:
                room = min(room, bound)
        chunks = prompt_chunks(self._prefilling, room, len(self._running), self.cost)
        completed = [job for job, _, end in chunks if end == len(job.prompt)]
        drafted = 0
        if not chunks:
            budget = capacity - len(self._running)
            bound = self.cost.draft_room(len(self._running), self.settings.step_ms / 1000)
            drafted = self._draft(budget if bound is None else min(budget, bound))
        entries: list[tuple[int, Seq | tuple[Job, int, int]]] = [
            (seq.slot.id, seq) for seq in self._running
        ]
        entries.extend((chunk[0].seqs[0].slot.id, chunk) for chunk in chunks)
        entries.sort(key=lambda entry: entry[0])

        self.batch.n_tokens = 0
        self.n_outputs = 0
        for slot_id, item in entries:
            if isinstance(item, Seq):
                self._add(item.next_token, len(item.slot.tokens), slot_id, True)
                item.slot.tokens.append(item.next_token)
                item.batch_index = self.batch.n_tokens - 1
                item.output_index = self.n_outputs - 1
                item.draft_rows.clear()
                position = len(item.slot.tokens)
                for offset, token in enumerate(item.draft):
                    # Drafted tokens' cells are written; which of them stay is
                    # known once their positions are sampled (_verify).
                    self._add(token, position + offset, slot_id, True)
                    item.draft_rows.append((self.batch.n_tokens - 1, self.n_outputs - 1))
                continue
            job, start, end = item
            last = len(job.prompt) - 1
            for pos in range(start, end):
                self._add(job.prompt[pos], pos, slot_id, pos == last)
            job.seqs[0].slot.tokens.extend(job.prompt[start:end])
            job.prefill_pos = end
            self.prompt_tokens_computed += end - start
            if end == len(job.prompt):
                job.logits_index = self.batch.n_tokens - 1
                job.logits_output = self.n_outputs - 1
        for job in completed:
            self._prefilling.remove(job)
        self.draft_tokens += drafted
        return completed

    def _draft(self, budget: int) -> int:
        """Choose this step's drafts (draft.py); the number of drafted tokens.

        Every running sequence's proposal is looked up, so that the odds of a
        draft are learnt even while drafting does not pay; tokens are drafted
        only once the step's cost is known, and never in a step that reads a
        prompt (its time to first token would pay for them)."""
        limit = self.settings.draft_max
        seqs = [seq for seq in self._running if seq.drafter is not None]
        for seq in self._running:
            seq.draft = []
        if limit <= 0 or not seqs:
            return 0
        chances: list[list[float]] = []
        for seq in seqs:
            assert seq.drafter is not None
            room = min(
                limit,
                seq.job.max_tokens - seq.generated - 1,
                self.n_ctx_slot - len(seq.slot.tokens) - 2,
            )
            proposed = seq.drafter.propose(max(room, 1))
            chances.append(seq.drafter.chances(min(len(proposed), max(room, 0))))
        if self.cost.fixed is None:
            return 0
        counts = choose(chances, Prices(self.cost.fixed, self.cost.per_token), budget)
        for seq, count in zip(seqs, counts, strict=True):
            assert seq.drafter is not None
            seq.draft = seq.drafter.proposed[:count]
            seq.drafter.drafted = count
        return sum(counts)

    def _add(self, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self.batch
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
        batch.n_tokens = i + 1
        if logits:
            self.n_outputs += 1

    def _verify(
        self,
        sampled: list[tuple[Seq, int]],
        events: dict[Generation, list[Event]],
        closed: list[Generation],
    ) -> float:
        """Process the step's sampled tokens, and the drafts they confirm; the
        seconds spent sampling at drafted rows.

        A sequence whose sampled token is the next drafted one keeps that
        draft (its cell is already computed) and samples again at the draft's
        row, until a sample differs from the draft or the draft ends: the
        tokens, and the random numbers drawn for them, are those of decoding
        one token per step. The cells of drafts not kept are removed."""
        got: dict[Seq, list[int]] = {}
        resampled = 0.0
        while sampled:
            again: list[Seq] = []
            for seq, token in sampled:
                self._process(seq, token, events, closed)
                if seq.drafter is None:
                    continue
                tokens = got.setdefault(seq, [])
                tokens.append(token)
                at = len(tokens) - 1
                if not seq.done and at < len(seq.draft) and seq.draft[at] == token:
                    seq.slot.tokens.append(token)
                    seq.batch_index, seq.output_index = seq.draft_rows[at]
                    again.append(seq)
            if not again:
                break
            started = time.perf_counter()
            more = sample(
                self.ctx,
                self.model.n_vocab,
                self.n_outputs,
                [(seq.sampler, seq.output_index, seq.batch_index) for seq in again],
                self.scratch,
            )
            resampled += time.perf_counter() - started
            sampled = list(zip(again, more, strict=True))
        for seq, tokens in got.items():
            assert seq.drafter is not None
            if seq.draft:
                # Cells past the kept drafts hold tokens that were not sampled.
                L.llama_memory_seq_rm(self.mem, seq.slot.id, len(seq.slot.tokens), -1)
                seq.draft = []
            self.draft_accepted += seq.drafter.observe(tokens)
            for token in tokens:
                seq.drafter.append(token)
        self.sample_seconds += resampled
        return resampled

    def _start_choices(self, job: Job) -> list[Seq]:
        primary = job.seqs[0].slot
        for seq in job.seqs[1:]:
            # n > 1: the other choices start from a copy of the prompt's cells.
            L.llama_memory_seq_rm(self.mem, seq.slot.id, -1, -1)
            L.llama_memory_seq_cp(self.mem, primary.id, seq.slot.id, -1, -1)
            seq.slot.tokens = list(primary.tokens)
        for seq in job.seqs:
            # Every choice samples its first token from the prompt's last logits.
            seq.batch_index = job.logits_index
            seq.output_index = job.logits_output
            if self.settings.draft_max > 0 and seq.sampler.grammar is None:
                # (Structured output and tool calls are not drafted: a grammar
                # refuses much of what the text repeats, and their sampling
                # stays as it was.)
                seq.drafter = Drafter(
                    job.prompt, self.odds, greedy=job.sampling[seq.choice].temperature <= 0
                )
            self._running.append(seq)
        return job.seqs

    def _process(
        self, seq: Seq, token: int, events: dict[Generation, list[Event]], closed: list[Generation]
    ) -> None:
        job = seq.job
        model = self.model
        seq.generated += 1
        job.generation.meter.add_completion()
        self.tokens_generated += 1
        out = events.setdefault(job.generation, [])
        if model.is_eog(token):
            self._finish(seq, "stop", out, closed)
            return
        entry = (
            logprob_entry(model, self.ctx, seq.batch_index, token, job.top_logprobs)
            if job.logprobs
            else None
        )
        released = seq.text.push(model.piece(token), entry)
        self._emit(seq, released.text, released.logprobs, out)
        if released.stopped:
            self._finish(seq, "stop", out, closed)
        elif seq.generated >= job.max_tokens or len(seq.slot.tokens) + 1 >= self.n_ctx_slot:
            self._finish(seq, "length", out, closed)
        else:
            seq.next_token = token

    def _finish(self, seq: Seq, reason: str, out: list[Event], closed: list[Generation]) -> None:
        tail = seq.text.flush()
        self._emit(seq, tail.text, tail.logprobs, out)
        if seq.calls is not None:
            out.extend(seq.calls.finish())
            if seq.calls.calls and reason == "stop":
                reason = "tool_calls"
        stop = seq.text.matched if reason == "stop" else None
        out.append(Finish(seq.choice, reason, stop))  # type: ignore[arg-type]
        self._free_seq(seq)
        job = seq.job
        if all(s.done for s in job.seqs):
            closed.append(job.generation)

    @staticmethod
    def _emit(seq: Seq, text: str, logprobs: list[dict[str, Any]] | None, out: list[Event]) -> None:
        if seq.calls is not None:
            out.extend(seq.calls.feed(text, _tuple(logprobs)))
        elif text or logprobs:
            out.append(TextDelta(seq.choice, text, _tuple(logprobs)))

    def _free_seq(self, seq: Seq) -> None:
        if seq.done:
            return
        seq.done = True
        seq.sampler.free()
        seq.slot.busy = False
        seq.slot.last_used = time.monotonic()
        if seq in self._running:
            self._running.remove(seq)

    def _release(self, job: Job) -> None:
        for seq in job.seqs:
            self._free_seq(seq)

    def _fail_all(
        self, events: dict[Generation, list[Event]], closed: list[Generation], message: str
    ) -> None:
        for job in [*self._prefilling, *self._jobs_running()]:
            events.setdefault(job.generation, []).append(Failed(message))
            closed.append(job.generation)
            self._release(job)
            for seq in job.seqs:
                L.llama_memory_seq_rm(self.mem, seq.slot.id, -1, -1)
                seq.slot.tokens.clear()
        self._prefilling.clear()
        self._running.clear()

    # ------------------------------------------------------------ embeddings

    def _open_embed_context(self) -> None:
        s = self.settings
        model = self.model
        params = L.llama_context_default_params()
        params.embeddings = True
        # The GGUF's pooling when it names one, else the mean of the tokens.
        params.pooling_type = (
            L.LLAMA_POOLING_TYPE_UNSPECIFIED
            if model.pooling_type is not None
            else L.LLAMA_POOLING_TYPE_MEAN
        )
        params.n_ctx = s.context
        params.n_batch = s.context
        # Pooled embeddings need each sequence whole in one micro-batch.
        params.n_ubatch = s.context
        params.n_seq_max = EMBED_SEQS
        params.kv_unified = True
        params.n_threads = s.threads
        params.n_threads_batch = s.threads
        params.no_perf = True
        self.embed_ctx = L.llama_init_from_model(model.ptr, params)
        if not self.embed_ctx:
            raise RuntimeError("llama.cpp could not create an embeddings context")
        self.embed_batch = L.llama_batch_init(s.context, 0, 1)
        self.embed_pooled = L.llama_pooling_type(self.embed_ctx) != L.LLAMA_POOLING_TYPE_NONE

    def _embed_step(self, busy: bool) -> float:
        """Compute the next inputs of waiting embeddings in one decode; its seconds.

        While streams run (``busy``), about ``prefill_chunk`` tokens (at least
        one whole input), and only as often as ``EMBED_SHARE`` of their time
        allows, so that their tokens keep coming at nearly their pace."""
        while self._embeds and self._embeds[0].cancelled:
            self._embeds.popleft()
        if not self._embeds:
            return 0.0
        try:
            if self.embed_ctx is None:
                self._open_embed_context()
        except Exception as exc:
            log.exception("could not open the embeddings context")
            while self._embeds:
                self._embed_fail(self._embeds.popleft(), exc)
            return 0.0
        budget = self.settings.prefill_chunk if busy else self.settings.context
        batch = self.embed_batch
        batch.n_tokens = 0
        taken: list[tuple[EmbedJob, int, int, int]] = []  # job, input, seq, first row
        while self._embeds and len(taken) < EMBED_SEQS:
            job = self._embeds[0]
            if job.cancelled:
                self._embeds.popleft()
                continue
            tokens = job.inputs[job.next]
            if taken and batch.n_tokens + len(tokens) > budget:
                break
            seq = len(taken)
            first = batch.n_tokens
            for pos, token in enumerate(tokens):
                i = batch.n_tokens
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = True
                batch.n_tokens = i + 1
            taken.append((job, job.next, seq, first))
            job.next += 1
            if job.next == len(job.inputs):
                self._embeds.popleft()
        if not taken:
            return 0.0
        started = time.perf_counter()
        try:
            compute = L.llama_encode if self.model.encoder_only else L.llama_decode
            rc = compute(self.embed_ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            n_embd = self.model.n_embd
            for job, index, seq, first in taken:
                if self.embed_pooled:
                    ptr = L.llama_get_embeddings_seq(self.embed_ctx, seq)
                    vector = list(ptr[:n_embd])
                else:  # a GGUF that says "no pooling": the mean of its tokens
                    count = len(job.inputs[index])
                    vector = [0.0] * n_embd
                    for row in range(first, first + count):
                        ptr = L.llama_get_embeddings_ith(self.embed_ctx, row)
                        for d, x in enumerate(ptr[:n_embd]):
                            vector[d] += x
                norm = math.sqrt(sum(x * x for x in vector)) or 1.0
                job.results[index] = [x / norm for x in vector]
                self.embeddings_computed += 1
        except Exception as exc:
            log.exception("embeddings decode failed")
            for job in {t[0] for t in taken}:
                job.cancelled = True
                self._embed_fail(job, exc)
            while self._embeds and self._embeds[0].cancelled:
                self._embeds.popleft()
        finally:
            L.llama_memory_clear(L.llama_get_memory(self.embed_ctx), True)
            elapsed = time.perf_counter() - started
            self.decode_seconds += elapsed
        for job in {t[0] for t in taken}:
            if not job.cancelled and all(r is not None for r in job.results):
                self._embed_done(job)
        return elapsed

    def _embed_done(self, job: EmbedJob) -> None:
        results = [r for r in job.results if r is not None]

        def apply() -> None:
            if not job.future.done():
                job.future.set_result(results)

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(apply)

    def _embed_fail(self, job: EmbedJob, exc: BaseException) -> None:
        error = exc if isinstance(exc, Overloaded) else RuntimeError(f"embedding failed: {exc}")

        def apply() -> None:
            if not job.future.done():
                job.future.set_exception(error)

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(apply)


def prompt_chunks(
    waiting: Iterable[Job], room: int, generating: int, cost: StepCost
) -> list[tuple[Job, int, int]]:
    """The prompts (job, from, to) that join this step: first come first served,
    ``room`` tokens at most, each as long as it shortens the prompts' times to
    first token (``StepCost.worth_joining``).

    A prompt left out for the ones before it waits one step at most: at the next
    it joins whatever the cost says, and so does every prompt that waited behind
    it. Without that bound, prompts that arrive together (closed-loop clients
    whose requests end together, an agent's parallel calls) were read one per
    step where prompt tokens cost as much as a decode's (a 2-core CPU: ~3 ms
    each), and the last of k waited k long steps: the tail of the time to first
    token, while a single step of all of them is what llama-server takes."""
    chunks: list[tuple[Job, int, int]] = []
    left_out = False
    for job in waiting:
        if left_out:
            job.deferred = True  # behind one left out: it waited this step too
            continue
        if room <= 0:
            break
        end = min(len(job.prompt), job.prefill_pos + room)
        if not job.deferred and not cost.worth_joining(
            len(chunks), end - job.prefill_pos, generating
        ):
            job.deferred = left_out = True
            continue
        job.deferred = False
        chunks.append((job, job.prefill_pos, end))
        room -= end - job.prefill_pos
    return chunks


def exit_process(exc: BaseException) -> None:
    """End the whole server, loudly: requests still open are closed, with their
    usage, by the ledger's crash recovery at the next start (as after kill -9)."""
    sys.stderr.write(
        f"tokenwell: FATAL: the llama.cpp scheduler thread died ({exc!r}); exiting with "
        "status 70 so that a supervisor restarts the server. Requests in flight are "
        "closed by crash recovery at the next start.\n"
    )
    sys.stderr.flush()
    os._exit(70)


def _tuple(items: list[dict[str, Any]] | None) -> tuple[dict[str, Any], ...] | None:
    return tuple(items) if items is not None else None
