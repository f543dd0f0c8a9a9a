"""The upstream engine: a model served by OpenAI-compatible inference servers.

tokenwell meters and bills; vLLM, SGLang, llama.cpp's llama-server or a hosted
API generates. Whatever the client asked is passed through; tokenwell always
streams from the upstream with ``include_usage`` (so usage is never lost, also
when the client asked for none, or for no stream), normalises what comes back
to CONTRACT.md, and cancels the upstream request the moment its client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
import orjson

from tokenwell.config import ModelConfig
from tokenwell.engines.base import Engine, Generation, ModelCard, Prepared, run_as_task
from tokenwell.engines.upstream.normalize import MalformedChunk, Normalizer, chat_chunk
from tokenwell.engines.upstream.pool import Pool, Replica
from tokenwell.engines.upstream.settings import parse_settings
from tokenwell.engines.upstream.tokens import Counter
from tokenwell.errors import APIError, InvalidRequest, Overloaded, RateLimited, ServerError
from tokenwell.protocol.events import Failed, Meter
from tokenwell.protocol.requests import ChatRequest
from tokenwell.protocol.sse import SSEDecoder

log = logging.getLogger(__name__)

# Per message, what a chat template adds around the content (an over-estimate).
_FRAMING = 8


class _Retry(Exception):
    """This replica failed before anything reached the client: try another."""


class UpstreamEngine(Engine):
    kind = "upstream"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.settings = parse_settings(config.name, config.options)
        self.client: aiohttp.ClientSession | None = None
        self.pool: Pool | None = None
        self.counter: Counter | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._created = int(time.time())

    async def start(self) -> None:
        s = self.settings
        # aiohttp: its C HTTP parser made the gateway several times cheaper per
        # chunk than httpx's pure-Python stack (bench/gateway.py).
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.max_connections, ttl_dns_cache=60),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=s.connect_timeout, sock_read=s.idle_timeout
            ),
            auto_decompress=False,
        )
        if s.tokenizer is not None:
            self.counter = await asyncio.to_thread(Counter, s.tokenizer.expanduser())
        self.pool = Pool(s.replicas(), self.client, s.health_interval)
        await self.pool.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pool is not None:
            await self.pool.stop()
        if self.client is not None:
            await self.client.close()

    @property
    def ready(self) -> bool:
        return self.pool is not None and bool(self.pool.healthy)

    @property
    def unavailable(self) -> str | None:
        if self.pool is None or self.pool.healthy:
            return None
        return "; ".join(f"{r.url}: {r.last_error or 'unhealthy'}" for r in self.pool.replicas)

    def card(self) -> ModelCard:
        return ModelCard(self.model_id, owned_by="tokenwell-upstream", created=self._created)

    def stats(self) -> dict[str, Any]:
        if self.pool is None:
            return {"state": "starting"}
        return {
            "state": "ready" if self.ready else "no healthy upstream",
            "upstreams": [
                {
                    "url": r.url,
                    "healthy": r.healthy,
                    "outstanding": r.outstanding,
                    "served": r.served,
                    "health_ms": r.health_ms,
                    **({"error": r.last_error} if r.last_error else {}),
                }
                for r in self.pool.replicas
            ],
        }

    # ------------------------------------------------------------------ prepare

    def _prompt_estimate(self, request: ChatRequest) -> int:
        """An over-estimate of the prompt: no token is shorter than one byte."""
        if isinstance(request.prompt, tuple):
            return len(request.prompt)
        if request.prompt is not None:
            return len(request.prompt.encode())
        total = 0
        for message in request.messages:
            text = message.content or ""
            for call in message.tool_calls:
                text += call.name + call.arguments
            total += len(text.encode()) + _FRAMING
        for tool in request.tools:
            total += len(orjson.dumps(tool.model_dump(by_alias=True)))
        return total

    def prepare(self, request: ChatRequest) -> Prepared:
        prompt = self._prompt_estimate(request)
        room = max(self.settings.context - min(prompt, self.settings.context), 1)
        return Prepared(request, prompt, request.max_tokens or room)

    # ------------------------------------------------------------------ embeddings

    def prepare_embeddings(
        self, request: ChatRequest, inputs: list[str | tuple[int, ...]]
    ) -> Prepared:
        # Counted exactly with the tokenizer when there is one, else over-estimated
        # (bytes); the upstream's usage is what is billed.
        total = 0
        for item in inputs:
            if isinstance(item, tuple):
                total += len(item)
            else:
                total += self.counter.count(item) if self.counter else len(item.encode())
        return Prepared(request, total, 0)

    async def embed(self, prepared: Prepared, meter: Meter) -> list[list[float]]:
        """Passed through to an upstream's ``/v1/embeddings`` (floats asked for, and
        encoded for the client here); retried on another replica as generations are."""
        if self.client is None or self.pool is None or not self.pool.healthy:
            raise Overloaded(
                f"No upstream for `{self.model_id}` is reachable right now.",
                headers={"Retry-After": "2"},
            )
        meter.prompt_tokens = prepared.prompt_tokens
        meter.estimated = True
        tried: set[Replica] = set()
        last = "no upstream was tried"
        for _ in range(self.settings.retries + 1):
            replica = self.pool.pick(tried)
            if replica is None:
                break
            tried.add(replica)
            body = {
                **prepared.request.raw,
                "model": replica.model or self.model_id,
                "encoding_format": "float",
            }
            replica.outstanding += 1
            try:
                async with self.client.post(
                    f"{replica.url}/embeddings",
                    data=orjson.dumps(body),
                    headers={"Content-Type": "application/json", **replica.headers()},
                ) as response:
                    raw = await response.read()
                    if response.status >= 500 or response.status in (401, 403, 404):
                        self.pool.failed(replica, f"answered {response.status}")
                        last = f"{replica.url} answered {response.status}"
                        continue
                    if response.status != 200:
                        raise _upstream_refusal(response.status, raw, response.headers)
                    replica.served += 1
                    data = orjson.loads(raw)
                    items = sorted(data["data"], key=lambda item: item["index"])
                    vectors = [[float(x) for x in item["embedding"]] for item in items]
                    usage = data.get("usage") or {}
                    if isinstance(usage.get("prompt_tokens"), int):
                        meter.prompt_tokens = usage["prompt_tokens"]
                        meter.estimated = False
                    return vectors
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.pool.failed(replica, f"embeddings failed: {exc!r}")
                last = f"{replica.url}: {exc!r}"
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ServerError(
                    f"The upstream for `{self.model_id}` sent malformed embeddings: {exc}"
                ) from exc
            finally:
                replica.outstanding -= 1
        meter.prompt_tokens = 0  # nothing was computed
        raise Overloaded(
            f"No upstream for `{self.model_id}` could serve the request ({last}).",
            code="upstream_unavailable",
            headers={"Retry-After": "2"},
        )

    # ------------------------------------------------------------------ submit

    def submit(self, prepared: Prepared, meter: Meter | None = None) -> Generation:
        if self.pool is None or not self.pool.healthy:
            raise Overloaded(
                f"No upstream for `{self.model_id}` is reachable right now"
                + (f" ({self.unavailable})." if self.unavailable else "."),
                code="upstream_unavailable",
                headers={"Retry-After": "2"},
            )
        generation = Generation(prepared.request.n, meter)
        generation.pausable = True  # it stops reading the upstream for a slow client
        return run_as_task(generation, self._run(generation, prepared), self._tasks)

    def _body(self, request: ChatRequest, replica: Replica) -> dict[str, Any]:
        body = dict(request.raw)
        if request.prompt is not None:
            # /v1/completions, one prompt per upstream request (tokenwell merges
            # them and echoes the prompt itself).
            body["prompt"] = (
                list(request.prompt) if isinstance(request.prompt, tuple) else (request.prompt)
            )
            body.pop("echo", None)
        body["model"] = replica.model or self.model_id
        body["stream"] = True
        options: dict[str, Any] = {"include_usage": True}
        if self.settings.continuous_usage:
            options["continuous_usage_stats"] = True
        body["stream_options"] = options
        return body

    async def _run(self, gen: Generation, prepared: Prepared) -> None:
        gen.started_at = time.perf_counter()
        request = prepared.request
        # Until the upstream reports usage, the prompt is what we can count.
        gen.meter.prompt_tokens = self._count_prompt(request, prepared.prompt_tokens)
        gen.meter.estimated = True
        tried: set[Replica] = set()
        last = "no upstream was tried"
        try:
            for _ in range(self.settings.retries + 1):
                assert self.pool is not None
                replica = self.pool.pick(tried, request.cache_key)
                if replica is None:
                    break
                tried.add(replica)
                try:
                    await self._attempt(gen, request, replica)
                    return
                except _Retry as exc:
                    last = str(exc)
            gen.push(
                [
                    Failed(
                        f"No upstream for `{self.model_id}` could serve the request ({last}).",
                        "upstream_unavailable",
                        "upstream_error",
                        http_status=503 if not self.pool or not self.pool.healthy else 502,
                        headers={"Retry-After": "2"},
                    )
                ]
            )
        except asyncio.CancelledError:
            pass  # the client went away; the upstream request was closed with the task
        except Exception as exc:  # pragma: no cover - a bug, reported to the client
            log.exception("upstream request failed")
            gen.push([Failed(f"upstream request failed: {exc}", None, "upstream_error")])
        finally:
            gen.close()

    def _count_prompt(self, request: ChatRequest, fallback: int) -> int:
        if self.counter is None:
            return fallback
        if isinstance(request.prompt, tuple):
            return len(request.prompt)
        if request.prompt is not None:
            return self.counter.count(request.prompt)
        texts = [m.content or "" for m in request.messages]
        return sum(self.counter.count(t) + 4 for t in texts)

    async def _attempt(self, gen: Generation, request: ChatRequest, replica: Replica) -> None:
        assert self.client is not None and self.pool is not None
        replica.outstanding += 1
        emitted = False
        headers = {"Content-Type": "application/json", **replica.headers()}
        try:
            async with self.client.post(
                f"{replica.url}/{'chat/completions' if request.prompt is None else 'completions'}",
                data=orjson.dumps(self._body(request, replica)),
                headers=headers,
            ) as response:
                if response.status != 200:
                    await self._refused(gen, replica, response)
                    return
                replica.served += 1
                normalizer = Normalizer(gen.meter, self.counter.count if self.counter else None)
                decoder = SSEDecoder()
                done = False
                async for data in response.content.iter_any():
                    for event in decoder.feed(data):
                        if event.data == "[DONE]":
                            done = True
                            break
                        chunk = orjson.loads(event.data)
                        if request.prompt is not None:
                            chunk = chat_chunk(chunk)
                        events = normalizer.feed(chunk)
                        if events:
                            emitted = True
                            gen.push(events)
                            if gen.failure is not None:
                                return
                            if gen.backlogged:
                                # The client is behind: stop reading the upstream
                                # (TCP backpressure to it) until it catches up.
                                await gen.room()
                    if done:
                        # Read to the end of the response, so that the
                        # connection goes back to the pool for the next request.
                        async for _ in response.content.iter_any():
                            pass
                        break
                if not done and len(normalizer.finished) < request.n:
                    raise aiohttp.ClientPayloadError("the stream ended before [DONE]")
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            if not emitted:
                self.pool.failed(replica, f"cannot connect: {exc!r}")
                raise _Retry(f"{replica.url}: {exc!r}") from exc
            self.pool.failed(replica, f"stream broke: {exc!r}")
            gen.push([self._broken(f"died: {exc}")])
        except TimeoutError as exc:  # aiohttp's sock_read timeout: the idle timeout
            if not emitted:
                self.pool.failed(replica, "no answer within the idle timeout")
                raise _Retry(f"{replica.url}: no answer") from exc
            gen.push([self._broken("stalled: no data within the idle timeout")])
        except aiohttp.ClientError as exc:
            self.pool.failed(replica, f"stream broke: {exc!r}")
            if not emitted:
                raise _Retry(f"{replica.url}: {exc!r}") from exc
            gen.push([self._broken(f"died: {exc}")])
        except (orjson.JSONDecodeError, MalformedChunk, ValueError) as exc:
            gen.push([self._broken(f"sent a malformed stream: {exc}")])
        finally:
            replica.outstanding -= 1

    def _broken(self, why: str) -> Failed:
        return Failed(
            f"The upstream for `{self.model_id}` {why}", "upstream_error", "upstream_error"
        )

    async def _refused(
        self, gen: Generation, replica: Replica, response: aiohttp.ClientResponse
    ) -> None:
        """An error status before any byte: retried on 5xx, else mapped for the client."""
        raw = await response.read()
        message = raw.decode("utf-8", errors="replace")[:500]
        with contextlib.suppress(Exception):
            error = orjson.loads(raw)["error"]
            message = str(error.get("message", message)) if isinstance(error, dict) else str(error)
        status = response.status
        assert self.pool is not None
        if status >= 500:
            self.pool.failed(replica, f"answered {status}")
            raise _Retry(f"{replica.url} answered {status}: {message}")
        if status == 429:
            retry = response.headers.get("retry-after", "1")
            gen.push(
                [
                    Failed(
                        f"The upstream is rate limited: {message}",
                        "rate_limit_exceeded",
                        "upstream_error",
                        http_status=429,
                        headers={"Retry-After": retry},
                        error_type="rate_limit_exceeded",
                    )
                ]
            )
            return
        if status in (400, 413, 422):  # about the request itself: the client's to fix
            gen.push(
                [
                    Failed(
                        f"The upstream refused the request: {message}",
                        "invalid_request",
                        "upstream_error",
                        http_status=400 if status == 422 else status,
                        error_type="invalid_request_error",
                    )
                ]
            )
            return
        # 401/403/404…: tokenwell's configuration of this upstream is wrong.
        self.pool.failed(replica, f"answered {status}")
        raise _Retry(f"{replica.url} answered {status}: {message}")


def _upstream_refusal(status: int, raw: bytes, headers: Any) -> APIError:
    """An upstream's 4xx about the request, as the client's error."""
    message = raw.decode("utf-8", errors="replace")[:500]
    param = None
    with contextlib.suppress(Exception):
        error = orjson.loads(raw)["error"]
        if isinstance(error, dict):
            message = str(error.get("message", message))
            param = error.get("param") if isinstance(error.get("param"), str) else None
    if status == 429:
        return RateLimited(
            f"The upstream is rate limited: {message}",
            headers={"Retry-After": headers.get("retry-after", "1")},
        )
    return InvalidRequest(f"The upstream refused the request: {message}", param=param)
