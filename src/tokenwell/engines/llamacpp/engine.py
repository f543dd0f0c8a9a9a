"""The embedded engine: a GGUF model served in-process by llama.cpp."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tokenwell.config import ModelConfig
from tokenwell.engines.base import Engine, Generation, ModelCard, Prepared
from tokenwell.engines.llamacpp.model import Model, builtin_model_path
from tokenwell.engines.llamacpp.prompt import Rendered, render_prompt
from tokenwell.engines.llamacpp.sampling import SamplingParams, check_grammar, seed32
from tokenwell.engines.llamacpp.scheduler import EmbedJob, Job, Scheduler, exit_process
from tokenwell.engines.llamacpp.selftest import verify
from tokenwell.engines.llamacpp.settings import parse_settings
from tokenwell.engines.timings import HistogramSnapshot
from tokenwell.errors import ContextLengthExceeded, InvalidRequest, Overloaded
from tokenwell.protocol.events import Meter
from tokenwell.protocol.requests import ChatRequest

log = logging.getLogger(__name__)


class LlamaCppEngine(Engine):
    kind = "llamacpp"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.settings = parse_settings(config.name, config.options)
        self.path = self.settings.path.expanduser() if self.settings.path else builtin_model_path()
        self.model: Model | None = None
        self.scheduler: Scheduler | None = None
        self._created = int(time.time())

    async def start(self) -> None:
        if self.settings.self_test:
            # Raises EngineUnusable (cause and fix) if this build cannot run here.
            await asyncio.to_thread(verify, self.path, embed=self.embed_only)
        self.model = await asyncio.to_thread(Model, self.path, chat=not self.embed_only)
        scheduler = Scheduler(
            self.model, self.settings, asyncio.get_running_loop(), on_fatal=exit_process
        )
        await asyncio.to_thread(scheduler.start)
        self.scheduler = scheduler
        if self.embed_only:
            log.info(
                "%s ready: %s, embeddings only, inputs of up to %d tokens",
                self.model_id,
                self.path.name,
                scheduler.n_ctx_slot,
            )
        else:
            log.info(
                "%s ready: %s, %d slots x %d tokens",
                self.model_id,
                self.path.name,
                self.settings.parallel,
                scheduler.n_ctx_slot,
            )

    @property
    def embed_only(self) -> bool:
        return self.settings.task == "embed"

    async def stop(self) -> None:
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop)
        if self.model is not None:
            self.model.free()
            self.model = None

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    @property
    def system_fingerprint(self) -> str:
        return self.model.fingerprint if self.model else "fp_tokenwell"

    def card(self) -> ModelCard:
        meta: dict[str, Any] = {
            "engine": self.kind,
            "context_length": self.settings.context,
            "task": self.settings.task,
        }
        return ModelCard(self.model_id, created=self._created, meta=meta)

    def _loaded(self) -> tuple[Model, Scheduler]:
        if self.model is None or self.scheduler is None:
            raise Overloaded(
                f"The model `{self.model_id}` is still loading; try again shortly.",
                headers={"Retry-After": "1"},
            )
        return self.model, self.scheduler

    def prepare(self, request: ChatRequest) -> Prepared:
        if self.embed_only:
            raise InvalidRequest(
                f"The model `{self.model_id}` is an embedding model: it serves only "
                "POST /v1/embeddings, and generates no text.",
                param="model",
                code="model_not_supported",
            )
        model, scheduler = self._loaded()
        if request.n > self.settings.parallel:
            raise InvalidRequest(
                f"Invalid 'n': this model runs at most {self.settings.parallel} choices "
                f"at once, got {request.n}.",
                param="n",
                code="integer_above_max_value",
            )
        for token in request.logit_bias:
            if token >= model.n_vocab:
                raise InvalidRequest(
                    f"Invalid 'logit_bias': token id {token} is not in the vocabulary "
                    f"(0..{model.n_vocab - 1}).",
                    param="logit_bias",
                    code="invalid_value",
                )
        if isinstance(request.prompt, tuple):  # token ids, as they are
            for token in request.prompt:
                if token >= model.n_vocab:
                    raise InvalidRequest(
                        f"Invalid 'prompt': token id {token} is not in the vocabulary "
                        f"(0..{model.n_vocab - 1}).",
                        param="prompt",
                        code="invalid_value",
                    )
            rendered = Rendered("")
            prompt = list(request.prompt)
        else:
            rendered = render_prompt(model, request)
            if rendered.grammar is not None:
                check_grammar(model, rendered.grammar)
            prompt = model.tokenize(rendered.text)
        where = "messages" if request.prompt is None else "prompt"
        if not prompt:
            raise InvalidRequest(
                "Invalid 'prompt': it is empty once tokenized.",
                param="prompt",
                code="invalid_value",
            )
        limit = scheduler.n_ctx_slot
        if len(prompt) >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"messages resulted in {len(prompt)} tokens. Please reduce the length of "
                "the messages.",
                param=where,
            )
        room = limit - len(prompt)
        if request.max_tokens is not None and request.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(prompt) + request.max_tokens} tokens ({len(prompt)} in the "
                f"messages, {request.max_tokens} in the completion). Please reduce the "
                "length of the messages or completion.",
                param=where,
            )
        max_tokens = request.max_tokens or room
        return Prepared(request, len(prompt), max_tokens, payload=(prompt, rendered))

    @property
    def embedding_size(self) -> int | None:
        return self.model.n_embd if self.model is not None else None

    def prepare_embeddings(
        self, request: ChatRequest, inputs: list[str | tuple[int, ...]]
    ) -> Prepared:
        model, _ = self._loaded()
        limit = self.settings.context
        tokenized: list[list[int]] = []
        for i, item in enumerate(inputs):
            where = "input" if len(inputs) == 1 else f"input.[{i}]"
            tokens = list(item) if isinstance(item, tuple) else model.tokenize(item)
            if any(t >= model.n_vocab for t in tokens):
                raise InvalidRequest(
                    f"Invalid '{where}': token ids are 0..{model.n_vocab - 1} for this model.",
                    param=where,
                    code="invalid_value",
                )
            if not tokens:
                raise InvalidRequest(
                    f"Invalid '{where}': it is empty once tokenized.",
                    param=where,
                    code="invalid_value",
                )
            if len(tokens) > limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens. However, "
                    f"'{where}' has {len(tokens)} tokens. Please shorten it.",
                    param=where,
                )
            tokenized.append(tokens)
        return Prepared(request, sum(len(t) for t in tokenized), 0, payload=tokenized)

    async def embed(self, prepared: Prepared, meter: Meter) -> list[list[float]]:
        _, scheduler = self._loaded()
        loop = asyncio.get_running_loop()
        job = EmbedJob(prepared.payload, loop.create_future())
        scheduler.submit_embed(job)
        try:
            vectors = await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the scheduler drops what it has not computed
            raise
        meter.prompt_tokens = prepared.prompt_tokens
        return vectors

    def submit(self, prepared: Prepared, meter: Meter | None = None) -> Generation:
        _, scheduler = self._loaded()
        if scheduler.queued >= self.settings.max_queue:
            raise Overloaded(
                f"The model `{self.model_id}` is at capacity "
                f"({self.settings.parallel} running, {scheduler.queued} waiting). "
                "Retry after a short wait.",
                headers={"Retry-After": "1"},
            )
        request = prepared.request
        prompt, rendered = prepared.payload
        sampling = [
            SamplingParams(
                temperature=request.temperature,
                top_p=request.top_p,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                seed=seed32(request.seed, choice),
                logit_bias=tuple(request.logit_bias.items()),
                grammar=rendered.grammar,
            )
            for choice in range(request.n)
        ]
        # The meter counts the prompt once a slot starts on it: a request
        # cancelled while it waits is billed nothing.
        generation = Generation(request.n, meter)
        job = Job(
            generation=generation,
            prompt=prompt,
            n=request.n,
            max_tokens=prepared.max_completion_tokens,
            stops=request.stop,
            sampling=sampling,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            trigger=rendered.trigger,
            tools=rendered.tools,
            cache_key=request.cache_key,
        )
        scheduler.submit(job)
        return generation

    def timings(self) -> list[HistogramSnapshot]:
        scheduler = self.scheduler
        if scheduler is None:
            return []
        return [
            h.snapshot()
            for h in (
                scheduler.queue_wait,
                scheduler.prefill,
                scheduler.handoff,
                scheduler.first_token,
            )
        ]

    def stats(self) -> dict[str, Any]:
        scheduler = self.scheduler
        if scheduler is None:
            return {"state": "loading"}
        busy = sum(1 for slot in scheduler.slots if slot.busy)
        return {
            "state": "ready",
            "slots": len(scheduler.slots),
            "busy_slots": busy,
            "queued": scheduler.queued,
            "steps": scheduler.steps,
            "tokens_generated": scheduler.tokens_generated,
            "prompt_tokens_computed": scheduler.prompt_tokens_computed,
            "prompt_tokens_cached": scheduler.prompt_tokens_cached,
            "prompt_cache_bytes": scheduler.store.bytes,
            "prompt_cache_entries": len(scheduler.store),
            "prompt_cache_restores": scheduler.store.restores,
            "prompt_cache_restored_tokens": scheduler.store.restored_tokens,
            "prompt_slot_copies": scheduler.slot_copies,
            "prompt_slot_copied_tokens": scheduler.slot_copied_tokens,
            "draft_tokens": scheduler.draft_tokens,
            "draft_accepted_tokens": scheduler.draft_accepted,
            "decode_seconds": round(scheduler.decode_seconds, 6),
            "sample_seconds": round(scheduler.sample_seconds, 6),
            "step_seconds": round(scheduler.step_seconds, 6),
            # What the scheduler learnt: a step's cost (how prompts share steps,
            # whether a draft pays) and the chance a drafted token is kept.
            "step_cost": scheduler.cost.snapshot(),
            "draft_odds": scheduler.odds.snapshot(),
        }
