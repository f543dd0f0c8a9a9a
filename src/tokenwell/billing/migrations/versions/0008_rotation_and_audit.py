"""Key rotation with a grace period, and the audit trail of key changes.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("previous_key_hash", sa.String(64), nullable=True))
    op.add_column("api_keys", sa.Column("previous_expires_at", sa.Float, nullable=True))
    op.create_index("ix_api_keys_previous_key_hash", "api_keys", ["previous_key_hash"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_audit_log_key", "audit_log", ["key_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_key", "audit_log")
    op.drop_table("audit_log")
    op.drop_index("ix_api_keys_previous_key_hash", "api_keys")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("previous_expires_at")
        batch.drop_column("previous_key_hash")
