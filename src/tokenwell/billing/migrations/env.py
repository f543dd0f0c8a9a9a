"""Alembic environment: always run on a connection tokenwell hands over."""

from alembic import context

from tokenwell.billing.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through tokenwell (Database.migrate), not the alembic CLI")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
