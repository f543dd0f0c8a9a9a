"""Idempotency keys: their records, and each ledger row's replays and attachments.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (constant defaults): no table rebuild on SQLite or PostgreSQL.
    op.add_column("requests", sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.add_column("requests", sa.Column("replays", sa.Integer, nullable=False, server_default="0"))
    op.add_column(
        "requests", sa.Column("attachments", sa.Integer, nullable=False, server_default="0")
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("content_type", sa.String(100), nullable=True),
        sa.Column("body", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("key_id", "idempotency_key", name="pk_idempotency_keys"),
    )
    op.create_index("ix_idempotency_keys_expires", "idempotency_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_expires", "idempotency_keys")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("attachments")
        batch.drop_column("replays")
        batch.drop_column("idempotency_key")
