"""login_failures: failed web logins by subject digest, for the login throttle without Redis

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_login_failures_subject_failed_at", "login_failures", ["subject", "failed_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_login_failures_subject_failed_at", table_name="login_failures")
    op.drop_table("login_failures")
