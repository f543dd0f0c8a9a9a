"""Reading spend back: a key's own totals, and the operator's report."""

from __future__ import annotations

import csv
import io
import re
import time
from datetime import date
from typing import Any

import orjson
from sqlalchemy import JSON, cast, func, select, true

from tokenwell.billing import endusers
from tokenwell.billing.db import Database, api_keys, requests
from tokenwell.billing.keys import MASTER, KeyRecord, record_of_row
from tokenwell.billing.money import nanos_to_usd
from tokenwell.errors import InvalidRequest

GROUPS = {
    "key": requests.c.key_id,
    "model": requests.c.model,
    "day": requests.c.day,
    "end_user": requests.c.user,
}
# ``tag:NAME`` groups by one key of the requests' metadata.
_TAG = re.compile(r"tag:([A-Za-z0-9_.-]{1,64})")

_billed = requests.c.status.not_in(("open", "rejected"))


def _sums() -> list[Any]:
    c = requests.c
    return [
        func.count().label("requests"),
        func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(c.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(c.cost_nanos), 0).label("cost_nanos"),
    ]


async def key_usage(
    db: Database, key: KeyRecord, now: float | None = None, user: str | None = None
) -> dict[str, Any]:
    """A key's totals and budgets; with ``user``, that end user's own view too.

    The key's spend and its rows' sums are read in one statement, so they agree:
    a close commits a row and the key's spend together, and two reads could see
    one without the other (the count of a request without its cost)."""
    sums = select(*_sums()).where(requests.c.key_id == key.id, _billed).subquery()
    in_flight = (
        select(func.count())
        .where(requests.c.key_id == key.id, requests.c.status == "open")
        .scalar_subquery()
        .label("in_flight")
    )
    async with db.engine.connect() as conn:
        if key.is_master:  # no key row: its spend is its rows'
            row = (await conn.execute(select(sums, in_flight))).one()
        else:
            query = (
                select(api_keys, sums, in_flight)
                .select_from(api_keys.join(sums, true()))  # sums: one row
                .where(api_keys.c.id == key.id)
            )
            row = (await conn.execute(query)).one()
            key = record_of_row(row)
    spent = key.spent_nanos if not key.is_master else int(row.cost_nanos)
    remaining = (
        None
        if key.budget_nanos is None
        else nanos_to_usd(max(key.budget_nanos - key.spent_nanos - key.reserved_nanos, 0))
    )
    usage: dict[str, Any] = {
        "object": "usage",
        "key_id": key.id,
        "name": key.name,
        "requests": int(row.requests),
        "in_flight": int(row.in_flight),
        "prompt_tokens": int(row.prompt_tokens),
        "cached_tokens": int(row.cached_tokens),
        "completion_tokens": int(row.completion_tokens),
        "total_tokens": int(row.prompt_tokens) + int(row.completion_tokens),
        "spend_usd": nanos_to_usd(spent),
        "reserved_usd": nanos_to_usd(key.reserved_nanos),
        "budget_usd": None if key.budget_nanos is None else nanos_to_usd(key.budget_nanos),
        "remaining_usd": remaining,
        "budgets": key.budgets(now),
    }
    if user is not None and not key.is_master:
        usage["end_user"] = await _end_user_usage(db, key, user, now)
    return usage


async def _end_user_usage(
    db: Database, key: KeyRecord, user: str, now: float | None
) -> dict[str, Any]:
    c = requests.c
    mine = (c.key_id == key.id, c.user == user, _billed)
    async with db.engine.connect() as conn:
        row = (await conn.execute(select(*_sums()).where(*mine))).one()
        spent, reserved, start = await endusers.current(conn, key.id, user)
    view: dict[str, Any] = {
        "user": user,
        "requests": int(row.requests),
        "spend_usd": nanos_to_usd(int(row.cost_nanos)),
        "budget": None,
        "rpm": key.end_user_rpm,
        "tpm": key.end_user_tpm,
    }
    if key.end_user_budget_nanos is not None:
        view["budget"] = key.end_user_budget(
            spent, reserved, start, time.time() if now is None else now
        )
    return view


def parse_group_by(value: str | None) -> list[str]:
    names = [g.strip() for g in (value or "key,model,day").split(",") if g.strip()]
    for name in names:
        if name not in GROUPS and _TAG.fullmatch(name) is None:
            raise InvalidRequest(
                f"Invalid 'group_by': {name!r}. Supported values are: key, model, day, "
                "end_user and tag:NAME (a metadata key of letters, digits, '_', '.', '-').",
                param="group_by",
                code="invalid_value",
            )
    return list(dict.fromkeys(names))


