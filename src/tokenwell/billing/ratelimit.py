"""Requests and tokens per minute, per key: token buckets.

A bucket holds up to ``limit`` and refills at ``limit`` per minute. A request
takes one request and its token estimate (prompt plus the completion it asked
for) from both buckets at once, or neither; when it ends, the difference to
what it really used is settled, and a bucket may go below zero, which holds
the key's next requests back until it refills.

In-process by default. With a Redis URL, one Lua script does the same on
Redis, with Redis's clock, so every replica draws from the same buckets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0
    rpm: int | None = None
    requests_left: float | None = None
    tpm: int | None = None
    tokens_left: float | None = None

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers OpenAI sends."""
        out: dict[str, str] = {}
        if self.rpm is not None and self.requests_left is not None:
            out["x-ratelimit-limit-requests"] = str(self.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(math.floor(self.requests_left), 0))
            out["x-ratelimit-reset-requests"] = _duration(
                max(self.rpm - self.requests_left, 0) * 60 / self.rpm
            )
        if self.tpm is not None and self.tokens_left is not None:
            out["x-ratelimit-limit-tokens"] = str(self.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(math.floor(self.tokens_left), 0))
            out["x-ratelimit-reset-tokens"] = _duration(
                max(self.tpm - self.tokens_left, 0) * 60 / self.tpm
            )
        return out


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:.3g}s"


class RateLimiter(Protocol):
    async def acquire(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        """Take one request and ``tokens`` from the key's buckets, or nothing."""

    async def adjust(self, key: str, tpm: int | None, tokens: int) -> None:
        """Settle ``tokens`` more (or, negative, fewer) than were taken."""

    async def close(self) -> None: ...


def _level(level: float | None, stamp: float, limit: int, now: float) -> float:
    if level is None:  # a bucket not drawn from yet is full
        return float(limit)
    return min(float(limit), level + (now - stamp) * limit / 60.0)


class LocalRateLimiter:
    """The buckets of this process: per key ``[requests, stamp, tokens, stamp]``."""

    def __init__(self) -> None:
        self._buckets: dict[str, list[Any]] = {}

    def _bucket(self, key: str) -> list[Any]:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [None, 0.0, None, 0.0]
        return bucket

    async def acquire(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        now = time.monotonic()
        bucket = self._bucket(key)
        req = _level(bucket[0], bucket[1], rpm, now) if rpm else None
        tok = _level(bucket[2], bucket[3], tpm, now) if tpm else None
        wait = 0.0
        if rpm and req is not None and req < 1:
            wait = max(wait, (1 - req) * 60 / rpm)
        if tpm and tok is not None and tok < tokens:
            wait = max(wait, (tokens - tok) * 60 / tpm)
        if wait > 0:
            return Decision(False, wait, rpm, req, tpm, tok)
        if req is not None:
            req -= 1
            bucket[0], bucket[1] = req, now
        if tok is not None:
            tok -= tokens
            bucket[2], bucket[3] = tok, now
        return Decision(True, 0.0, rpm, req, tpm, tok)

    async def adjust(self, key: str, tpm: int | None, tokens: int) -> None:
        if not tpm or not tokens:
            return
        now = time.monotonic()
        bucket = self._bucket(key)
        bucket[2] = min(_level(bucket[2], bucket[3], tpm, now) - tokens, float(tpm))
        bucket[3] = now

    async def close(self) -> None:
        return None


# KEYS: request bucket, token bucket. ARGV: rpm, tpm, tokens (0 = no limit).
# Returns {allowed, retry_after_ms, requests_left*1000, tokens_left*1000}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local need = tonumber(ARGV[3])
local function level(key, limit)
  local v = redis.call('HMGET', key, 'l', 's')
  if not v[1] then return limit end
  return math.min(limit, tonumber(v[1]) + (now - tonumber(v[2])) * limit / 60)
end
local req = -1
local tok = -1
local wait = 0
if rpm > 0 then
  req = level(KEYS[1], rpm)
  if req < 1 then wait = math.max(wait, (1 - req) * 60 / rpm) end
end
if tpm > 0 then
  tok = level(KEYS[2], tpm)
  if tok < need then wait = math.max(wait, (need - tok) * 60 / tpm) end
end
if wait > 0 then
  return {0, math.ceil(wait * 1000), math.floor(req * 1000), math.floor(tok * 1000)}
end
if rpm > 0 then
  req = req - 1
  redis.call('HSET', KEYS[1], 'l', tostring(req), 's', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120)
end
if tpm > 0 then
  tok = tok - need
  redis.call('HSET', KEYS[2], 'l', tostring(tok), 's', tostring(now))
  redis.call('EXPIRE', KEYS[2], 120)
end
return {1, 0, math.floor(req * 1000), math.floor(tok * 1000)}
"""

# KEYS: token bucket. ARGV: tpm, tokens to take (negative gives back).
_ADJUST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tpm = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'l', 's')
local l = tpm
if v[1] then l = math.min(tpm, tonumber(v[1]) + (now - tonumber(v[2])) * tpm / 60) end
l = math.min(tpm, l - tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'l', tostring(l), 's', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
return 1
"""


class RedisRateLimiter:
    def __init__(self, url: str, prefix: str = "tokenwell:rl:") -> None:
        import redis.asyncio as redis

        self.client: Any = redis.from_url(url)
        self.prefix = prefix
        self._acquire = self.client.register_script(_ACQUIRE)
        self._adjust = self.client.register_script(_ADJUST)

    async def acquire(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        keys = [f"{self.prefix}r:{key}", f"{self.prefix}t:{key}"]
        allowed, wait_ms, req, tok = await self._acquire(
            keys=keys, args=[rpm or 0, tpm or 0, tokens]
        )
        return Decision(
            bool(allowed),
            int(wait_ms) / 1000,
            rpm,
            int(req) / 1000 if rpm else None,
            tpm,
            int(tok) / 1000 if tpm else None,
        )

    async def adjust(self, key: str, tpm: int | None, tokens: int) -> None:
        if not tpm or not tokens:
            return
        await self._adjust(keys=[f"{self.prefix}t:{key}"], args=[tpm, tokens])

    async def close(self) -> None:
        await self.client.aclose()
