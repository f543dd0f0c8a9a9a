from __future__ import annotations

from decimal import Decimal

from tokenwell.billing.money import cost_nanos, nanos_to_usd, usd_to_nanos, worst_case_nanos
from tokenwell.config import Price


def test_usd_round_trips_through_nanos() -> None:
    assert usd_to_nanos("1.5") == 1_500_000_000
    assert nanos_to_usd(1_500_000_000) == "1.5"
    assert nanos_to_usd(1234) == "0.000001234"
    assert nanos_to_usd(0) == "0.0"
    assert nanos_to_usd(-5) == "-0.000000005"


def test_cost_is_exact_integer_arithmetic() -> None:
    price = Price(prompt=Decimal("0.10"), cached_prompt=Decimal("0.05"), completion=Decimal("0.30"))
    # 100 prompt (40 cached) and 10 completion tokens:
    # 60*0.10 + 40*0.05 + 10*0.30 = 6 + 2 + 3 = 11 USD per million = 11_000 nanos.
    assert cost_nanos(price, 100, 40, 10) == 11_000
    assert cost_nanos(Price(), 100, 0, 100) == 0


def test_cached_tokens_cost_the_prompt_price_when_no_cached_price() -> None:
    price = Price(prompt=Decimal("1"), completion=Decimal("2"))
    assert cost_nanos(price, 10, 10, 0) == cost_nanos(price, 10, 0, 0) == 10_000


def test_worst_case_never_undershoots() -> None:
    price = Price(prompt=Decimal("0.0001"), completion=Decimal("0.0003"))
    assert worst_case_nanos(price, 1, 1) >= cost_nanos(price, 1, 0, 1)


def test_integer_and_decimal_paths_agree() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    exact = Price(prompt=Decimal("0.123456"), completion=Decimal("2.5"))
    fine = Price(prompt=Decimal("0.1234567"), completion=Decimal("2.5"))  # 7 decimals: Decimal path

    @given(st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**7))
    def check(prompt: int, cached: int, completion: int) -> None:
        for price in (exact, fine):
            by_int = cost_nanos(price, prompt, cached, completion)
            cached_ = min(cached, prompt)
            by_decimal = (
                Decimal(prompt - cached_) * price.prompt
                + Decimal(cached_) * price.prompt
                + Decimal(completion) * price.completion
            ) * 1000  # USD per million tokens -> nano-dollars
            assert abs(by_int - by_decimal) <= Decimal("0.5")
            assert worst_case_nanos(price, prompt, completion) >= by_int

    check()
