"""The replicas behind one upstream model: balancing and health.

A request goes to the healthy replica with the fewest requests outstanding,
unless it carries a placement hint (``prompt_cache_key``, else its end
user): then every replica is ranked for that key by rendezvous hashing and
the request goes to the first one in its ranking that is at most twice as
busy as the least busy, plus ``AFFINITY_SLACK`` requests. A session's
requests thus meet their own prompt cache on one replica while it can take
them, and no replica goes much beyond its share; when replicas come and go,
only the keys of those that went move.
A replica that fails a request (no connection, a 5xx) leaves the pool at
once; every ``health_interval`` each replica's ``/models`` is asked, and one
that answers comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass

import aiohttp

from tokenwell.engines.upstream.settings import UpstreamURL

log = logging.getLogger(__name__)

# Requests beyond twice the least busy replica's that a hinted request's own
# replica may hold and still be chosen.
AFFINITY_SLACK = 2


@dataclass(eq=False)
class Replica:
    url: str
    api_key: str | None
    model: str | None
    outstanding: int = 0
    healthy: bool = True
    served: int = 0
    last_error: str | None = None
    # How long its last health check took to answer, in ms (None: no answer).
    health_ms: float | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class Pool:
    def __init__(
        self, urls: list[UpstreamURL], client: aiohttp.ClientSession, interval: float
    ) -> None:
        self.replicas = [Replica(u.url, u.api_key, u.model) for u in urls]
        self.client = client
        self.interval = interval
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="upstream-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def pick(self, exclude: set[Replica], key: str | None = None) -> Replica | None:
        """The healthy replica with the fewest outstanding requests (ties rotate);
        with a placement hint, the first in the key's own ranking that is not
        much busier than that (see the module's docstring)."""
        candidates = [r for r in self.replicas if r.healthy and r not in exclude]
        if not candidates:
            return None
        least = min(r.outstanding for r in candidates)
        if key is not None:
            limit = 2 * least + AFFINITY_SLACK
            ranked = sorted(candidates, key=lambda r: _rank(key, r.url), reverse=True)
            return next(r for r in ranked if r.outstanding <= limit)
        turn = next(self._turn)
        tied = [r for r in candidates if r.outstanding == least]
        return tied[turn % len(tied)]

    def failed(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            log.warning("upstream %s left the pool: %s", replica.url, reason)
        replica.healthy = False
        replica.last_error = reason

    async def check(self, replica: Replica) -> None:
        began = time.perf_counter()
        replica.health_ms = None
        try:
            async with self.client.get(
                f"{replica.url}/models",
                headers=replica.headers(),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as response:
                await response.read()
                replica.health_ms = round((time.perf_counter() - began) * 1000, 2)
                ok = response.status == 200
                reason = None if ok else _refusal(response.status, replica)
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, reason = False, f"health check failed: {exc!r}"
        if ok and not replica.healthy:
            log.info("upstream %s is back", replica.url)
        elif not ok and (replica.healthy or reason != replica.last_error):
            log.warning("upstream %s is unhealthy: %s", replica.url, reason)
        replica.healthy = ok
        replica.last_error = reason

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # pragma: no cover - never let the checker die
                log.exception("upstream health checks failed")


def _refusal(status: int, replica: Replica) -> str:
    if status in (401, 403):
        given = "its api_key" if replica.api_key else "no api_key"
        return (
            f"health check answered {status}: the upstream refused the credentials "
            f"(tokenwell sent {given}; set api_key for this URL)"
        )
    return f"health check answered {status}"


def _rank(key: str, url: str) -> int:
    """A replica's place in a key's ranking (rendezvous hashing): stable for a
    key, independent between keys."""
    digest = hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
