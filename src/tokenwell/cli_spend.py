"""The ``tokenwell keys`` options for spend controls: budgets per period, time
zone, and what each end user of a key may spend and request.

Each flag sets one limit (``--budget-day 5``); on ``keys update`` the others
stay as they are, and ``none`` removes one (``--budget-week none``). The
admin API takes the same limits as one ``budgets`` list (the whole set).
A key has one budget per end user: ``--end-user-budget-day 1`` (or
``-week``, ``-month``, ``-total``).
"""

from __future__ import annotations

from typing import Any

import click

# flag's parameter name → the period it sets.
_PERIODS = {"budget_day": "day", "budget_week": "week", "budget_month": "month"}
_END_USER = {f"end_user_budget_{p}": p for p in ("day", "week", "month", "total")}

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
    *[
        click.option(
            f"--end-user-budget-{period}",
            name,
            default=None,
            help=f"Budget of each end user per {period if period != 'total' else 'lifetime'} "
            "in USD, or none.",
        )
        for name, period in _END_USER.items()
    ],
    click.option(
        "--end-user-rpm", type=int, default=None, help="Requests per minute per end user."
    ),
    click.option("--end-user-tpm", type=int, default=None, help="Tokens per minute per end user."),
]


def take(given: dict[str, Any]) -> dict[str, str | None]:
    """Pop the period flags out of ``given``: {period: USD, or None to remove}."""
    chosen: dict[str, str | None] = {}
    for name, period in [*_PERIODS.items(), *((n, "end_user:" + p) for n, p in _END_USER.items())]:
        value = given.pop(name, None)
        if value is not None:
            chosen[period] = None if value.strip().lower() == "none" else value
    if sum(k.startswith("end_user:") for k in chosen) > 1:
        raise click.UsageError("a key has one budget per end user: give one --end-user-budget-*")
    return chosen


def end_user_budget(chosen: dict[str, str | None]) -> tuple[bool, dict[str, str] | None]:
    """(whether an end-user budget flag was given, the budget it sets or None)."""
    for key, usd in chosen.items():
        if key.startswith("end_user:"):
            period = key.removeprefix("end_user:")
            return True, None if usd is None else {"usd": usd, "period": period}
    return False, None


def as_list(chosen: dict[str, str | None]) -> list[dict[str, str]] | None:
    """The ``budgets`` field of a new key (None: no flag given)."""
    listed = [
        {"usd": usd, "period": p}
        for p, usd in chosen.items()
        if usd is not None and not p.startswith("end_user:")
    ]
    return listed or None


async def update(
    store: Any, key_id: str, fields: Any, names: set[str], chosen: dict[str, str | None]
) -> Any:
    """``keys update``: the flags given change their limits, the key keeps the others."""
    given_user, user_budget = end_user_budget(chosen)
    if given_user:
        budget = None if user_budget is None else _budget(user_budget["usd"], user_budget["period"])
        fields = fields.model_copy(update={"end_user_budget": budget})
        names = names | {"end_user_budget"}
    chosen = {p: usd for p, usd in chosen.items() if not p.startswith("end_user:")}
    if chosen:
        current = {b["period"]: b["usd"] for b in (await store.get(key_id)).budgets()}
        if "budget_usd" in names:
            current["total"] = fields.budget_usd
        current.update(chosen)
        budgets = [_budget(usd, p) for p, usd in current.items() if usd is not None]
        fields = fields.model_copy(update={"budgets": budgets})
        names = names | {"budgets"}
    return await store.update(key_id, fields, names)


def _budget(usd: Any, period: str) -> Any:
    from pydantic import ValidationError

    from tokenwell.billing.keys import Budget
    from tokenwell.protocol.validation import first_error

    try:
        return Budget.model_validate({"usd": usd, "period": period})
    except ValidationError as exc:
        raise click.ClickException(first_error(exc).message) from exc


def actor() -> str:
    """Who the audit trail names for a change made by this command."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli {user}@{socket.gethostname()}"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``24h``, ``30m``, ``90s``, ``2d`` or plain seconds."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise click.BadParameter(
            f"expected a duration like 24h, 30m or 90s, got {text!r}"
        ) from None
    if not 0 <= seconds < float("inf"):
        raise click.BadParameter(f"expected a duration like 24h, 30m or 90s, got {text!r}")
    return seconds
