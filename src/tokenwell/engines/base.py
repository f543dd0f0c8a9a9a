"""The engine contract: what every backend of a served model provides.

An engine turns a validated ``ChatRequest`` into a ``Generation``: a stream
of events the server renders, and a ``Meter`` the request owns. Billing reads
the meter, so a request that ends early is billed for exactly what was made.

    prepare(request)  -> Prepared     checks that need the model (context length);
                                      raises APIError before the first byte
    submit(prepared, meter) -> Generation
                                      queues the work, counting into ``meter``;
                                      raises Overloaded when full
    generation.next_batch(timeout)    events as they come, [] on timeout
    generation.cancel()               stop generating (client went away)
    await generation.closed()         the engine let go: the meter is final
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tokenwell.config import ModelConfig
from tokenwell.engines.timings import HistogramSnapshot
from tokenwell.errors import InvalidRequest
from tokenwell.protocol.events import Event, Failed, Finish, Meter
from tokenwell.protocol.requests import ChatRequest


@dataclass(slots=True)
class Prepared:
    """A request the engine has accepted as fitting the model."""

    request: ChatRequest
    prompt_tokens: int
    # The most completion tokens one choice can produce (max_tokens, or what the
    # context leaves): budgets reserve for this worst case.
    max_completion_tokens: int
    payload: Any = None


class Generation:
    """One request's events, fed by an engine, read by the server.

    Engines call ``push`` (from the event loop) and ``close`` when they have let
    go of the request; after ``close`` the meter no longer changes.
    """

    def __init__(self, n: int, meter: Meter | None = None) -> None:
        self.meter = meter or Meter()
        self.n = n
        self.finished: dict[int, str] = {}
        self.failure: Failed | None = None
        self.cancelled = False
        self.first_token_at: float | None = None
        self.started_at: float | None = None
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = asyncio.Event()
        self._on_cancel: list[Any] = []
        # Backpressure (set by the server for a streamed response, see
        # ``backpressure``): an engine that can pause sets ``pausable`` and
        # awaits ``room()`` before each token.
        self.pausable = False
        self.high_water: int | None = None
        self._overflow_at: int | None = None
        self._on_overflow: Callable[[], None] | None = None
        self._room: asyncio.Future[None] | None = None

    # -- engine side
    def push(self, events: list[Event] | tuple[Event, ...]) -> None:
        if not events:  # (a step whose token was held back: nothing to wake for)
            return
        for event in events:
            if isinstance(event, Finish):
                self.finished[event.choice] = event.reason
            elif isinstance(event, Failed):
                self.failure = event
        self._items.extend(events)
        self._wake()
        if self._overflow_at is not None and len(self._items) >= self._overflow_at:
            overflow, self._on_overflow, self._overflow_at = self._on_overflow, None, None
            if overflow is not None:
                overflow()

    def close(self) -> None:
        """The engine is done with this request; the meter is final."""
        if not self._closed.is_set():
            self._closed.set()
            self._wake()

    def on_cancel(self, callback: Any) -> None:
        self._on_cancel.append(callback)

    @property
    def backlogged(self) -> bool:
        """The reader is ``high_water`` events behind: a pausable engine waits."""
        return self.high_water is not None and len(self._items) >= self.high_water

    async def room(self) -> None:
        """Engine side: wait while the reader is behind (returns at once when it is not)."""
        while self.backlogged and not self.cancelled and not self._closed.is_set():
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await self._room

    # -- server side
    @property
    def done(self) -> bool:
        """All events are in: every choice finished, or the generation failed."""
        return self.failure is not None or len(self.finished) >= self.n

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    async def next_batch(self, timeout: float | None = None) -> list[Event]:
        """Every event available now; waits up to ``timeout`` for one. [] at the end."""
        if not self._items and not self._closed.is_set():
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            handle = loop.call_later(timeout, _resolve, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                if handle is not None:
                    handle.cancel()
        items = list(self._items)
        self._items.clear()
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        return items

    def backpressure(
        self, high_water: int, overflow_at: int, on_overflow: Callable[[], None]
    ) -> None:
        """Server side: a pausable engine waits at ``high_water`` unread events;
        at ``overflow_at`` (an engine that did not) ``on_overflow`` is called, once."""
        self.high_water = high_water
        self._overflow_at = overflow_at
        self._on_overflow = on_overflow

    @property
    def exhausted(self) -> bool:
        return self._closed.is_set() and not self._items

    def cancel(self) -> None:
        if self.cancelled or self._closed.is_set():
            return
        self.cancelled = True
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        for callback in self._on_cancel:
            callback()

    async def closed(self) -> None:
        await self._closed.wait()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def run_as_task(
    generation: Generation,
    work: Coroutine[Any, Any, None],
    tasks: set[asyncio.Task[None]],
    on_done: Callable[[], None] | None = None,
) -> Generation:
    """Run an engine's ``work`` for ``generation`` as a task that its cancel stops.

    The generation is closed when the task ends, however it ends, also when
    it is cancelled before it began (then ``work`` never ran at all).
    """
    task = asyncio.create_task(work)
    tasks.add(task)

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        generation.close()
        if on_done is not None:
            on_done()

    task.add_done_callback(done)
    generation.on_cancel(task.cancel)
    return generation


@dataclass(slots=True)
class ModelCard:
    id: str
    owned_by: str = "tokenwell"
    created: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


class Engine(ABC):
    """A served model. Subclasses register under ``tokenwell.engines`` entry points."""

    kind: ClassVar[str]
    # Why ``start()`` failed, once it has (set by the app); None while loading or ready.
    start_error: str | None = None

    @property
    def unavailable(self) -> str | None:
        """Why a started engine cannot serve now (an upstream refusing us); None while
        it can, or while it is still loading."""
        return None

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    @property
    def model_id(self) -> str:
        return self.config.name

    @property
    def system_fingerprint(self) -> str:
        return "fp_tokenwell"

    def card(self) -> ModelCard:
        return ModelCard(self.model_id)

    @abstractmethod
    async def start(self) -> None:
        """Load and get ready; runs in the app's lifespan."""

    @abstractmethod
    async def stop(self) -> None:
        """Let go of everything; in-flight generations are closed."""

    @property
    @abstractmethod
    def ready(self) -> bool: ...

    @abstractmethod
    def prepare(self, request: ChatRequest) -> Prepared: ...

    @abstractmethod
    def submit(self, prepared: Prepared, meter: Meter | None = None) -> Generation:
        """Start generating; every token made is counted into ``meter``."""

    def stats(self) -> dict[str, Any]:
        """Numbers for /health and /metrics (queue depth, running sequences…)."""
        return {}

    def timings(self) -> list[HistogramSnapshot]:
        """Latency histograms of the engine's own stages, for /metrics."""
        return []

    # -- /v1/embeddings (engines that serve them override these)

    @property
    def embedding_size(self) -> int | None:
        """Dimensions of this model's embeddings, when known before computing one."""
        return None

    def prepare_embeddings(
        self, request: ChatRequest, inputs: list[str | tuple[int, ...]]
    ) -> Prepared:
        """Count (and check) the inputs' tokens before admission: ``prompt_tokens``
        is what the request is billed, ``max_completion_tokens`` is 0."""
        raise self._no_embeddings()

    async def embed(self, prepared: Prepared, meter: Meter) -> list[list[float]]:
        """One L2-normalised vector per input, in order; counts into ``meter``."""
        raise self._no_embeddings()

    def _no_embeddings(self) -> InvalidRequest:
        return InvalidRequest(
            f"The model `{self.model_id}` does not serve embeddings.",
            param="model",
            code="model_not_supported",
        )
