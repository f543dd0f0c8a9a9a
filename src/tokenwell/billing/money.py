"""Money as integers: nano-dollars (1e-9 USD), never floats.

Prices are USD per million tokens, so one token at a price with up to three
decimals is a whole number of nano-dollars; finer prices are rounded once
per request, half up.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from functools import lru_cache

from tokenwell.config import Price

NANOS_PER_USD = 1_000_000_000
_PER_TOKEN = Decimal(NANOS_PER_USD) / Decimal(1_000_000)  # nanos per (USD per 1M tokens)
_PICOS_PER_TOKEN = _PER_TOKEN * 1000


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


@lru_cache(maxsize=256)
def _picos(prompt: Decimal, cached: Decimal, completion: Decimal) -> tuple[int, int, int] | None:
    """Pico-dollars per token, when every price is a whole number of them (≤ 6 decimals)."""
    rates = [p * _PICOS_PER_TOKEN for p in (prompt, cached, completion)]
    if any(r != r.to_integral_value() for r in rates):
        return None
    return int(rates[0]), int(rates[1]), int(rates[2])


def _rates(price: Price) -> tuple[Decimal, Decimal, Decimal]:
    cached = price.cached_prompt if price.cached_prompt is not None else price.prompt
    return price.prompt, cached, price.completion


def cost_nanos(price: Price, prompt: int, cached: int, completion: int) -> int:
    cached = min(cached, prompt)
    rates = _rates(price)
    picos = _picos(*rates)
    if picos is not None:  # exact integer arithmetic, the common case
        total = (prompt - cached) * picos[0] + cached * picos[1] + completion * picos[2]
        whole, rest = divmod(total, 1000)
        return whole + (1 if rest >= 500 else 0)
    exact = (
        Decimal(prompt - cached) * rates[0]
        + Decimal(cached) * rates[1]
        + Decimal(completion) * rates[2]
    ) * _PER_TOKEN
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def worst_case_nanos(price: Price, prompt: int, completion: int) -> int:
    """The most a request can cost: its whole prompt uncached, every token it may make."""
    picos = _picos(*_rates(price))
    if picos is not None:
        return -(-(prompt * picos[0] + completion * picos[2]) // 1000)
    exact = (Decimal(prompt) * price.prompt + Decimal(completion) * price.completion) * _PER_TOKEN
    return int(exact.to_integral_value(rounding=ROUND_CEILING))
