"""What the dashboard reads from the ledger: totals over windows, series per day,
latency percentiles. Read-only; the reports the admin API serves are in
``billing.usage``."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select

from tokenwell.billing.db import Database, requests
from tokenwell.billing.money import nanos_to_usd

ERRORS = ("engine_error", "upstream_error", "interrupted", "slow_client")
_billed = requests.c.status.not_in(("open", "rejected"))


def _day(days_ago: int) -> str:
    return (datetime.now(UTC).date() - timedelta(days=days_ago)).isoformat()


async def totals(db: Database, days: int) -> dict[str, Any]:
    """Spend, requests, tokens and errors over the last ``days`` UTC days (today included)."""
    c = requests.c
    since = _day(days - 1)
    query = select(
        func.count().label("requests"),
        func.coalesce(func.sum(c.prompt_tokens + c.completion_tokens), 0).label("tokens"),
        func.coalesce(func.sum(c.cost_nanos), 0).label("cost"),
        func.coalesce(func.sum(case((c.status.in_(ERRORS), 1), else_=0)), 0).label("errors"),
        func.coalesce(func.sum(case((c.status == "rejected", 1), else_=0)), 0).label("rejected"),
    ).where(c.day >= since, c.status != "open")
    async with db.engine.connect() as conn:
        row = (await conn.execute(query)).one()
    return {
        "requests": int(row.requests),
        "tokens": int(row.tokens),
        "spend_usd": nanos_to_usd(int(row.cost)),
        "errors": int(row.errors),
        "rejected": int(row.rejected),
    }


async def series(db: Database, by: str, days: int = 14) -> tuple[list[str], dict[str, list[int]]]:
    """Per UTC day over the last ``days``: cost in nano-dollars per key (``by="key"``)
    or tokens per model (``by="model"``); the days, and each name's values."""
    c = requests.c
    column = c.key_id if by == "key" else c.model
    value = (
        func.sum(c.cost_nanos) if by == "key" else func.sum(c.prompt_tokens + c.completion_tokens)
    )
    days_list = [_day(d) for d in range(days - 1, -1, -1)]
    query = (
        select(c.day, column.label("name"), func.coalesce(value, 0).label("value"))
        .where(c.day >= days_list[0], _billed)
        .group_by(c.day, column)
    )
    async with db.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    out: dict[str, list[int]] = {}
    index = {d: i for i, d in enumerate(days_list)}
    for row in rows:
        out.setdefault(row.name, [0] * days)[index[row.day]] = int(row.value)
    return days_list, out


async def ttft(db: Database, hours: int = 24, limit: int = 50_000) -> dict[str, float | None]:
    """Time to first token over the last ``hours``: p50 and p99, in ms (ledger rows)."""
    since = time.time() - hours * 3600
    query = (
        select(requests.c.ttft_ms)
        .where(requests.c.created_at >= since, requests.c.ttft_ms.is_not(None))
        .order_by(requests.c.created_at.desc())
        .limit(limit)
    )
    async with db.engine.connect() as conn:
        values = sorted(float(v) for (v,) in (await conn.execute(query)).all())
    return {"p50": _percentile(values, 0.5), "p99": _percentile(values, 0.99), "n": len(values)}


async def cache_use(db: Database, hours: int = 24) -> dict[str, dict[str, int]]:
    """Per model over the last ``hours``: prompt tokens, and those read from the prompt cache."""
    c = requests.c
    query = (
        select(
            c.model,
            func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt"),
            func.coalesce(func.sum(c.cached_tokens), 0).label("cached"),
        )
        .where(c.created_at >= time.time() - hours * 3600, _billed)
        .group_by(c.model)
    )
    async with db.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return {r.model: {"prompt": int(r.prompt), "cached": int(r.cached)} for r in rows}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]
