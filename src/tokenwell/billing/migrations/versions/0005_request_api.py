"""Each ledger row says which wire API the request came in by.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: plain ADD COLUMN, no table rebuild; earlier rows were
    # all chat completions.
    op.add_column(
        "requests",
        sa.Column("api", sa.String(32), nullable=False, server_default="chat.completions"),
    )


def downgrade() -> None:
    op.drop_column("requests", "api")
