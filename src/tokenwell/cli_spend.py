"""The ``tokenwell keys`` options for spend controls: budgets per period and time zone.

Each flag sets one limit (``--budget-day 5``); on ``keys update`` the others
stay as they are, and ``none`` removes one (``--budget-week none``). The
admin API takes the same limits as one ``budgets`` list (the whole set).
"""

from __future__ import annotations

from typing import Any

import click

# flag's parameter name → the period it sets.
_PERIODS = {"budget_day": "day", "budget_week": "week", "budget_month": "month"}

options = [
    click.option(
        "--budget-day", "budget_day", default=None, help="Budget per calendar day in USD, or none."
    ),
    click.option(
        "--budget-week",
        "budget_week",
        default=None,
        help="Budget per calendar week (from Monday) in USD, or none.",
    ),
    click.option(
        "--budget-month",
        "budget_month",
        default=None,
        help="Budget per calendar month in USD, or none.",
    ),
    click.option(
        "--timezone",
        default=None,
        help="IANA time zone whose midnights reset the budgets (default UTC).",
    ),
]


def take(given: dict[str, Any]) -> dict[str, str | None]:
    """Pop the period flags out of ``given``: {period: USD, or None to remove}."""
    chosen: dict[str, str | None] = {}
    for name, period in _PERIODS.items():
        value = given.pop(name, None)
        if value is not None:
            chosen[period] = None if value.strip().lower() == "none" else value
    return chosen


def as_list(chosen: dict[str, str | None]) -> list[dict[str, str]] | None:
    """The ``budgets`` field of a new key (None: no flag given)."""
    listed = [{"usd": usd, "period": p} for p, usd in chosen.items() if usd is not None]
    return listed or None


async def update(
    store: Any, key_id: str, fields: Any, names: set[str], chosen: dict[str, str | None]
) -> Any:
    """``keys update``: the flags given change their limits, the key keeps the others."""
    from pydantic import ValidationError

    from tokenwell.billing.keys import Budget
    from tokenwell.protocol.validation import first_error

    if chosen:
        current = {b["period"]: b["usd"] for b in (await store.get(key_id)).budgets()}
        if "budget_usd" in names:
            current["total"] = fields.budget_usd
        current.update(chosen)
        try:
            budgets = [
                Budget.model_validate({"usd": usd, "period": p})
                for p, usd in current.items()
                if usd is not None
            ]
        except ValidationError as exc:
            raise click.ClickException(first_error(exc).message) from exc
        fields = fields.model_copy(update={"budgets": budgets})
        names = names | {"budgets"}
    return await store.update(key_id, fields, names)
