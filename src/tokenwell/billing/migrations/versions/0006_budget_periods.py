"""Budgets per day, week and month on a key, in its time zone.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PERIODS = ("day", "week", "month")


def upgrade() -> None:
    # Constant defaults only: plain ADD COLUMN, no table rebuild on SQLite.
    op.add_column("api_keys", sa.Column("timezone", sa.String(64), nullable=True))
    for period in PERIODS:
        op.add_column("api_keys", sa.Column(f"{period}_budget_nanos", sa.BigInteger, nullable=True))
        op.add_column(
            "api_keys",
            sa.Column(f"{period}_spent_nanos", sa.BigInteger, nullable=False, server_default="0"),
        )
        op.add_column(
            "api_keys",
            sa.Column(f"{period}_start", sa.Float, nullable=False, server_default="0"),
        )


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        for period in reversed(PERIODS):
            batch.drop_column(f"{period}_start")
            batch.drop_column(f"{period}_spent_nanos")
            batch.drop_column(f"{period}_budget_nanos")
        batch.drop_column("timezone")
