"""What each end user of a key may spend: reserved and spent like the key's own budget.

A key may give every end user (a request's ``user``, ``safety_identifier`` or
``metadata.user_id``) one budget per period. Their spend is a row per (key,
end user) in ``end_user_spend``, created by the first reservation. The
ledger reserves on it in the same transaction as the key's own reservation
and after it (the key's row first, on every path: two replicas never wait on
each other's rows in opposite orders), and settles it with the close.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, select, text, update

from tokenwell.billing.db import api_keys, end_user_spend


@dataclass(frozen=True, slots=True)
class EndUserBudget:
    """On an open: the end user's limit, its period and the request's window."""

    limit_nanos: int
    period: str
    window: float


# Take ``amt`` for the end user if their window's spend and reservations leave
# room for it under ``lim``; a row appears with its first reservation and its
# spend starts again at zero when a newer window begins. One row changed or none.
_ROLLED = (
    "CASE WHEN end_user_spend.window_start < excluded.window_start THEN 0"
    " ELSE end_user_spend.spent_nanos END"
)
RESERVE = text(
    "INSERT INTO end_user_spend (key_id, end_user, window_start, spent_nanos, reserved_nanos)"
    " SELECT :k_id, :u, :w, 0, :amt WHERE :amt <= :lim"
    " ON CONFLICT (key_id, end_user) DO UPDATE SET"
    f" spent_nanos = {_ROLLED},"
    " window_start = CASE WHEN end_user_spend.window_start < excluded.window_start"
    " THEN excluded.window_start ELSE end_user_spend.window_start END,"
    " reserved_nanos = end_user_spend.reserved_nanos + excluded.reserved_nanos"
    f" WHERE {_ROLLED} + end_user_spend.reserved_nanos + excluded.reserved_nanos <= :lim"
)
SPEND = text(
    "UPDATE end_user_spend SET"
    " spent_nanos = spent_nanos + CASE WHEN window_start = :w THEN :cost ELSE 0 END,"
    " reserved_nanos = reserved_nanos - :reserved"
    " WHERE key_id = :k_id AND end_user = :u"
)
# A key reservation given back: its end user's budget refused the request.
_UNRESERVE = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("k_id"))
    .values(reserved_nanos=api_keys.c.reserved_nanos - bindparam("k_amount"))
)


def reserve(conn: Connection, key_id: str, user: str, budget: EndUserBudget, amount: int) -> bool:
    params = {"k_id": key_id, "u": user, "w": budget.window, "amt": amount}
    return conn.execute(RESERVE, {**params, "lim": budget.limit_nanos}).rowcount == 1


def unreserve_key(conn: Connection, key_id: str, amount: int) -> None:
    conn.execute(_UNRESERVE, {"k_id": key_id, "k_amount": amount})


def available(conn: Connection, key_id: str, user: str, budget: EndUserBudget) -> int:
    """What the end user has left in the request's window (after reservations)."""
    c = end_user_spend.c
    row = conn.execute(
        select(c.spent_nanos, c.reserved_nanos, c.window_start).where(
            c.key_id == key_id, c.end_user == user
        )
    ).first()
    if row is None:
        return budget.limit_nanos
    spent = 0 if row.window_start < budget.window else row.spent_nanos
    return max(budget.limit_nanos - spent - row.reserved_nanos, 0)


def spend(conn: Connection, rows: Iterable[tuple[str, str, float, int, int]]) -> None:
    """Settle closes: (key, end user, window, cost, reserved) each."""
    params = [
        {"k_id": k, "u": u, "w": w, "cost": cost, "reserved": reserved}
        for k, u, w, cost, reserved in rows
    ]
    if params:
        conn.execute(SPEND, params)


async def current(conn: Any, key_id: str, user: str) -> tuple[int, int, float]:
    """(spent, reserved, window start) of an end user of a key (zeros before any)."""
    c = end_user_spend.c
    row = (
        await conn.execute(
            select(c.spent_nanos, c.reserved_nanos, c.window_start).where(
                c.key_id == key_id, c.end_user == user
            )
        )
    ).first()
    return (0, 0, 0.0) if row is None else (row.spent_nanos, row.reserved_nanos, row.window_start)
