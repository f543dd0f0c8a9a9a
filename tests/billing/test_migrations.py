"""The Alembic migrations build exactly the tables the code declares."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from tokenwell.billing.db import Database, alembic_config, metadata


def _diff(connection: Connection) -> list[Any]:
    return compare_metadata(MigrationContext.configure(connection), metadata)


def test_migrations_match_the_declared_tables(db_url: str) -> None:
    async def go() -> None:
        db = Database(db_url)
        try:
            await db.migrate()
            async with db.engine.connect() as conn:
                assert await conn.run_sync(_diff) == []
        finally:
            await db.close()

    asyncio.run(go())


def test_upgrading_a_0001_ledger_keeps_its_rows(db_url: str) -> None:
    def to(revision: str) -> Any:
        def run(connection: Connection) -> None:
            cfg = alembic_config()
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)

        return run

    async def go() -> None:
        db = Database(db_url)
        try:
            async with db.engine.begin() as conn:
                await conn.run_sync(to("0001"))
                await conn.execute(
                    text(
                        "INSERT INTO requests (id, key_id, model, stream, include_usage, status,"
                        " created_at, day, instance) VALUES ('r1', 'k', 'm', true, false, 'open',"
                        " 1.0, '1970-01-01', 'i')"
                    )
                )
            await db.migrate()
            async with db.engine.connect() as conn:
                rows = (await conn.execute(text("SELECT id, status FROM requests"))).all()
                indexes = await conn.run_sync(
                    lambda c: {i["name"] for i in inspect(c).get_indexes("requests")}
                )
            assert [tuple(r) for r in rows] == [("r1", "open")]
            assert "ix_requests_open" in indexes and "ix_requests_instance_status" not in indexes
        finally:
            await db.close()

    asyncio.run(go())