def _group(name: str, dialect: str) -> Any:
    """The column a report groups by: a ledger column, or one tag of the metadata."""
    match = _TAG.fullmatch(name)
    if match is None:
        return GROUPS[name]
    if dialect == "postgresql":
        return func.json_extract_path_text(cast(requests.c.tags, JSON), match.group(1))
    return func.json_extract(requests.c.tags, f'$."{match.group(1)}"')


def as_csv(rows: list[dict[str, Any]], group_by: list[str]) -> str:
    """A report as CSV: its groups, then the sums, one line per row."""
    columns = [*group_by, *(["key_name"] if "key" in group_by else []), *_SUM_COLUMNS]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


_SUM_COLUMNS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "spend_usd")


def parse_day(value: str | None, param: str) -> str | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError as exc:
        raise InvalidRequest(
            f"Invalid '{param}': expected a date like 2026-01-31, got {value!r}.",
            param=param,
            code="invalid_value",
        ) from exc


async def usage_report(
    db: Database,
    group_by: list[str],
    since: str | None = None,
    until: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    user: str | None = None,
) -> list[dict[str, Any]]:
    groups = [_group(g, db.dialect) for g in group_by]
    # Labels of their own: a tag's name is no SQL identifier.
    columns = [column.label(f"g{i}") for i, column in enumerate(groups)]
    query = select(*columns, *_sums()).where(_billed)
    if since:
        query = query.where(requests.c.day >= since)
    if until:
        query = query.where(requests.c.day <= until)
    if key_id:
        query = query.where(requests.c.key_id == key_id)
    if model:
        query = query.where(requests.c.model == model)
    if user:
        query = query.where(requests.c.user == user)
    if columns:
        query = query.group_by(*columns).order_by(*columns)
    async with db.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
        key_at = f"g{group_by.index('key')}" if "key" in group_by else None
        names = await key_names(conn, {getattr(r, key_at) for r in rows}) if key_at else {}
    report = []
    for row in rows:
        item = {g: getattr(row, f"g{i}") for i, g in enumerate(group_by)}
        if key_at is not None:
            item["key_name"] = names.get(item["key"])
        item.update(
            requests=int(row.requests),
            prompt_tokens=int(row.prompt_tokens),
            cached_tokens=int(row.cached_tokens),
            completion_tokens=int(row.completion_tokens),
            spend_usd=nanos_to_usd(int(row.cost_nanos)),
        )
        report.append(item)
    return report


async def key_names(conn: Any, ids: set[str]) -> dict[str, str]:
    """Key id → name, for reports (the master key is "master")."""
    names = {MASTER.id: MASTER.name} if MASTER.id in ids else {}
    wanted = sorted(ids - names.keys())
    if wanted:
        query = select(api_keys.c.id, api_keys.c.name).where(api_keys.c.id.in_(wanted))
        names.update({r.id: r.name for r in (await conn.execute(query)).all()})
    return names


def _row(row: Any) -> dict[str, Any]:
    data = {str(k): v for k, v in row._asdict().items()}
    data["cost_usd"] = nanos_to_usd(int(data.pop("cost_nanos")))
    data["reserved_usd"] = nanos_to_usd(int(data.pop("reserved_nanos")))
    data["tags"] = orjson.loads(data["tags"]) if data.get("tags") else None
    return data


async def request_rows(
    db: Database,
    *,
    request_id: str | None = None,
    key_id: str | None = None,
    status: str | None = None,
    limit: int = 100,
    model: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> list[dict[str, Any]]:
    """Ledger rows, newest first; ``since``/``until`` bound ``created_at`` (UNIX seconds)."""
    query = select(requests).order_by(requests.c.created_at.desc()).limit(limit)
    if request_id:
        query = query.where(requests.c.id == request_id)
    if key_id:
        query = query.where(requests.c.key_id == key_id)
    if status:
        query = query.where(requests.c.status == status)
    if model:
        query = query.where(requests.c.model == model)
    if since is not None:
        query = query.where(requests.c.created_at >= since)
    if until is not None:
        query = query.where(requests.c.created_at < until)
    async with db.engine.connect() as conn:
        return [_row(r) for r in (await conn.execute(query)).all()]
