"""Money as integers: nano-dollars (1e-9 USD), never floats.

Prices are USD per million tokens, so one token at a price with up to three
decimals is a whole number of nano-dollars; finer prices are rounded once
per request, half up.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

from tokenwell.config import Price

NANOS_PER_USD = 1_000_000_000
_PER_TOKEN = Decimal(NANOS_PER_USD) / Decimal(1_000_000)  # nanos per (USD per 1M tokens)


def usd_to_nanos(usd: Decimal | str | float) -> int:
    value = Decimal(str(usd)) * NANOS_PER_USD
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


def nanos_to_usd(nanos: int) -> str:
    """A decimal string, exact: 1234 → "0.000001234"."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    text = f"{whole}.{frac:09d}".rstrip("0")
    if text.endswith("."):
        text += "0"
    return sign + text


def cost_nanos(price: Price, prompt: int, cached: int, completion: int) -> int:
    cached = min(cached, prompt)
    cached_price = price.cached_prompt if price.cached_prompt is not None else price.prompt
    total = (
        Decimal(prompt - cached) * price.prompt
        + Decimal(cached) * cached_price
        + Decimal(completion) * price.completion
    ) * _PER_TOKEN
    return int(total.to_integral_value(rounding=ROUND_HALF_UP))


def worst_case_nanos(price: Price, prompt: int, completion: int) -> int:
    """The most a request can cost: its whole prompt uncached, every token it may make."""
    total = (Decimal(prompt) * price.prompt + Decimal(completion) * price.completion) * _PER_TOKEN
    return int(total.to_integral_value(rounding=ROUND_CEILING))
