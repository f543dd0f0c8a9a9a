"""Cancelling a background response on the replica that runs it, over Redis pub/sub.

A background response runs on the replica that created it; a cancel can reach
any replica. One that does not run the response publishes its id on one
channel; every replica listens, and the one running it cancels it as if the
request had reached it (the response ends ``cancelled``, billed what was
generated, and is stored). The replica that published then answers with the
stored response once it has ended. Without Redis there is no channel, and a
cancel elsewhere is a 409 naming the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CHANNEL = "tokenwell:responses:cancel"


class CancelBus:
    def __init__(self, client: Any, on_cancel: Callable[[str], None], channel: str = CHANNEL):
        self.client = client
        self.on_cancel = on_cancel
        self.channel = channel
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="cancel-bus")
        # A replica takes requests only once it hears cancels; a Redis that is down
        # now must not keep it from starting (the listener retries).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed.wait(), 5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def publish(self, response_id: str) -> int:
        """Ask every replica to cancel it; how many replicas heard the request."""
        return int(await self.client.publish(self.channel, response_id))

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                backoff = 0.1
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = message["data"]
                    response_id = data.decode() if isinstance(data, bytes) else str(data)
                    try:
                        self.on_cancel(response_id)
                    except Exception:
                        log.exception("cancelling background response %s failed", response_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                log.warning(
                    "listening for cancels on Redis failed (%s); retrying in %.1f s", exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
