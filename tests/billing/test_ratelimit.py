"""Token buckets, in-process and on Redis: the same answers from both."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import pytest

from tests.conftest import REDIS_URL
from tokenwell.billing.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter


def _limiters() -> list[tuple[str, Callable[[], RateLimiter]]]:
    return [
        ("local", LocalRateLimiter),
        ("redis", lambda: RedisRateLimiter(REDIS_URL, prefix=f"tw-test-{secrets.token_hex(4)}:")),
    ]


@pytest.mark.parametrize(("kind", "make"), _limiters(), ids=[k for k, _ in _limiters()])
def test_buckets_take_refuse_and_settle(kind: str, make: Callable[[], RateLimiter]) -> None:
    async def go() -> None:
        limiter = make()
        try:
            # Requests: two per minute; the third waits about half a minute.
            first = await limiter.acquire("k", 2, None, 0)
            assert first.allowed and first.headers()["x-ratelimit-remaining-requests"] == "1"
            assert (await limiter.acquire("k", 2, None, 0)).allowed
            third = await limiter.acquire("k", 2, None, 0)
            assert not third.allowed and 29 < third.retry_after <= 30.1
            assert third.headers()["x-ratelimit-remaining-requests"] == "0"

            # Tokens: an estimate is taken whole or not at all.
            assert (await limiter.acquire("t", None, 1000, 600)).allowed
            refused = await limiter.acquire("t", None, 1000, 600)
            assert not refused.allowed and refused.tokens_left is not None
            assert 390 <= refused.tokens_left <= 401
            # Settling gives back what the request did not use...
            await limiter.adjust("t", 1000, -500)
            again = await limiter.acquire("t", None, 1000, 600)
            assert again.allowed and again.tokens_left is not None and again.tokens_left < 400
            # ...or takes what it used beyond its estimate, below zero.
            await limiter.adjust("t", 1000, 2000)
            assert not (await limiter.acquire("t", None, 1000, 1)).allowed

            # A key whose token limit is set later starts with a full bucket.
            assert (await limiter.acquire("late", 5, None, 10)).allowed
            late = await limiter.acquire("late", 5, 100, 100)
            assert late.allowed and late.headers()["x-ratelimit-remaining-tokens"] == "0"
        finally:
            await limiter.close()

    asyncio.run(go())
