"""Key changes, told at once to every server that caches keys.

``KeyStore`` caches keys for authentication. Revocation, expiry and budget are
checked again when a request's ledger row is written, but a key's models (and
its limits) are read from the cache: a change must reach every cache at once.
Whoever changes a key (the admin API on any replica, the ``tokenwell keys``
CLI) publishes its hash here after the change committed; every server drops
it from its cache:

- with Redis (``[redis] url``): on a pub/sub channel that every server
  listens to. While a server is not subscribed (Redis down, reconnecting) it
  does not trust its cache at all and reads keys from the database, and it
  empties its cache when it subscribes again (messages sent meanwhile are
  lost);
- with SQLite: a stamp file beside the database, touched on every change and
  checked (one ``stat``) per lookup; a change empties the cache.

Without either (PostgreSQL replicas with no Redis), a change made elsewhere is
seen when the cache entry expires (``KeyStore.cache_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHANNEL = "tokenwell:keys"
# A change whose key is not named: drop every cached key.
EVERYTHING = None


class KeyChanges:
    def __init__(self, redis_url: str | None = None, stamp: Path | None = None) -> None:
        self.redis_url = redis_url
        self.stamp = stamp
        self._stamp_seen = self._stamp_mtime()
        self._on_change: Callable[[str | None], None] | None = None
        self._subscribed = False
        self._listener: asyncio.Task[None] | None = None
        self._client: Any = None

    @property
    def live(self) -> bool:
        """Changes made elsewhere reach this process now: its cache can be trusted."""
        return self.redis_url is None or self._subscribed

    # -- publishing (after the change committed)
    async def publish(self, digest: str) -> None:
        if self.stamp is not None:
            try:
                self.stamp.touch()
                now = time.time_ns()
                os.utime(self.stamp, ns=(now, now))
            except OSError as exc:
                log.warning("could not touch the key-change stamp %s: %s", self.stamp, exc)
        if self.redis_url is not None:
            try:
                await self._redis().publish(CHANNEL, digest)
            except Exception as exc:
                log.warning("could not publish a key change to Redis: %s", exc)

    # -- receiving
    def start(self, on_change: Callable[[str | None], None]) -> None:
        self._on_change = on_change
        if self.redis_url is not None and self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    def poll(self) -> None:
        """Per lookup: has the stamp file moved (a change by another process)?"""
        if self.stamp is None or self._on_change is None:
            return
        seen = self._stamp_mtime()
        if seen != self._stamp_seen:
            self._stamp_seen = seen
            self._on_change(EVERYTHING)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None

    def _stamp_mtime(self) -> int:
        if self.stamp is None:
            return 0
        try:
            return os.stat(self.stamp).st_mtime_ns
        except OSError:
            return 0

    def _redis(self) -> Any:
        if self._client is None:
            import redis.asyncio as redis

            self._client = redis.from_url(self.redis_url)
        return self._client

    async def _listen(self) -> None:
        import redis.asyncio as redis

        while True:
            client: Any = redis.from_url(self.redis_url)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        self._subscribed = True
                        self._changed(EVERYTHING)  # what was missed while not listening
                    elif message["type"] == "message":
                        data = message["data"]
                        self._changed(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("key-change subscription lost (%s); keys are read uncached", exc)
            finally:
                self._subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(1.0)

    def _changed(self, digest: str | None) -> None:
        if self._on_change is not None:
            self._on_change(digest)


def key_changes(redis_url: str | None, sqlite_path: Path | None) -> KeyChanges | None:
    """The channel for this deployment, or None when there is none."""
    stamp = sqlite_path.with_name(sqlite_path.name + ".keys-changed") if sqlite_path else None
    if redis_url is None and stamp is None:
        return None
    return KeyChanges(redis_url, stamp)
