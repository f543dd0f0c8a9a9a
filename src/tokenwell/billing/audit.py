"""The audit trail: who created, changed, rotated or revoked which key, and when.

Each entry is written in the same transaction as the change it records, so
the trail holds every change that committed and no other. ``actor`` says who:
the admin API with the caller's address, or the CLI with the user and host.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from sqlalchemy import insert, select

from tokenwell.billing import periods
from tokenwell.billing.db import Database, audit_log

ACTIONS = ("key.create", "key.update", "key.rotate", "key.revoke")


async def record(
    conn: Any, actor: str, action: str, key_id: str | None, detail: dict[str, Any] | None
) -> None:
    await conn.execute(
        insert(audit_log).values(
            at=time.time(),
            actor=actor[:200],
            action=action,
            key_id=key_id,
            detail=orjson.dumps(detail).decode() if detail is not None else None,
        )
    )


async def entries(
    db: Database,
    *,
    key_id: str | None = None,
    action: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Newest first."""
    c = audit_log.c
    query = select(audit_log).order_by(c.id.desc()).limit(limit)
    if key_id:
        query = query.where(c.key_id == key_id)
    if action:
        query = query.where(c.action == action)
    async with db.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        {
            "id": row.id,
            "object": "audit_entry",
            "at": periods.iso(row.at),
            "actor": row.actor,
            "action": row.action,
            "key_id": row.key_id,
            "detail": orjson.loads(row.detail) if row.detail else None,
        }
        for row in rows
    ]
