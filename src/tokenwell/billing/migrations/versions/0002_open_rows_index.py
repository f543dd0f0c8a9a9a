"""Index only the open ledger rows.

Recovery looks up this instance's open rows; the index it needs holds just
the requests in flight instead of every request ever made, and closing a row
no longer adds an entry to it.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_OPEN = sa.text("status = 'open'")


def upgrade() -> None:
    op.drop_index("ix_requests_instance_status", "requests")
    op.create_index(
        "ix_requests_open", "requests", ["instance"], sqlite_where=_OPEN, postgresql_where=_OPEN
    )


def downgrade() -> None:
    op.drop_index("ix_requests_open", "requests")
    op.create_index("ix_requests_instance_status", "requests", ["instance", "status"])
