"""API keys and the request ledger.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("key_prefix", sa.String(24), nullable=False),
        sa.Column("budget_nanos", sa.BigInteger, nullable=True),
        sa.Column("spent_nanos", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reserved_nanos", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.Integer, nullable=True),
        sa.Column("models", sa.JSON, nullable=True),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("include_usage", sa.Boolean, nullable=False),
        sa.Column("n", sa.Integer, nullable=False, server_default="1"),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("reserved_nanos", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cost_nanos", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("estimated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("queue_ms", sa.Float, nullable=True),
        sa.Column("ttft_ms", sa.Float, nullable=True),
        sa.Column("total_ms", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("closed_at", sa.Float, nullable=True),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.Column("user", sa.String(256), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_requests_key_day", "requests", ["key_id", "day"])
    op.create_index("ix_requests_instance_status", "requests", ["instance", "status"])


def downgrade() -> None:
    op.drop_index("ix_requests_instance_status", "requests")
    op.drop_index("ix_requests_key_day", "requests")
    op.drop_table("requests")
    op.drop_table("api_keys")
