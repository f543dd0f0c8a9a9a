"""A fault-injecting TCP proxy on 127.0.0.1: it cuts connections at random points.

Each connection through it is, by a seeded coin, left alone or cut: before
the request reaches the server, before the response's first byte, in the
middle of an event, or right between two events. ``cuts`` counts the cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from dataclasses import dataclass

MODES = ("request", "first_byte", "mid_event", "between_events")


@dataclass
class Plan:
    mode: str
    offset: int  # response bytes let through before the cut (mid/between)


class CuttingProxy:
    def __init__(
        self,
        target_port: int,
        seed: int = 0,
        cut_probability: float = 0.5,
        max_offset: int = 6000,
        max_cuts: int | None = None,
    ) -> None:
        self.target_port = target_port
        self.rng = random.Random(seed)
        self.cut_probability = cut_probability
        self.max_offset = max_offset
        self.max_cuts = max_cuts
        self.cuts = 0
        self.by_mode = dict.fromkeys(MODES, 0)
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cutting-proxy")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CuttingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> CuttingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()

    def _plan(self) -> Plan | None:
        if self.max_cuts is not None and self.cuts >= self.max_cuts:
            return None
        if self.rng.random() >= self.cut_probability:
            return None
        return Plan(self.rng.choice(MODES), self.rng.randint(1, self.max_offset))

    def _cut(self, plan: Plan) -> None:
        self.cuts += 1
        self.by_mode[plan.mode] += 1

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        plan = self._plan()
        if plan is not None and plan.mode == "request":
            # The request never reaches the server.
            with contextlib.suppress(Exception):
                await client_r.read(1)
            self._cut(plan)
            client_w.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        upstream = asyncio.ensure_future(self._pump(client_r, up_w))
        downstream = asyncio.ensure_future(self._down(up_r, client_w, plan))
        try:
            await asyncio.wait([upstream, downstream], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (upstream, downstream):
                task.cancel()
            await asyncio.gather(upstream, downstream, return_exceptions=True)
            client_w.transport.abort()
            up_w.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _down(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, plan: Plan | None
    ) -> None:
        sent = 0
        while data := await reader.read(65536):
            if plan is not None:
                if plan.mode == "first_byte":
                    self._cut(plan)
                    return
                if sent + len(data) >= plan.offset:
                    keep = plan.offset - sent
                    if plan.mode == "between_events":
                        boundary = data.find(b"\n\n", keep)
                        if boundary < 0:
                            writer.write(data)
                            await writer.drain()
                            sent += len(data)
                            continue
                        keep = boundary + 2
                    writer.write(data[:keep])
                    await writer.drain()
                    self._cut(plan)
                    return
            writer.write(data)
            await writer.drain()
            sent += len(data)
