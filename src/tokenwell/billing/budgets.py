"""What a key's budgets allow: the reservation and the spend, as two statements.

A key has a lifetime budget (``budget_nanos``) and one per calendar period
(day, week, month: ``billing.periods``). What is reserved for requests in
flight (``reserved_nanos``) counts against each of them. Both statements
touch the key's one row, so a reservation is atomic on SQLite (one writer)
and PostgreSQL (row lock) alike, and the ledger (SQLite, the PostgreSQL
transaction) and ``pgbatch`` (PostgreSQL, one statement per batch) run the
same SQL.

Bound parameters: ``k_id``; ``k_day``, ``k_week``, ``k_month`` (the starts of
the request's windows); for ``RESERVE`` ``k_now`` and ``k_amount``; for
``SPEND`` ``k_cost`` and ``k_reserved``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, case, literal_column, or_, update

from tokenwell.billing import periods
from tokenwell.billing.db import api_keys
from tokenwell.billing.periods import Windows

_k = api_keys.c
_ZERO = literal_column("0")
WINDOW_PARAMS = tuple(f"k_{p}" for p in periods.PERIODS)


def window_params(windows: Windows) -> dict[str, float]:
    return dict(zip(WINDOW_PARAMS, windows, strict=True))


def _window_spent(period: str) -> Any:
    """The period's spend as of the request's window: zero once a newer one began."""
    start = _k[f"{period}_start"]
    return case((start < bindparam(f"k_{period}"), _ZERO), else_=_k[f"{period}_spent_nanos"])


def _covers(limit: Any, spent: Any) -> Any:
    return or_(limit.is_(None), spent + _k.reserved_nanos + bindparam("k_amount") <= limit)


# Reserve on a key that is active and whose every budget covers the amount
# (the lifetime one and those of the current windows, rolling a window
# forward, its spend back to zero, when a new one has begun).
RESERVE = (
    update(api_keys)
    .where(
        _k.id == bindparam("k_id"),
        _k.revoked_at.is_(None),
        or_(_k.expires_at.is_(None), _k.expires_at > bindparam("k_now")),
        _covers(_k.budget_nanos, _k.spent_nanos),
        *[_covers(_k[f"{p}_budget_nanos"], _window_spent(p)) for p in periods.PERIODS],
    )
    .values(
        reserved_nanos=_k.reserved_nanos + bindparam("k_amount"),
        **{f"{p}_spent_nanos": _window_spent(p) for p in periods.PERIODS},
        **{
            f"{p}_start": case(
                (_k[f"{p}_start"] < bindparam(f"k_{p}"), bindparam(f"k_{p}")),
                else_=_k[f"{p}_start"],
            )
            for p in periods.PERIODS
        },
    )
)

# Reservations move to spend. A period's spend grows by the cost of requests
# admitted in its current window; one admitted in a window that has ended
# since (it ran past midnight) is billed, but to no window of today's.
SPEND = (
    update(api_keys)
    .where(_k.id == bindparam("k_id"))
    .values(
        spent_nanos=_k.spent_nanos + bindparam("k_cost"),
        reserved_nanos=_k.reserved_nanos - bindparam("k_reserved"),
        **{
            f"{p}_spent_nanos": _k[f"{p}_spent_nanos"]
            + case((_k[f"{p}_start"] == bindparam(f"k_{p}"), bindparam("k_cost")), else_=_ZERO)
            for p in periods.PERIODS
        },
    )
)


def refusal(key: Any, amount: int, windows: Windows) -> tuple[str, int, int]:
    """Which budget of ``key`` (a row of api_keys) does not cover ``amount``:
    (period, its limit, what it has left), given the request's windows."""
    reserved = key.reserved_nanos
    if key.budget_nanos is not None and key.spent_nanos + reserved + amount > key.budget_nanos:
        return "total", key.budget_nanos, max(key.budget_nanos - key.spent_nanos - reserved, 0)
    for period, start in zip(periods.PERIODS, windows, strict=True):
        limit = getattr(key, f"{period}_budget_nanos")
        if limit is None:
            continue
        spent = (
            0 if getattr(key, f"{period}_start") < start else getattr(key, f"{period}_spent_nanos")
        )
        if spent + reserved + amount > limit:
            return period, limit, max(limit - spent - reserved, 0)
    return "total", key.budget_nanos or 0, 0  # pragma: no cover - raced: it fits now
