"""A lean load generator: N keep-alive connections posting the same request.

The client shares the 2 cores with the server, so it must cost as little as
possible: raw asyncio streams, HTTP/1.1 with keep-alive, chunked decoding,
and no JSON parsing. It times each request (first content byte, end) and
checks that streams end in ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.common import median, pct

_CONTENT = b'"content":"'


@dataclass
class LoadResult:
    # Requests done in the window: each counts by the share of its time that
    # fell in it. Whole requests only, 64 closed-loop streams finish in waves
    # of 64, and a window of a few waves moved by a whole wave (~4%) at random.
    requests: float = 0.0
    errors: int = 0
    seconds: float = 0.0
    ttfts: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": round(self.requests, 1),
            "errors": self.errors,
            "requests_per_s": round(self.rps, 1),
            "ttft_p50_ms": round(median(self.ttfts) * 1000, 3),
            "ttft_p99_ms": round(pct(self.ttfts, 99) * 1000, 3),
        }


def _request(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    payload = orjson.dumps(body)
    lines = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {parts.hostname}:{parts.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *[f"{k}: {v}" for k, v in headers.items()],
    ]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
    return parts.hostname or "127.0.0.1", parts.port or 80, raw


async def _one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes, start: float
) -> tuple[bool, float | None, bool]:
    """One request on an open connection: (ok, ttft, keep the connection)."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    keep = b"connection: close" not in lower
    ttft = None
    tail = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            data = await reader.readexactly(size + 2)
            if ttft is None:
                at = data.find(_CONTENT)
                while at >= 0:
                    if data[at + len(_CONTENT) : at + len(_CONTENT) + 1] != b'"':
                        ttft = time.perf_counter() - start
                        break
                    at = data.find(_CONTENT, at + 1)
            tail = (tail + data)[-64:]
    else:
        length = 0
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        tail = await reader.readexactly(length)
        ttft = time.perf_counter() - start
    ok = status == 200 and (b"[DONE]" in tail or not tail.startswith(b"data"))
    return ok, ttft, keep


async def interleaved(
    base: str,
    requests: dict[str, tuple[str, dict[str, Any], dict[str, str]]],
    seconds: float,
    warmup: float = 1.0,
    block: int = 8,
) -> dict[str, list[float]]:
    """One keep-alive connection, one request after another, taking turns between
    ``requests`` (name: path, body, headers) ``block`` requests at a time: each
    request's time from its first byte sent to its last byte read, by name.
    Turns of a few milliseconds let every name see the same machine: a drift in
    its speed, which moves the ratio of two back-to-back runs by 10% and more
    on a shared 2-core machine, moves all names alike. The first request of a
    turn is not counted: work the server does after the previous request's
    last byte (a name's own, in a run of that name alone) falls on it."""
    built = {
        name: _request(base + path, body, headers)[2]
        for name, (path, body, headers) in requests.items()
    }
    host, port, _ = _request(base + next(iter(requests.values()))[0], {}, {})
    times: dict[str, list[float]] = {name: [] for name in built}
    reader, writer = await asyncio.open_connection(host, port)
    try:
        began = time.perf_counter()
        while time.perf_counter() - began < warmup + seconds:
            measuring = time.perf_counter() - began >= warmup
            for name, raw in built.items():
                for i in range(block):
                    start = time.perf_counter()
                    ok, _, keep = await _one(reader, writer, raw, start)
                    took = time.perf_counter() - start
                    assert ok and keep, name
                    if measuring and i:
                        times[name].append(took)
    finally:
        writer.close()
    return times


async def run_load(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None,
    concurrency: int,
    seconds: float,
    warmup: float = 1.0,
    unique_header: str | None = None,
) -> LoadResult:
    """``unique_header``: a header sent with a new value on every request (an Idempotency-Key)."""
    host, port, raw = _request(url, body, headers or {})
    head, _, payload = raw.partition(b"\r\n\r\n")
    counter = iter(range(1 << 62))
    run = f"{unique_header}: {time.time_ns():x}-".encode() if unique_header else b""

    def next_request() -> bytes:
        if not unique_header:
            return raw
        return b"%s\r\n%s%d\r\n\r\n%s" % (head, run, next(counter), payload)

    result = LoadResult()
    deadline = time.perf_counter() + warmup + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    ok, ttft, keep = await _one(reader, writer, next_request(), start)
                except (asyncio.IncompleteReadError, ConnectionError):
                    ok, ttft, keep = False, None, False
                end = time.perf_counter()
                if end > began:
                    share = (min(end, deadline) - max(start, began)) / (end - start)
                    if not ok:
                        result.errors += 1
                    elif share > 0:
                        result.requests += share
                        if end < deadline and ttft is not None:
                            result.ttfts.append(ttft)
                if not keep:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    began = deadline - seconds
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.gather(*tasks)
    result.seconds = min(time.perf_counter(), deadline) - began
    return result
