"""The alerts' outbox, and which expiry of a key was announced.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("expiry_alerted", sa.Float, nullable=True))
    op.create_table(
        "alert_outbox",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.Column("delivered_at", sa.Float, nullable=True),
        sa.Column("failed_at", sa.Float, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index("ix_alert_outbox_due", "alert_outbox", ["next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_alert_outbox_due", "alert_outbox")
    op.drop_table("alert_outbox")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("expiry_alerted")
