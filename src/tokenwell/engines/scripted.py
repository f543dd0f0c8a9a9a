"""A deterministic engine for tests and benchmarks (``engine = "scripted"``).

It "generates" by splitting a reply into word tokens, so every count is
predictable. The reply is, in order of precedence:

- a script: a last user message ``!script {json}`` with any of
  ``text`` (str), ``tokens`` (list of pieces), ``finish`` (a finish reason),
  ``tool_calls`` ([{"name", "arguments", "chunks"?}]), ``delay`` (seconds per
  token), ``prefill_delay``, ``fail_after`` (tokens before a mid-stream error),
  ``crash`` (a plain exception, as a bug would raise: tests of the server's 500);
- ``reply_tokens = N`` in the model's config: ``N`` tokens " w0 w1 …";
- ``reply`` in the config;
- otherwise an echo of the last user message.

It honours ``max_tokens`` (→ ``length``), ``stop``, ``n`` and cancellation,
runs at most ``parallel`` requests at once with a bounded queue (→ 503), and
meters exactly what it emitted.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenwell.config import ModelConfig, engine_settings
from tokenwell.engines.base import Engine, Generation, ModelCard, Prepared, run_as_task
from tokenwell.engines.text import TextAssembler
from tokenwell.errors import ContextLengthExceeded, InvalidRequest, Overloaded
from tokenwell.protocol.events import (
    Event,
    Failed,
    Finish,
    Meter,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
)
from tokenwell.protocol.requests import ChatRequest

_WORD = re.compile(r"\s*\S+|\s+")


def split_tokens(text: str) -> list[str]:
    return _WORD.findall(text)


class ScriptedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reply: str | None = None
    reply_tokens: int | None = Field(default=None, ge=0)
    delay: float = Field(default=0.0, ge=0)
    prefill_delay: float = Field(default=0.0, ge=0)
    # Seconds start() takes, as loading a real model does.
    start_delay: float = Field(default=0.0, ge=0)
    context: int = Field(default=8192, ge=16)
    parallel: int = Field(default=256, ge=1)
    max_queue: int = Field(default=1024, ge=0)
    # /v1/embeddings: hashed bags of words of this many dimensions.
    embedding_dimensions: int = Field(default=64, ge=1, le=4096)


class _ScriptCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str = "{}"
    chunks: list[str] | None = None


class Script(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    tokens: list[str] | None = None
    finish: str | None = None
    tool_calls: list[_ScriptCall] | None = None
    delay: float | None = Field(default=None, ge=0)
    prefill_delay: float | None = Field(default=None, ge=0)
    fail_after: int | None = Field(default=None, ge=0)
    crash: bool = False


@dataclass
class _Plan:
    tokens: list[str]
    calls: list[_ScriptCall] = field(default_factory=list)
    finish: str | None = None
    delay: float = 0.0
    prefill_delay: float = 0.0
    fail_after: int | None = None


class ScriptedEngine(Engine):
    kind = "scripted"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.settings = engine_settings(ScriptedSettings, config.name, config.options)
        self._ready = False
        self._slots = asyncio.Semaphore(self.settings.parallel)
        self._waiting = 0
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.generated = 0

    async def start(self) -> None:
        if self.settings.start_delay:
            await asyncio.sleep(self.settings.start_delay)
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def ready(self) -> bool:
        return self._ready

    def card(self) -> ModelCard:
        return ModelCard(self.model_id, owned_by="tokenwell-scripted")

    def stats(self) -> dict[str, Any]:
        return {
            "state": "ready" if self._ready else "stopped",
            "running": self._running,
            "queued": self._waiting,
            "tokens_generated": self.generated,
        }

    @property
    def system_fingerprint(self) -> str:
        return "fp_scripted"

    def count_prompt(self, request: ChatRequest) -> int:
        if isinstance(request.prompt, tuple):
            return len(request.prompt)
        if request.prompt is not None:  # a raw prompt: no framing
            return len(split_tokens(request.prompt))
        # As a chat template would: a few tokens of framing per message.
        return sum(len(split_tokens(m.content or "")) + 4 for m in request.messages) + 2

    def _plan(self, request: ChatRequest) -> _Plan:
        s = self.settings
        last = next((m for m in reversed(request.messages) if m.role == "user"), None)
        content = (last.content or "") if last else ""
        if request.prompt is not None:  # a raw prompt, scripted the same way
            content = request.prompt if isinstance(request.prompt, str) else ""
        if content.startswith("!script"):
            try:
                script = Script.model_validate(orjson.loads(content[len("!script") :]))
            except (orjson.JSONDecodeError, ValidationError) as exc:
                raise InvalidRequest(
                    f"Invalid script for the scripted engine: {exc}", param="messages"
                ) from exc
            if script.crash:
                raise RuntimeError("the scripted engine crashed, as asked")
            tokens = script.tokens if script.tokens is not None else split_tokens(script.text or "")
            return _Plan(
                tokens,
                list(script.tool_calls or []),
                script.finish,
                s.delay if script.delay is None else script.delay,
                s.prefill_delay if script.prefill_delay is None else script.prefill_delay,
                script.fail_after,
            )
        if s.reply_tokens is not None:
            tokens = [f" w{i}" for i in range(s.reply_tokens)]
        else:
            tokens = split_tokens(s.reply if s.reply is not None else f"You said: {content}")
        return _Plan(tokens, delay=s.delay, prefill_delay=s.prefill_delay)

    def prepare(self, request: ChatRequest) -> Prepared:
        prompt = self.count_prompt(request)
        where = "messages" if request.prompt is None else "prompt"
        if prompt >= self.settings.context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.settings.context} tokens. "
                f"However, your messages resulted in {prompt} tokens.",
                param=where,
            )
        room = self.settings.context - prompt
        if request.max_tokens is not None and request.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.settings.context} tokens. "
                f"However, you requested {prompt + request.max_tokens} tokens.",
                param=where,
            )
        return Prepared(request, prompt, request.max_tokens or room, payload=self._plan(request))

    @property
    def embedding_size(self) -> int | None:
        return self.settings.embedding_dimensions

    def prepare_embeddings(
        self, request: ChatRequest, inputs: list[str | tuple[int, ...]]
    ) -> Prepared:
        words = [
            [f"#{t}" for t in item] if isinstance(item, tuple) else split_tokens(item)
            for item in inputs
        ]
        for i, item in enumerate(words):
            if len(item) > self.settings.context:
                where = "input" if len(words) == 1 else f"input.[{i}]"
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.settings.context} tokens. "
                    f"However, '{where}' has {len(item)} tokens.",
                    param=where,
                )
        return Prepared(request, sum(len(w) for w in words), 0, payload=words)

    async def embed(self, prepared: Prepared, meter: Meter) -> list[list[float]]:
        """Deterministic: a hashed bag of the lowercased words, L2-normalised."""
        if not self._ready:
            raise Overloaded(
                f"The model `{self.model_id}` is not ready.", headers={"Retry-After": "1"}
            )
        dims = self.settings.embedding_dimensions
        vectors = []
        for words in prepared.payload:
            vector = [0.0] * dims
            for word in words:
                digest = hashlib.blake2b(word.strip().lower().encode(), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                vector[value % dims] += 1.0 if (value >> 32) & 1 else -1.0
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            vectors.append([x / norm for x in vector])
        meter.prompt_tokens = prepared.prompt_tokens
        return vectors

    def submit(self, prepared: Prepared, meter: Meter | None = None) -> Generation:
        if not self._ready:
            raise Overloaded(
                f"The model `{self.model_id}` is not ready.", headers={"Retry-After": "1"}
            )
        # Counted here, not in the task: requests admitted in one loop
        # iteration must see each other before any of their tasks runs.
        settings = self.settings
        if self._running + self._waiting >= settings.parallel + settings.max_queue:
            raise Overloaded(
                f"The model `{self.model_id}` is at capacity; retry after a short wait.",
                headers={"Retry-After": "1"},
            )
        generation = Generation(prepared.request.n, meter)
        generation.pausable = True  # it waits for a slow reader (see _generate)
        self._waiting += 1

        def done() -> None:
            if generation.started_at is None:  # ended before it got a slot
                self._waiting -= 1

        return run_as_task(generation, self._run(generation, prepared), self._tasks, done)

    async def _run(self, gen: Generation, prepared: Prepared) -> None:
        plan: _Plan = prepared.payload
        request = prepared.request
        try:
            async with self._slots:
                self._waiting -= 1
                self._running += 1
                gen.started_at = time.perf_counter()
                try:
                    gen.meter.prompt_tokens = prepared.prompt_tokens
                    if plan.prefill_delay:
                        await asyncio.sleep(plan.prefill_delay)
                    await self._generate(gen, plan, request, prepared.max_completion_tokens)
                finally:
                    self._running -= 1
        except asyncio.CancelledError:
            pass  # cancelled: what was made is billed
        finally:
            gen.close()

    async def _generate(
        self, gen: Generation, plan: _Plan, request: ChatRequest, max_tokens: int
    ) -> None:
        n = request.n
        texts = [TextAssembler(request.stop) for _ in range(n)]
        live = set(range(n))
        for produced, piece in enumerate(plan.tokens, start=1):
            if not live:
                break
            if plan.fail_after is not None and produced > plan.fail_after:
                gen.push([Failed("the scripted engine failed mid-stream", "scripted_failure")])
                return
            await asyncio.sleep(plan.delay)
            if gen.backlogged:
                await gen.room()
            events: list[Event] = []
            for choice in sorted(live):
                gen.meter.add_completion()
                self.generated += 1
                released = texts[choice].push(piece.encode())
                if released.text:
                    events.append(TextDelta(choice, released.text))
                if released.stopped:
                    events.append(Finish(choice, "stop", texts[choice].matched))
                    live.discard(choice)
                elif produced >= max_tokens:
                    tail = texts[choice].flush()
                    if tail.text:
                        events.append(TextDelta(choice, tail.text))
                    events.append(Finish(choice, "length"))
                    live.discard(choice)
            gen.push(events)
        if not live:
            return
        events = []
        for choice in sorted(live):
            tail = texts[choice].flush()
            if tail.text:
                events.append(TextDelta(choice, tail.text))
            for index, call in enumerate(plan.calls):
                events.append(ToolCallStart(choice, index, f"call_{index}_{choice}", call.name))
                for fragment in call.chunks or [call.arguments]:
                    events.append(ToolCallArguments(choice, index, fragment))
                    gen.meter.add_completion()
            reason: Any = plan.finish or ("tool_calls" if plan.calls else "stop")
            events.append(Finish(choice, reason))
        gen.push(events)
