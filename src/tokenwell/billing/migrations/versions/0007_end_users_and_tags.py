"""End users' budgets and rate limits on a key; request metadata (tags) on the ledger.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("end_user_budget_nanos", sa.BigInteger, nullable=True))
    op.add_column("api_keys", sa.Column("end_user_period", sa.String(8), nullable=True))
    op.add_column("api_keys", sa.Column("end_user_rpm", sa.Integer, nullable=True))
    op.add_column("api_keys", sa.Column("end_user_tpm", sa.Integer, nullable=True))
    op.add_column("requests", sa.Column("tags", sa.Text, nullable=True))
    op.create_table(
        "end_user_spend",
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("end_user", sa.String(256), nullable=False),
        sa.Column("window_start", sa.Float, nullable=False, server_default="0"),
        sa.Column("spent_nanos", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reserved_nanos", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("key_id", "end_user", name="pk_end_user_spend"),
    )


def downgrade() -> None:
    op.drop_table("end_user_spend")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("tags")
    with op.batch_alter_table("api_keys") as batch:
        for name in ("end_user_tpm", "end_user_rpm", "end_user_period", "end_user_budget_nanos"):
            batch.drop_column(name)
